"""Shared test fixtures: the anyio backend, paths to the example servers and npm peers, and the packaged
SmolLM2 loaded once per session."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU the Triton kernels run under the interpreter. This must precede the first import of triton
    # in the process (@triton.jit picks interpreter or compiler then), and test modules that import peft or
    # transformers import triton while they are collected, before any Triton test module runs.
    os.environ["TRITON_INTERPRET"] = "1"

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PEERS = ROOT / ".peers" / "node_modules"
PYTHON = sys.executable


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def smollm2_fp32() -> Any:
    """The packaged SmolLM2 in float32 on the CPU (inference.loader.LoadedModel), loaded once for every test
    that reads it: loading takes seconds, and nothing mutates a float32 model (only bfloat16 weights are packed
    in place), so engines built on it with different EngineConfigs stay independent."""
    from inference.loader import load_model  # torch: only the tests that need the model pay the import

    return load_model("smollm2-135m-instruct", dtype="float32")


def model_cache_env() -> dict[str, str]:
    """Environment for CLI subprocesses that run with a throwaway HOME: the converted-GGUF cache stays the one
    the rest of the suite fills, so each process loads the model instead of converting the GGUF again."""
    from inference import envs  # no torch: the environment-variable module alone

    return {envs.CACHE_DIR: str(envs.cache_dir()), envs.EXAMPLES_DIR: str(envs.examples_dir())}


@pytest.fixture(autouse=True)
def remembered_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Each test's agents remember their calls in its own folder: a run never sees worked examples that an
    earlier test (or the user's own runs) left behind, whatever the order tests run in."""
    folder = tmp_path / "remembered-examples"
    monkeypatch.setenv("AGENT_RUNTIME_EXAMPLES", str(folder))
    return folder


def logged_calls(log: Path, tool: str) -> int:
    """How many `tool` calls a server's --calls-log holds (the demo and faulty servers write one JSON line per
    call as it arrives, before acting on it)."""
    if not log.exists():
        return 0
    return sum(json.loads(line)["tool"] == tool for line in log.read_text().splitlines() if line.strip())


async def wait_for_call(log: Path, tool: str, count: int = 1, timeout: float = 20.0) -> None:  # noqa: ASYNC109
    """Until `count` calls of `tool` have reached the server (its --calls-log says so): polled, as nothing
    crosses the process boundary to wait on."""
    with anyio.fail_after(timeout):
        while logged_calls(log, tool) < count:  # noqa: ASYNC110 - another process writes the log
            await anyio.sleep(0.01)


def wait_for_call_sync(log: Path, tool: str, count: int = 1, timeout: float = 20.0) -> None:
    """`wait_for_call` for tests without an event loop."""
    deadline = time.monotonic() + timeout
    while logged_calls(log, tool) < count:
        assert time.monotonic() < deadline, f"no {tool} call reached the server within {timeout}s"
        time.sleep(0.01)


# -- pytest-xdist (`make test` runs `-n auto --dist loadgroup`; plain `pytest -q` runs serially) ----------------

# Tests that read one of these session fixtures run on the same worker, so it is built once for all of them.
_SHARED_SESSION_FIXTURES = {"smollm2_fp32": "smollm2-fp32", "serving_engine": "serving-engine"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give each test an xdist group: the group of the session fixture it shares, else its module (its module
    fixtures, such as servers started once per module, are then built once too). An explicit
    `pytest.mark.xdist_group` wins. Without xdist the marks do nothing."""
    for item in items:
        if item.get_closest_marker("xdist_group") is not None:
            continue
        used = getattr(item, "fixturenames", ())  # every fixture the test needs, directly or not
        shared = [group for name, group in _SHARED_SESSION_FIXTURES.items() if name in used]
        item.add_marker(pytest.mark.xdist_group(shared[0] if shared else item.nodeid.split("::")[0]))


@pytest.fixture
def torch_kernels() -> Iterator[None]:
    """Quantized layers built in the test run torch's packed int8/int4 kernels, not our own (inference/qgemv.py):
    for tests of torch's layouts."""
    from inference import qgemv

    with qgemv.turned_off():
        yield
