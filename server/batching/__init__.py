"""Dynamic batching: when to cut a batch, how requests merge, and the queue that does it."""
