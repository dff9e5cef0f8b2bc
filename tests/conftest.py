"""Test-wide settings: nothing downloads and nothing is written outside a temporary folder."""

from __future__ import annotations

import os
import tempfile

import pytest

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
