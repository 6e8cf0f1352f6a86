"""Shared test fixtures: the anyio backend and paths to the example servers and npm peers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PEERS = ROOT / ".peers" / "node_modules"
PYTHON = sys.executable


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
