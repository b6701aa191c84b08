"""Shared fixtures: the real ComfyUI test host (one server for the whole session)."""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from host.provision import comfyui_path  # noqa: E402
from host.server import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A real ComfyUI server with this pack in its custom_nodes (see tests/host/server.py)."""
    server = ComfyServer(comfyui_path(), REPO, tmp_path_factory.mktemp("comfy"))
    server.start()
    yield server
    server.stop()
