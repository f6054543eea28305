from __future__ import annotations

import pytest
from botocore import UNSIGNED

from ember.server.storage.errors import BadSetting
from ember.server.storage.settings import S3Settings


def test_defaults_are_kserves() -> None:
    s = S3Settings.from_env({})
    assert s.endpoint_url is None
    assert s.endpoint == "https://s3.amazonaws.com"
    assert s.region is None
    assert s.verify is True
    assert not s.anonymous
    assert s.addressing_style == "auto"
    assert (s.connect_timeout, s.read_timeout, s.max_attempts) == (15.0, 30.0, 3)


def test_aws_endpoint_url_wins_and_means_path_style() -> None:
    s = S3Settings.from_env(
        {"AWS_ENDPOINT_URL": "http://minio:9000/", "S3_ENDPOINT": "other:1", "S3_USE_HTTPS": "0"}
    )
    assert s.endpoint_url == "http://minio:9000"
    assert s.addressing_style == "path"


@pytest.mark.parametrize(
    ("use_https", "expected"),
    [(None, "https://minio:9000"), ("1", "https://minio:9000"), ("0", "http://minio:9000"),
     ("false", "http://minio:9000"), ("true", "https://minio:9000")],
)  # fmt: skip
def test_s3_endpoint_and_use_https(use_https: str | None, expected: str) -> None:
    env = {"S3_ENDPOINT": "minio:9000"}
    if use_https is not None:
        env["S3_USE_HTTPS"] = use_https
    assert S3Settings.from_env(env).endpoint_url == expected


def test_s3_endpoint_with_scheme_is_kept() -> None:
    assert S3Settings.from_env({"S3_ENDPOINT": "http://x:1"}).endpoint_url == "http://x:1"


@pytest.mark.parametrize(
    ("env", "verify"),
    [
        ({}, True),
        ({"S3_VERIFY_SSL": "0"}, False),
        ({"S3_VERIFY_SSL": "false"}, False),
        ({"S3_VERIFY_SSL": "False"}, False),
        ({"S3_VERIFY_SSL": "1"}, True),
        ({"AWS_CA_BUNDLE": "/etc/ssl/ca.pem"}, "/etc/ssl/ca.pem"),
        ({"AWS_CA_BUNDLE": "/etc/ssl/ca.pem", "S3_VERIFY_SSL": "0"}, False),
    ],
)
def test_verify(env: dict[str, str], verify: bool | str) -> None:
    assert S3Settings.from_env(env).verify == verify


def test_region_prefers_aws_default_region() -> None:
    assert S3Settings.from_env({"AWS_DEFAULT_REGION": "eu-west-1"}).region == "eu-west-1"
    assert S3Settings.from_env({"AWS_REGION": "eu-west-2"}).region == "eu-west-2"
    both = {"AWS_DEFAULT_REGION": "eu-west-1", "AWS_REGION": "eu-west-2"}
    assert S3Settings.from_env(both).region == "eu-west-1"


def test_anonymous_and_virtual_buckets() -> None:
    s = S3Settings.from_env(
        {"awsAnonymousCredential": "true", "S3_USER_VIRTUAL_BUCKET": "true", "S3_ENDPOINT": "h"}
    )
    assert s.anonymous
    assert s.addressing_style == "virtual"
    assert S3Settings.from_env({"awsAnonymousCredential": "false"}).anonymous is False


def test_credentials_are_read_but_never_shown() -> None:
    s = S3Settings.from_env(
        {"AWS_ACCESS_KEY_ID": "AKIDSECRETISH", "AWS_SECRET_ACCESS_KEY": "topsecret"}
    )
    assert s.access_key_id == "AKIDSECRETISH"
    assert s.secret_access_key == "topsecret"
    assert "topsecret" not in repr(s)
    assert "AKIDSECRETISH" not in repr(s)


def test_timeouts_and_attempts() -> None:
    s = S3Settings.from_env(
        {"S3_CONNECT_TIMEOUT": "2", "S3_READ_TIMEOUT": "4.5", "S3_MAX_ATTEMPTS": "7"}
    )
    assert (s.connect_timeout, s.read_timeout, s.max_attempts) == (2.0, 4.5, 7)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("S3_CONNECT_TIMEOUT", "soon", "expected a number"),
     ("S3_READ_TIMEOUT", "0", "must be at least"),
     ("S3_MAX_ATTEMPTS", "0", "must be at least 1")],
)  # fmt: skip
def test_bad_numbers(name: str, value: str, message: str) -> None:
    with pytest.raises(BadSetting, match=f"{name}='{value}': {message}"):
        S3Settings.from_env({name: value})


def test_botocore_config() -> None:
    s = S3Settings.from_env({"AWS_ENDPOINT_URL": "http://h:1", "S3_READ_TIMEOUT": "9"})
    config = s.botocore_config(max_pool_connections=32)
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.max_pool_connections == 32
    assert config.s3 == {"addressing_style": "path"}
    assert config.read_timeout == 9.0
    assert config.connect_timeout == 15.0
    # Our retries only: botocore's would multiply them.
    assert config.retries["total_max_attempts"] == 1
    assert config.signature_version is None
    # Never below botocore's own pool size.
    assert s.botocore_config(max_pool_connections=4).max_pool_connections == 10


def test_anonymous_requests_are_unsigned() -> None:
    s = S3Settings.from_env({"awsAnonymousCredential": "true"})
    assert s.botocore_config(10).signature_version is UNSIGNED


def test_client_uses_the_settings() -> None:
    s = S3Settings.from_env(
        {
            "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "secret",
            "AWS_DEFAULT_REGION": "eu-central-1",
        }
    )
    client = s.client(max_pool_connections=24)
    try:
        assert client.meta.endpoint_url == "http://127.0.0.1:9"
        assert client.meta.region_name == "eu-central-1"
        assert client.meta.config.max_pool_connections == 24
        assert client._request_signer._credentials.access_key == "AKIAEXAMPLE"
    finally:
        client.close()
