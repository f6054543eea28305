"""The bench's one error type, in a module of its own so that every part can raise it."""

from __future__ import annotations


class BenchError(Exception):
    """A bench that cannot run as asked; the message is one line for the user."""
