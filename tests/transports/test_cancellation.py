"""A call abandoned by its deadline or by its caller reaches the server as `notifications/cancelled`, on stdio
and streamable HTTP, in both protocol eras: the server's slow tool records its own cancellation.

The SDK sends the notification itself (its request timeout and a cancelled caller both do); these tests hold
it to that through `Connection.call_tool`, whose backstop and the executor's deadline are cancellations too.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest

from tests.conftest import EXAMPLES, PYTHON
from tests.transports.conftest import listening_script
from transports import Connection, HttpTarget, StdioTarget
from transports.connection import connect
from transports.errors import CallTimeout

pytestmark = pytest.mark.anyio

NOTIFY = str(EXAMPLES / "servers" / "notify_server.py")
SETUPS = ["stdio", "stdio-legacy", "http", "http-legacy"]


@pytest.fixture(scope="module")
def http_urls() -> Iterator[dict[str, str]]:
    http = ("--transport", "http")
    with (
        listening_script(NOTIFY, *http) as (_, modern),
        listening_script(NOTIFY, *http, "--legacy") as (_, legacy),
    ):
        yield {"http": modern, "http-legacy": legacy}


@asynccontextmanager
async def session(setup: str, urls: dict[str, str]) -> AsyncIterator[Connection]:
    if setup.startswith("stdio"):
        target: StdioTarget | HttpTarget = StdioTarget(
            command=PYTHON, args=(NOTIFY, "--legacy") if setup == "stdio-legacy" else (NOTIFY,)
        )
    else:
        target = HttpTarget(urls[setup])
    async with connect(target, startup_timeout=20.0) as conn:
        assert (conn.protocol_version == "2025-11-25") == setup.endswith("legacy")
        yield conn


async def marked(marker: Path, word: str, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    """Until the server wrote `word` to the marker file (another process: polled)."""
    path = anyio.Path(marker)
    with anyio.fail_after(timeout):
        while not await path.exists() or word not in await path.read_text():  # noqa: ASYNC110
            await anyio.sleep(0.02)


@pytest.mark.parametrize("setup", SETUPS)
async def test_a_call_past_its_deadline_is_cancelled_on_the_server(
    setup: str, http_urls: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "slow.txt"
    async with session(setup, http_urls) as conn:
        with pytest.raises(CallTimeout):
            await conn.call_tool("slow", {"seconds": 30, "marker": str(marker)}, timeout=0.5)
        await marked(marker, "cancelled")
        assert "finished" not in marker.read_text()
        # The session is fine afterwards.
        assert (
            await conn.call_tool("slow", {"seconds": 0, "marker": str(marker)}, timeout=5)
        ).is_error is False


@pytest.mark.parametrize("setup", SETUPS)
async def test_a_call_whose_caller_goes_away_is_cancelled_on_the_server(
    setup: str, http_urls: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "slow.txt"
    async with session(setup, http_urls) as conn:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(conn.call_tool, timeout=60), "slow", {"seconds": 30, "marker": str(marker)}
            )
            await marked(marker, "started")
            tg.cancel_scope.cancel()  # the caller goes away (an agent run stopped, a client disconnected)
        await marked(marker, "cancelled")
        assert "finished" not in marker.read_text()
