"""A real S3-compatible server on localhost for tests: moto's standalone server (``moto[server]``),
one process per test session, reached over HTTP by the same boto3 and pyarrow clients users run
against AWS. Nothing is patched in-process."""

from __future__ import annotations

import importlib.util
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, serve

#: What every client (this process, Ray's workers, pyarrow in Ray Tune) needs to reach the server.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def start_server(folder: Path, *, require_auth: bool = False) -> Iterator[str]:
    """Start the server, yield its endpoint URL with the environment pointing at it, stop it.

    ``require_auth``: the server checks credentials (moto's IAM mode), so the test ones are
    refused: a bucket that denies access.
    """
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed: make test installs it (.[dev])")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    yield from serve(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        url=url,
        probe="/moto-api/",
        log_path=folder / "s3-server.log",
        what="S3 server",
        point_at_it={**CREDENTIALS, "AWS_ENDPOINT_URL": url},
        environment={
            **os.environ,
            **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if require_auth else {}),
        },
    )


def new_bucket() -> str:
    """A fresh, empty bucket on the server the environment points at; its name."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
