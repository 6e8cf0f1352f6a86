"""Fixtures shared by the agent_runtime tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(scope="session")
def serving_engine() -> Iterator[Any]:
    """The serving tests' engine (test_app, test_agents, test_openai_backend take it as their `engine`): the
    packaged SmolLM2 at the default dtype behind the async front, started once. It lives here, not in a test
    module: a fixture imported into another module is a second fixture, and a session-scoped one would load the
    model again for each importer."""
    from inference.async_engine import AsyncEngine
    from inference.config import EngineConfig

    config = EngineConfig(kv_cache_memory=192 * 2**20, max_model_len=2048, max_num_seqs=64)
    eng = AsyncEngine.from_model("smollm2-135m-instruct", config)
    yield eng
    eng.close()
