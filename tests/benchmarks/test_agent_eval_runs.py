"""A handful of the suite's tasks run end to end, as `python -m benchmarks.agent_eval` runs them: plain
`mcpServers` configs over the real servers (the time server with its frozen clock, server-filesystem,
server-everything, server-memory), the packaged SmolLM2 on our engine, a guided run with its defaults, and the
suite's own checkers on the answer and the resulting state."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from benchmarks.agent_eval import close_ours, judge, load_ours, load_tasks, prepare, run_ours
from tests.conftest import PEERS

NPM_SERVERS = ("server-everything", "server-filesystem", "server-memory")  # the tasks below need these
pytestmark = [
    pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed"),
    pytest.mark.skipif(
        not all((PEERS / "@modelcontextprotocol" / s).is_dir() for s in NPM_SERVERS),
        reason="run `make peers` first",
    ),
]

TASKS = {t.id: t for t in load_tasks()}


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
async def ours() -> AsyncIterator[Any]:
    logging = structlog.get_config()  # load_ours configures logging for the suite: restored for later tests
    shared = await load_ours("float32")
    try:
        yield shared
    finally:
        await close_ours(shared)
        structlog.configure(**logging)


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("task_id", "mode"),
    [
        ("time-tokyo", "all"),  # one tool among 50: routing, a grounded IANA zone, the value copied back
        ("convert-ny-tokyo", "single"),  # source and target zones in the task's order, a clock time
        ("fs-write-hello", "single"),  # a path inside the allowed folder, the content, the file on disk
        ("memory-acme-city", "single"),  # a read of the knowledge graph
        (
            "csv-furniture",
            "single",
        ),  # a file tool for a file path, the CSV row that fits quoted in the answer
        ("multi-sum-prices", "single"),  # a question planned across two servers, one number per argument
    ],
)
async def test_suite_task_is_solved(task_id: str, mode: str, tmp_path: Path, ours: Any) -> None:
    task = TASKS[task_id]
    fx, config, text = prepare(task, mode, tmp_path)
    run = await run_ours(ours, config, text, max_steps=4, max_tokens=256, seconds=120)
    verdict = judge(task, fx, run, "ours", mode)
    assert verdict.success, (verdict.reason, run.answer, run.calls, run.model_texts, run.error)
    assert verdict.tool_ok
    # the run's later steps were served from the prefix cache up to the previous step's end
    assert run.steps >= 2 and run.cached_tokens > 0
