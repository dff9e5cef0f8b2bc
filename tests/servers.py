"""Real server processes the tests start on localhost (MLflow, the S3, GCS, Azure and SFTP
servers): a free port, a wait until a server answers, a server's whole life (:func:`serve`), and
the MLflow server itself."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

#: How long a server may take to answer: seconds on a quiet machine, a minute or more on a loaded
#: 2-core one; the wait ends as soon as it answers.
SERVER_DEADLINE_S = 300


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def answers(url: str, status: int = 200) -> bool:
    """Whether ``url`` answers with ``status`` now."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == status
    except urllib.error.HTTPError as error:
        return error.code == status
    except (OSError, urllib.error.URLError):
        return False


def wait_until_answering(
    server: subprocess.Popen,
    url: str,
    log: Path,
    what: str,
    status: int = 200,
    *,
    ready: Callable[[], bool] | None = None,
) -> None:
    """Poll ``url`` until it answers with ``status`` (or ``ready()`` until it is true, for a
    server that speaks no HTTP); fail with the end of ``log`` when ``server`` exits first or
    :data:`SERVER_DEADLINE_S` runs out."""
    started = time.monotonic()
    while not (ready() if ready is not None else answers(url, status)):
        if server.poll() is not None:
            raise AssertionError(f"{what} exited:\n{log.read_text()[-3000:]}")
        if time.monotonic() - started > SERVER_DEADLINE_S:
            raise AssertionError(
                f"{what} did not answer in {SERVER_DEADLINE_S} s:\n{log.read_text()[-3000:]}"
            )
        time.sleep(0.3)


def serve(
    command: list[str],
    *,
    url: str,
    probe: str,
    log_path: Path,
    what: str,
    point_at_it: dict[str, str],
    environment: dict[str, str] | None = None,
    probe_status: int = 200,
    ready: Callable[[], bool] | None = None,
) -> Iterator[str]:
    """Run a server process; yield ``url`` once ``url + probe`` answers (with ``probe_status``),
    or ``ready()`` is true, with ``point_at_it`` set in this process's environment meanwhile
    (restored after); stop it.

    ``environment``: the server's own, when not this process's.
    """
    log = log_path.open("wb")
    server = subprocess.Popen(
        command, stdout=log, stderr=log, start_new_session=True, env=environment
    )
    saved = {key: os.environ.get(key) for key in point_at_it}
    try:
        wait_until_answering(server, f"{url}{probe}", log_path, what, probe_status, ready=ready)
        os.environ.update(point_at_it)
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


class MlflowServer:
    """A real ``mlflow server`` process (SQLite backend, artifacts in ``folder``).

    Started on construction without waiting, so its start-up (15-25 s on a loaded 2-core machine:
    MLflow creates its tables, then starts a web worker that imports MLflow again) can overlap
    other tests; :meth:`url` waits until it answers.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.log_path = folder / "server.log"
        self._log = self.log_path.open("wb")
        command = [
            *(sys.executable, "-m", "mlflow", "server"),
            *("--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"),
            *("--default-artifact-root", str(folder / "artifacts")),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"),
        ]
        # MLflow's job runner (three queue consumers for its server-side jobs, which no test
        # uses) would poll for the whole session, a quarter of a core on a 2-core machine.
        environment = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        # Its own process group: the server's workers end with it at stop().
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=self._log, start_new_session=True, env=environment
        )
        self._answered = False

    def url(self) -> str:
        """The tracking URI, once the server answers."""
        address = f"http://127.0.0.1:{self.port}"
        if not self._answered:
            wait_until_answering(self.process, f"{address}/health", self.log_path, "mlflow server")
            self._answered = True
        return address

    def stop(self) -> None:
        # Its database and artifacts are thrown away, and it takes many seconds to shut down
        # gracefully: the whole group is killed at once.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self._log.close()
