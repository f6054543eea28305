"""S3 objects: resolve a URI to objects (HEAD or LIST), fetch them as parallel ranged GETs.

Every ranged GET carries `IfMatch=<etag>` (the ETag the HEAD or LIST saw), so an object replaced
mid-download fails with 412 instead of mixing two versions' bytes. Servers that ignore If-Match
(rclone) are caught by checking each response's ETag and Content-Range as well.

Errors name the bucket, key and endpoint in one line; botocore's exceptions never leave here.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, cast

from ember.server.storage.download import (
    ByteRange,
    Downloader,
    DownloadOptions,
    FetchStats,
    Progress,
    RangeBody,
)
from ember.server.storage.errors import (
    AccessDenied,
    BadSetting,
    DownloadFailed,
    EndpointUnreachable,
    NoSuchBucket,
    NoSuchKey,
    ObjectChanged,
    StorageError,
)
from ember.server.storage.retry import Transient, with_retries
from ember.server.storage.settings import S3Settings
from ember.server.storage.sinks import Sink
from ember.server.storage.uri import S3Uri, safe_relative_path

log = logging.getLogger("ember.storage")

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_THROTTLED = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded"}
_TRANSIENT_CODES = _THROTTLED | {"RequestTimeout", "InternalError", "ServiceUnavailable"}
_DENIED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"}


def strip_etag(etag: str) -> str:
    """HEAD answers `"abc"`, some servers' LIST answers `abc`: compare them bare."""
    return etag.strip().removeprefix("W/").strip('"')


@dataclass(frozen=True, slots=True)
class S3Object:
    endpoint: str
    bucket: str
    key: str
    size: int
    # Without quotes.
    etag: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


