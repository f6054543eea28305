"""`ember bench`: a closed-loop load generator, kept apart from the serving path."""
