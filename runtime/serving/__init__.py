"""Front ends of the engine core: the model interfaces and their tensor codec, request parsing,
the Triton-protocol gRPC server and the Prometheus metrics."""
