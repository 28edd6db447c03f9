"""Real servers for tests, as pytest fixtures (loaded by ``tests/conftest.py`` through ``pytest_plugins``).

Each server starts once per session, on a free loopback port; every test gets a fresh, private part
of it. Tests that need a server's client libraries are skipped, with the extra to install, where
they are missing.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

# --- S3 (moto server mode)
S3_SKIP = "S3 tests need moto[server], boto3 and s3fs: pip install 'umig[server]'"
# Variables that could point boto at a real account, profile or config instead of the test server.
_AWS_OVERRIDES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_REGION",
                  "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE", "AWS_CA_BUNDLE")


def need_s3() -> None:
    """Skip the calling test unless the S3 client and test-server libraries are installed."""
    for module in ("moto.server", "boto3", "s3fs"):
        pytest.importorskip(module, reason=S3_SKIP)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """A moto S3 server in this process (its own thread) on 127.0.0.1; yields its endpoint URL."""
    need_s3()
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_test_env(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    """The standard AWS variables for a test server: dummy keys, us-east-1, ``endpoint``; nothing read
    from the developer's ~/.aws and no instance-metadata lookups."""
    for name in _AWS_OVERRIDES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/umig-test-aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/umig-test-aws-credentials")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture
def s3_url(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``s3://<fresh bucket>/umig`` on the test server, with the AWS variables set to reach it."""
    import boto3

    aws_test_env(monkeypatch, s3_server)
    bucket = f"umig-test-{uuid.uuid4().hex[:16]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    yield f"s3://{bucket}/umig"
