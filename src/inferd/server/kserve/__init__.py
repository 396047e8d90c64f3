"""KServe Open Inference Protocol v2 adapters (REST and gRPC) over `inferd.serving`."""
