#!/usr/bin/env bash
# Regenerates the checked-in Python modules for the KServe v2 gRPC proto.
# Run from anywhere with grpcio-tools installed (it is in the `test` extra).
set -euo pipefail
proto_dir="$(cd "$(dirname "$0")/.." && pwd)/src/inferd/server/kserve/proto"
python -m grpc_tools.protoc \
  --proto_path="$proto_dir" \
  --python_out="$proto_dir" \
  --pyi_out="$proto_dir" \
  --grpc_python_out="$proto_dir" \
  "$proto_dir/grpc_service.proto"
# protoc writes `import grpc_service_pb2`; make it package-relative so the modules import from inferd.
sed -i 's/^import grpc_service_pb2 as /from . import grpc_service_pb2 as /' "$proto_dir/grpc_service_pb2_grpc.py"
