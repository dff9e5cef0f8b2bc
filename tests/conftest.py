"""Test-wide settings: nothing downloads and nothing is written outside a temporary folder."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests import azure, gcs, s3, sftp
from tests.servers import MlflowServer

_SESSION_ROOT = tempfile.mkdtemp(prefix="diffcom-tests-")
# Set before any test module imports pykeen or transformers: both read these at import time.
os.environ.setdefault("PYSTOW_HOME", os.path.join(_SESSION_ROOT, "pystow"))
os.environ["DIFFCOM_CACHE_DIR"] = os.path.join(_SESSION_ROOT, "cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture
def cache_dir(tmp_path):
    """A fresh cache folder for one test."""
    folder = tmp_path / "cache"
    folder.mkdir()
    return folder


# The storage servers on localhost (tests/s3.py, gcs.py, azure.py, sftp.py), each started when a
# test first asks and kept for the session (tests make their own buckets and folders on it); each
# fixture's value is the server's URL, with the environment pointing at it from then on.


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    yield from s3.start_server(tmp_path_factory.mktemp("s3"))


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    yield from gcs.start_server(tmp_path_factory.mktemp("gcs"))


@pytest.fixture(scope="session")
def azurite(tmp_path_factory):
    yield from azure.start_server(tmp_path_factory.mktemp("azurite"))


@pytest.fixture(scope="session")
def sftp_server(tmp_path_factory):
    yield from sftp.start_server(tmp_path_factory.mktemp("sftp"))


#: The session's one MLflow server, started when collection finds a test that needs it.
_MLFLOW: list[MlflowServer] = []


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the MLflow server as soon as the collected tests are known to need one, without
    waiting for it: its start-up then overlaps the tests that run before the first user."""
    wanted = any("mlflow_server" in getattr(item, "fixturenames", ()) for item in session.items)
    if wanted and importlib.util.find_spec("mlflow") is not None:
        _MLFLOW.append(MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-", dir=_SESSION_ROOT))))


def pytest_sessionfinish(session: pytest.Session) -> None:
    while _MLFLOW:
        server = _MLFLOW.pop()
        server.stop()
        shutil.rmtree(server.folder, ignore_errors=True)


@pytest.fixture(scope="session")
def mlflow_server() -> str:
    """The URI of a real MLflow tracking server (SQLite backend in a temporary folder), one for
    the whole session. Tests that share it name their MLflow experiments apart."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed: pip install -e '.[tracking]' (make test installs it)")
    if not _MLFLOW:  # collected without it (a plugin added the fixture later): start it now
        _MLFLOW.append(MlflowServer(Path(tempfile.mkdtemp(prefix="mlflow-", dir=_SESSION_ROOT))))
    return _MLFLOW[0].url()
