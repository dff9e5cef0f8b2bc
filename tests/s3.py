"""A real S3-compatible server on localhost for tests: moto's standalone server (``moto[server]``),
one process per test module, reached over HTTP by the same boto3 and pyarrow clients users run
against AWS. Nothing is patched in-process."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, wait_until_answering

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
    log = (folder / "s3-server.log").open("wb")
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    environment = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if require_auth else {})}
    server = subprocess.Popen(
        command, stdout=log, stderr=log, start_new_session=True, env=environment
    )
    url = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    try:
        wait_until_answering(server, f"{url}/moto-api/", folder / "s3-server.log", "S3 server")
        os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL=url)
        yield url
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def new_bucket() -> str:
    """A fresh, empty bucket on the server the environment points at; its name."""
    import boto3

    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name
