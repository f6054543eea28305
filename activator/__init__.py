"""The activator: a queue-while-cold reverse proxy and its scaler (not built yet)."""
