"""A real Azure Blob Storage server on localhost for tests: Azurite, Microsoft's own emulator (an
npm package: ``make test`` installs it into ``.venv/azurite``), one process per test session,
reached over HTTP by azure-storage-blob and pyarrow's AzureFileSystem through
``$AZURE_STORAGE_CONNECTION_STRING``, as users' code reaches Azure. Azurite enforces
``If-None-Match`` and ``If-Match`` on uploads, which leases rely on.
"""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import free_port, serve

#: Azurite's one account and its key, the same in every copy of the emulator (Microsoft's
#: documentation prints them).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def connection_string(url: str, key: str = KEY) -> str:
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={url}/{ACCOUNT};"
    )


def azurite() -> str | None:
    """The ``azurite-blob`` command: the one ``make`` installs beside the virtual environment's
    Python, else one on the PATH."""
    installed = Path(sys.prefix) / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    return str(installed) if installed.exists() else shutil.which("azurite-blob")


def start_server(folder: Path) -> Iterator[str]:
    """Start Azurite's Blob service, yield its URL with the connection string pointing at it,
    stop it."""
    command = azurite()
    if command is None:
        pytest.skip("Azurite is not installed: make test installs it (npm, into .venv/azurite)")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    yield from serve(
        [
            *(command, "--blobHost", "127.0.0.1", "--blobPort", str(port)),
            # In memory, nothing sent anywhere, every request accepted that Azure accepts.
            *("--inMemoryPersistence", "--disableTelemetry", "--silent", "--loose"),
            "--skipApiVersionCheck",
        ],
        url=url,
        probe="/",
        probe_status=400,  # the root names no account: Azurite is up and answering
        log_path=folder / "azurite.log",
        what="Azurite",
        point_at_it={"AZURE_STORAGE_CONNECTION_STRING": connection_string(url)},
    )


def new_container() -> str:
    """A fresh, empty container on the server the environment points at; its name."""
    from runstore.bucket import AzureAccount

    name = f"t-{uuid.uuid4().hex[:12]}"
    AzureAccount.from_environment().client().create_container(name)
    return name
