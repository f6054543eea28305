"""The REST front door: KServe V1 and Open Inference Protocol (V2) over HTTP."""
