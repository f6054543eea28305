"""Wire formats to and from the internal request type; pure functions, no I/O."""
