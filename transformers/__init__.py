"""Pre/post-processing steps and the transformer chain (not built yet)."""
