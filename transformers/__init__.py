"""Pre/post-processing steps, the chain that runs them, and the remote-predictor client."""
