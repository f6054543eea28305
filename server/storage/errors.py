"""Storage failures, each a one-line message naming what is wrong and where.

The messages name the bucket, key and endpoint (or URL) so that an operator reading one log line
knows which setting to fix; none of them carries a traceback worth showing.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base of every storage failure; `str(error)` is the one line to show."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidUri(StorageError):
    pass


class NoSuchBucket(StorageError):
    pass


class NoSuchKey(StorageError):
    pass


class AccessDenied(StorageError):
    pass


class EndpointUnreachable(StorageError):
    pass


class ObjectChanged(StorageError):
    """The object's ETag or size changed while its ranges were being fetched (HTTP 412)."""


class DownloadFailed(StorageError):
    """A range still failed after every retry, or the server answered something unusable."""


class CacheError(StorageError):
    """The node cache cannot be used (not writable, full)."""


class BadSetting(StorageError):
    """An environment setting that cannot be parsed (a timeout that is not a number...)."""
