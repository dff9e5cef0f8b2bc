"""A real S3-compatible server on localhost for tests: moto's standalone server (``moto[server]``),
one process per test module, reached over HTTP by the same boto3 and pyarrow clients users run
against AWS. Nothing is patched in-process."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

#: How long the server may take to answer: seconds on a quiet machine, far more on a loaded
#: 2-core one; the wait ends as soon as it answers.
SERVER_DEADLINE_S = 300

#: What every client (this process, Ray's workers, pyarrow in Ray Tune) needs to reach the server.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/moto-api/", timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def start_server(folder: Path, *, require_auth: bool = False) -> Iterator[str]:
    """Start the server, yield its endpoint URL with the environment pointing at it, stop it.

    ``require_auth``: the server checks credentials (moto's IAM mode), so the test ones are
    refused: a bucket that denies access.
    """
    if importlib.util.find_spec("moto") is None:
        pytest.skip("moto[server] is not installed: make test installs it (.[dev])")
    port = _free_port()
    log = (folder / "s3-server.log").open("wb")
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    environment = {**os.environ, **({"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if require_auth else {})}
    server = subprocess.Popen(
        command, stdout=log, stderr=log, start_new_session=True, env=environment
    )
    url = f"http://127.0.0.1:{port}"
    saved = {key: os.environ.get(key) for key in (*CREDENTIALS, "AWS_ENDPOINT_URL")}
    try:
        started = time.monotonic()
        while not _answers(url):
            if server.poll() is not None:
                raise AssertionError(f"S3 server exited:\n{(folder / 's3-server.log').read_text()}")
            if time.monotonic() - started > SERVER_DEADLINE_S:
                raise AssertionError(f"S3 server did not answer in {SERVER_DEADLINE_S} s")
            time.sleep(0.3)
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
