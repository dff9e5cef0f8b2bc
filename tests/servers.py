"""Real server processes the tests start on localhost (MLflow, the S3 server): a free port, and
a wait until the server answers."""

from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

#: How long a server may take to answer: seconds on a quiet machine, a minute or more on a loaded
#: 2-core one; the wait ends as soon as it answers.
SERVER_DEADLINE_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str) -> bool:
    """Whether ``url`` answers 200 now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (OSError, urllib.error.URLError):
        return False


def wait_until_answering(server: subprocess.Popen, url: str, log: Path, what: str) -> None:
    """Poll ``url`` until it answers; fail with the end of ``log`` when ``server`` exits first
    or :data:`SERVER_DEADLINE_S` runs out."""
    started = time.monotonic()
    while not answers(url):
        if server.poll() is not None:
            raise AssertionError(f"{what} exited:\n{log.read_text()[-3000:]}")
        if time.monotonic() - started > SERVER_DEADLINE_S:
            raise AssertionError(
                f"{what} did not answer in {SERVER_DEADLINE_S} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.3)
