import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@pytest.fixture
def image_server():
    """A real HTTP server on 127.0.0.1 (see tests/httpserver.py)."""
    from tests.httpserver import ImageServer

    with ImageServer(slow_seconds=1.5) as server:
        yield server


@pytest.fixture
def cli_env():
    """Environment for running `python -m pipelines.cli` in a subprocess from the repo root."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
