"""Generated KServe v2 gRPC modules; regenerate with scripts/gen_kserve_proto.sh."""
