"""Weights placed onto their device: the safetensors header (`header`, no torch) and tensors
filled in place as bytes arrive (`placement`), from a download or from the node cache's file
(`handoff`)."""
