"""A real SFTP server on localhost for tests: asyncssh's SFTP server, one process per test session,
serving a temporary folder as its root, reached by fsspec's SFTP file system (paramiko) as users'
code reaches a lab's storage server over SSH. The client finds its password in
``$FSSPEC_SFTP_PASSWORD``, one of fsspec's own environment variables.

Run as a script, this file is the server: ``python tests/sftp.py PORT ROOT PASSWORD``.
"""

from __future__ import annotations

import importlib.util
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

#: The one user's name and password (the server accepts any name with this password).
USER = "tester"
PASSWORD = "sftp-test-password"


def answers_ssh(port: int) -> bool:
    """Whether an SSH server sends its banner on ``port`` now."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as connection:
            return connection.recv(8).startswith(b"SSH-")
    except OSError:
        return False


def start_server(folder: Path) -> Iterator[str]:
    """Start the server on a fresh root under ``folder``; yield ``sftp://USER@127.0.0.1:PORT``
    with the environment pointing fsspec at it (password, no key files); stop it."""
    import pytest

    from tests.servers import free_port, serve

    if importlib.util.find_spec("asyncssh") is None or importlib.util.find_spec("paramiko") is None:
        pytest.skip("asyncssh or paramiko is not installed: make test installs them (.[dev])")
    root = folder / "root"
    root.mkdir()
    port = free_port()
    yield from serve(
        [sys.executable, __file__, str(port), str(root), PASSWORD],
        url=f"sftp://{USER}@127.0.0.1:{port}",
        probe="",
        ready=lambda: answers_ssh(port),
        log_path=folder / "sftp-server.log",
        what="SFTP server",
        point_at_it={"FSSPEC_SFTP_PASSWORD": PASSWORD, "FSSPEC_SFTP_LOOK_FOR_KEYS": "false"},
    )


def new_folder(url: str, below: str = "") -> str:
    """A fresh, empty folder on the server at ``url`` (with ``below``, that path inside it,
    created too); its ``sftp://`` URI."""
    from runstore.bucket import Bucket
    from runstore.filesystem import make_folders

    uri = f"{url}/t-{uuid.uuid4().hex[:12]}" + (f"/{below}" if below else "")
    bucket = Bucket(uri)
    make_folders(bucket.client, bucket._path())
    return uri


def _serve(port: int, root: str, password: str) -> None:
    import asyncio

    import asyncssh

    class Server(asyncssh.SSHServer):
        def begin_auth(self, username: str) -> bool:
            return True  # every user must authenticate

        def password_auth_supported(self) -> bool:
            return True

        def validate_password(self, username: str, given: str) -> bool:
            return given == password

    async def main() -> None:
        await asyncssh.listen(
            "127.0.0.1",
            port,
            server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
            server_factory=Server,
            sftp_factory=lambda channel: asyncssh.SFTPServer(channel, chroot=root),
            allow_scp=False,
        )
        await asyncio.Event().wait()

    asyncio.run(main())


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], sys.argv[3])
