"""The gRPC front door: KServe V2 / Triton's `inference.GRPCInferenceService`."""