class S3Store:
    """One S3 client and one range pool, for every object of a pull."""

    def __init__(
        self,
        settings: S3Settings,
        options: DownloadOptions,
        *,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.settings = settings
        self.options = options
        self._sleep = sleep
        try:
            self._client = settings.client(max_pool_connections=options.concurrency)
        except Exception as exc:  # botocore's ProfileNotFound and friends: a bad setting
            raise BadSetting(f"cannot build an S3 client: {exc}") from None
        self._downloader = Downloader(options, sleep=sleep)

    def cancel(self) -> None:
        """Stop the downloads in progress (from any thread)."""
        self._downloader.cancel()

    def close(self) -> None:
        self._downloader.close()
        self._client.close()

    def __enter__(self) -> S3Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint

    def resolve(self, uri: S3Uri) -> list[tuple[PurePosixPath, S3Object]]:
        """The objects a URI names, each with its path relative to the URI.

        A key without a trailing "/" is one object; when there is no such object but there are
        objects under `key/`, it is taken as that folder, as KServe's storage initializer does
        (`storageUri: s3://bucket/models/mlp` is a folder more often than not).
        """
        if uri.is_prefix:
            return self.list(uri.bucket, uri.key)
        try:
            obj = self.head(uri.bucket, uri.key)
        except NoSuchKey as missing:
            try:
                found = self.list(uri.bucket, uri.key + "/")
            except (NoSuchKey, AccessDenied):
                raise missing from None
            log.info("%s is a folder: fetching the %d objects under it", uri, len(found))
            return found
        return [(PurePosixPath(PurePosixPath(uri.key).name), obj)]

    def head(self, bucket: str, key: str) -> S3Object:
        where = _Where(self.endpoint, bucket, key)

        def attempt() -> S3Object:
            reply = self._client.head_object(Bucket=bucket, Key=key)
            return S3Object(
                self.endpoint, bucket, key, int(reply["ContentLength"]), strip_etag(reply["ETag"])
            )

        try:
            return cast(S3Object, self._retrying(attempt, where))
        except _Missing:
            # A HEAD answer has no body, so a 404 does not say whether the bucket or the key is
            # missing; a one-key LIST does.
            self.list(bucket, key, limit=1)
            raise NoSuchKey(
                f"no such key '{key}' in bucket '{bucket}' at {self.endpoint}"
            ) from None

    def list(
        self, bucket: str, prefix: str, limit: int | None = None
    ) -> list[tuple[PurePosixPath, S3Object]]:
        """The objects under `prefix`, with their paths relative to it (folder markers left
        out). Raises `NoSuchKey` when there are none."""
        where = _Where(self.endpoint, bucket, prefix)
        found: list[tuple[PurePosixPath, S3Object]] = []
        token: str | None = None
        while True:
            args: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
            if token:
                args["ContinuationToken"] = token
            if limit:
                args["MaxKeys"] = limit
            page = self._retrying(functools.partial(self._client.list_objects_v2, **args), where)
            for item in page.get("Contents", []):
                key = cast(str, item["Key"])
                if key.endswith("/") and int(item["Size"]) == 0:
                    continue
                relative = key[len(prefix) :]
                if limit is None:
                    # A key under the prefix becomes a file name: no `..` may leave the folder.
                    safe_relative_path(relative, f"s3://{bucket}/{key}")
                obj = S3Object(
                    self.endpoint, bucket, key, int(item["Size"]), strip_etag(item["ETag"])
                )
                found.append((PurePosixPath(relative), obj))
            token = page.get("NextContinuationToken")
            if limit or not page.get("IsTruncated") or not token:
                break
        if not found and limit is None:
            raise NoSuchKey(f"no objects under s3://{bucket}/{prefix} at {self.endpoint}")
        return found

    def download(self, obj: S3Object, sink: Sink, progress: Progress | None = None) -> FetchStats:
        """Every byte of `obj` (as its ETag names it) into `sink`."""
        return self._downloader.fetch(_S3Ranges(self._client, obj), sink, progress)

    def read(self, obj: S3Object, byte_range: ByteRange) -> bytearray:
        """One range of `obj` (as its ETag names it) into memory."""
        return self._downloader.read(_S3Ranges(self._client, obj), byte_range)

    def _retrying(self, attempt: Callable[[], Any], where: _Where) -> Any:
        return with_retries(
            attempt, self.options.retry, where.classify, where.exhausted, sleep=self._sleep
        )


class _Missing(StorageError):
    """A 404 without a code (a HEAD): the caller finds out which of bucket and key is missing."""


@dataclass(frozen=True, slots=True)
class _Where:
    """The object (or prefix) a request was about, for reading its failures."""

    endpoint: str
    bucket: str
    key: str
    etag: str | None = None

    @property
    def name(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def classify(self, exc: Exception) -> StorageError | Transient:
        from botocore import exceptions as bx

        if isinstance(exc, bx.ClientError):
            return self._client_error(exc.response)
        if isinstance(exc, bx.NoCredentialsError):
            return AccessDenied(
                f"no AWS credentials for {self.name} at {self.endpoint}: set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY, or awsAnonymousCredential=true for a public bucket"
            )
        if isinstance(exc, bx.SSLError):
            return DownloadFailed(
                f"TLS error talking to {self.endpoint} for {self.name}: {_short(exc)} "
                "(AWS_CA_BUNDLE names a CA bundle; S3_VERIFY_SSL=0 turns checking off)"
            )
        if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError):
            return Transient(_short(exc), unreachable=True)
        if isinstance(exc, bx.BotoCoreError | OSError):
            # Read timeouts, connections closed mid-body, incomplete reads.
            return Transient(_short(exc))
        name = type(exc).__name__
        if "Protocol" in name or "Connection" in name or "Timeout" in name:
            # urllib3's errors, when botocore lets one through unwrapped.
            return Transient(_short(exc))
        return DownloadFailed(f"{self.name} at {self.endpoint}: {name}: {_short(exc)}")

    def _client_error(self, response: dict[str, Any]) -> StorageError | Transient:
        error = response.get("Error", {})
        code = str(error.get("Code", ""))
        status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = str(error.get("Message", "")).strip()
        if code == "NoSuchBucket":
            return NoSuchBucket(f"no such bucket '{self.bucket}' at {self.endpoint}")
        if code == "NoSuchKey":
            return NoSuchKey(
                f"no such key '{self.key}' in bucket '{self.bucket}' at {self.endpoint}"
            )
        if status == 404:
            return _Missing(f"{self.name}: not found")
        if status == 412 or code == "PreconditionFailed":
            return self.changed()
        if status == 416 or code == "InvalidRange":
            return self.changed()
        if status == 403 or code in _DENIED:
            detail = f"{code}: {message}" if message else code or "HTTP 403"
            return AccessDenied(
                f"access denied to {self.name} at {self.endpoint} ({detail}); check "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the bucket policy"
            )
        if status in (301, 307) or code in ("PermanentRedirect", "AuthorizationHeaderMalformed"):
            return DownloadFailed(
                f"bucket '{self.bucket}' is not served by {self.endpoint} in region as set "
                f"({code or status}); set AWS_DEFAULT_REGION to the bucket's region"
            )
        if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
            throttled = code in _THROTTLED or status in (429, 503)
            return Transient(f"HTTP {status} {code}".strip(), throttled=throttled)
        return DownloadFailed(f"{self.name} at {self.endpoint}: HTTP {status} {code} {message}")

    def changed(self) -> ObjectChanged:
        return ObjectChanged(
            f"{self.name} at {self.endpoint} changed during download (ETag was {self.etag}); "
            "pull again"
        )

    def exhausted(self, failure: Transient, attempts: int) -> StorageError:
        if failure.unreachable:
            return EndpointUnreachable(
                f"cannot reach S3 endpoint {self.endpoint} for {self.name} after {attempts} "
                f"attempts: {failure.reason}"
            )
        return DownloadFailed(
            f"{self.name} at {self.endpoint} failed after {attempts} attempts: {failure.reason}"
        )


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


class _S3Ranges:
    """`RangeSource` for one S3 object version."""

    def __init__(self, client: Any, obj: S3Object) -> None:
        self._client = client
        self._obj = obj
        self._where = _Where(obj.endpoint, obj.bucket, obj.key, obj.etag)

    @property
    def size(self) -> int:
        return self._obj.size

    def open_range(self, byte_range: ByteRange) -> RangeBody:
        obj = self._obj
        reply = self._client.get_object(
            Bucket=obj.bucket, Key=obj.key, Range=byte_range.header(), IfMatch=f'"{obj.etag}"'
        )
        body = reply["Body"]
        try:
            self._check(reply, byte_range)
        except BaseException:
            body.close()
            raise
        return cast(RangeBody, body)

    def _check(self, reply: dict[str, Any], byte_range: ByteRange) -> None:
        etag = reply.get("ETag")
        if etag is not None and strip_etag(etag) != self._obj.etag:
            raise self._where.changed()
        match = _CONTENT_RANGE.fullmatch(str(reply.get("ContentRange", "")))
        if match is None:
            if byte_range.start == 0 and len(byte_range) == self._obj.size:
                return  # the whole object, answered without a Content-Range: fine
            raise DownloadFailed(
                f"{self._obj} at {self._obj.endpoint}: the server ignored the Range header"
            )
        first, last, total = match.groups()
        if total != "*" and int(total) != self._obj.size:
            raise self._where.changed()
        if int(first) != byte_range.start or int(last) != byte_range.end - 1:
            raise DownloadFailed(
                f"{self._obj} at {self._obj.endpoint}: asked for {byte_range.header()}, "
                f"got bytes {first}-{last}"
            )

    def classify(self, exc: Exception) -> StorageError | Transient:
        return self._where.classify(exc)

    def exhausted(self, failure: Transient, attempts: int) -> StorageError:
        return self._where.exhausted(failure, attempts)
