"""S3 client settings, read once from the environment KServe's storage initializer uses.

The same variables mean the same thing here, so an InferenceService that worked with KServe's
initializer works with `ember pull`: `AWS_ENDPOINT_URL` (or `S3_ENDPOINT` + `S3_USE_HTTPS`),
`S3_VERIFY_SSL`, `AWS_CA_BUNDLE`, `AWS_DEFAULT_REGION`, `awsAnonymousCredential`,
`S3_USER_VIRTUAL_BUCKET`, `S3_CONNECT_TIMEOUT`, `S3_READ_TIMEOUT`, `S3_MAX_ATTEMPTS`, and the
standard credential chain (`AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN` and
`AWS_PROFILE` from the mapping given; otherwise boto3's own chain: shared files, web identity,
instance metadata).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.server.storage.errors import BadSetting

AWS_DEFAULT_ENDPOINT = "https://s3.amazonaws.com"


def _false(value: str) -> bool:
    return value.strip().lower() in ("0", "false")


def _true(value: str) -> bool:
    return value.strip().lower() in ("1", "true")


def _number(env: Mapping[str, str], name: str, default: float, minimum: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise BadSetting(f"{name}={raw!r}: expected a number") from None
    if value < minimum:
        raise BadSetting(f"{name}={raw!r}: must be at least {minimum:g}")
    return value


def _endpoint(env: Mapping[str, str]) -> str | None:
    if url := env.get("AWS_ENDPOINT_URL", "").strip():
        return url.rstrip("/")
    host = env.get("S3_ENDPOINT", "").strip()
    if not host:
        return None
    if "://" in host:
        return host.rstrip("/")
    # KServe's credential builder turns S3_ENDPOINT into a URL the same way: https unless
    # S3_USE_HTTPS says "0".
    scheme = "http" if _false(env.get("S3_USE_HTTPS", "1")) else "https"
    return f"{scheme}://{host.rstrip('/')}"


@dataclass(frozen=True, slots=True)
class S3Settings:
    """Everything needed to build an S3 client; frozen so one snapshot serves a whole pull."""

    # None: AWS itself (boto3 picks the regional endpoint).
    endpoint_url: str | None = None
    # None: the profile's region if there is one, else us-east-1 (botocore's S3 default).
    region: str | None = None
    # False (no verification), True (system CAs) or a CA bundle path.
    verify: bool | str = True
    # Unsigned requests: public buckets, or servers that accept anonymous reads.
    anonymous: bool = False
    # Custom endpoints get path-style URLs (http://host/bucket/key): most S3-compatible servers
    # (MinIO, Ceph, rclone) have no wildcard DNS for bucket sub-domains.
    virtual_host_style: bool = False
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    profile: str | None = None
    connect_timeout: float = 15.0
    read_timeout: float = 30.0
    # Attempts per request (HEAD, LIST, each range), first try included.
    max_attempts: int = 3

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> S3Settings:
        env = os.environ if env is None else env
        verify: bool | str = True
        if _false(env.get("S3_VERIFY_SSL", "1")):
            verify = False
        elif bundle := env.get("AWS_CA_BUNDLE", "").strip():
            verify = bundle
        region = (
            env.get("AWS_DEFAULT_REGION", "").strip() or env.get("AWS_REGION", "").strip() or None
        )
        return cls(
            endpoint_url=_endpoint(env),
            region=region,
            verify=verify,
            anonymous=_true(env.get("awsAnonymousCredential", "false")),
            virtual_host_style=_true(env.get("S3_USER_VIRTUAL_BUCKET", "false")),
            access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            session_token=env.get("AWS_SESSION_TOKEN") or None,
            profile=env.get("AWS_PROFILE") or None,
            connect_timeout=_number(env, "S3_CONNECT_TIMEOUT", 15.0, 0.001),
            read_timeout=_number(env, "S3_READ_TIMEOUT", 30.0, 0.001),
            max_attempts=int(_number(env, "S3_MAX_ATTEMPTS", 3, 1)),
        )

    @property
    def endpoint(self) -> str:
        """The endpoint as error messages name it."""
        return self.endpoint_url or AWS_DEFAULT_ENDPOINT

    @property
    def addressing_style(self) -> str:
        if self.virtual_host_style:
            return "virtual"
        return "path" if self.endpoint_url else "auto"

    def botocore_config(self, max_pool_connections: int) -> Any:
        """The botocore `Config` for a client serving `max_pool_connections` threads at once."""
        from botocore import UNSIGNED
        from botocore.config import Config

        extra: dict[str, Any] = {"signature_version": UNSIGNED} if self.anonymous else {}
        return Config(
            region_name=self.region,
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            # Retries are ours (`retry.py`), per request and per range, with the same attempt
            # count: botocore's would multiply with them, and botocore cannot retry a body that
            # breaks off mid-stream anyway.
            retries={"total_max_attempts": 1, "mode": "standard"},
            # A pool smaller than the thread count makes threads wait for a connection and
            # botocore warns "Connection pool is full, discarding connection".
            max_pool_connections=max(10, max_pool_connections),
            s3={"addressing_style": self.addressing_style},
            # boto3 >= 1.36 adds CRC32 checksums to requests and validates them on responses;
            # some S3-compatible servers reject the headers, and a ranged GET has no full-object
            # checksum to validate anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            **extra,
        )

    def client(self, max_pool_connections: int = 10) -> Any:
        """A new boto3 S3 client (thread-safe; share one between download threads)."""
        import boto3.session

        session = boto3.session.Session(
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            aws_session_token=self.session_token,
            profile_name=self.profile,
            region_name=self.region,
        )
        return session.client(
            "s3",
            endpoint_url=self.endpoint_url,
            verify=self.verify,
            config=self.botocore_config(max_pool_connections),
        )
