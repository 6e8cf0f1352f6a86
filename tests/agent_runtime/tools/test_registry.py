"""The tool registry: namespacing, name validation, collisions kept out, change events."""

from __future__ import annotations

import anyio
import pytest
from mcp.types import Tool

from agent_runtime.tools.registry import RegistryChange, ToolRegistry, valid_tool_name


def tool(name: str, description: str = "", schema: dict | None = None) -> Tool:
    return Tool(name=name, description=description, input_schema=schema or {"type": "object"})


def test_namespaced_lookup_list_and_filter() -> None:
    reg = ToolRegistry()
    reg.set_server_tools("time", "time__", [tool("get_current_time"), tool("convert_time")])
    reg.set_server_tools("fs", "files.", [tool("read")])
    assert [e.name for e in reg.list()] == ["files.read", "time__convert_time", "time__get_current_time"]
    assert [e.name for e in reg.list("fs")] == ["files.read"]
    entry = reg.get("time__get_current_time")
    assert entry is not None
    assert (entry.server, entry.tool_name, entry.definition.name) == (
        "time",
        "get_current_time",
        "get_current_time",
    )
    assert reg.get("get_current_time") is None
    assert "files.read" in reg and len(reg) == 3
    assert reg.count("time") == 2


def test_invalid_names_are_skipped_and_reported_never_mangled() -> None:
    reg = ToolRegistry()
    reg.set_server_tools("s", "s__", [tool("ok"), tool("has space"), tool("slash/y"), tool("x" * 126)])
    assert [e.name for e in reg.list()] == ["s__ok"]
    problems = reg.problems()
    assert {p.tool_name for p in problems} == {"has space", "slash/y", "x" * 126}
    assert all(p.kind == "invalid_name" and p.server == "s" for p in problems)
    # No rewritten variant sneaks in.
    assert not any("has" in e.name or "slash" in e.name for e in reg.list())
    assert valid_tool_name("a" * 128) and not valid_tool_name("a" * 129) and not valid_tool_name("")


def test_collision_keeps_both_out_until_one_leaves() -> None:
    reg = ToolRegistry()
    reg.set_server_tools("a", "x__", [tool("t", "from a"), tool("only_a")])
    reg.set_server_tools("b", "x__", [tool("t", "from b")])
    assert reg.get("x__t") is None  # never silently shadowed by either side
    assert reg.get("x__only_a") is not None
    collisions = [p for p in reg.problems() if p.kind == "collision"]
    assert {(p.name, p.server) for p in collisions} == {("x__t", "a"), ("x__t", "b")}
    assert "a:t" in collisions[0].detail and "b:t" in collisions[0].detail

    reg.remove_server("a")
    entry = reg.get("x__t")
    assert entry is not None and entry.server == "b" and entry.definition.description == "from b"
    assert reg.problems() == []


def test_change_events_report_added_removed_changed() -> None:
    reg = ToolRegistry()
    seen: list[RegistryChange] = []
    unsubscribe = reg.subscribe(seen.append)
    reg.set_server_tools("s", "s__", [tool("a"), tool("b")])
    reg.set_server_tools("s", "s__", [tool("a", "new description"), tool("c")])
    reg.set_server_tools("s", "s__", [tool("a", "new description"), tool("c")])  # no change: no event
    reg.remove_server("s")
    assert [(c.added, c.removed, c.changed) for c in seen] == [
        (("s__a", "s__b"), (), ()),
        (("s__c",), ("s__b",), ("s__a",)),
        ((), ("s__a", "s__c"), ()),
    ]
    assert [c.version for c in seen] == [1, 2, 3] and reg.version == 3
    unsubscribe()
    reg.set_server_tools("s", "s__", [tool("a")])
    assert len(seen) == 3


def test_a_raising_listener_does_not_break_the_others() -> None:
    reg = ToolRegistry()
    seen: list[RegistryChange] = []

    def bad(_: RegistryChange) -> None:
        raise RuntimeError("boom")

    reg.subscribe(bad)
    reg.subscribe(seen.append)
    reg.set_server_tools("s", "s__", [tool("a")])
    assert len(seen) == 1 and reg.get("s__a") is not None


def test_close_matches() -> None:
    reg = ToolRegistry()
    reg.set_server_tools("time", "time__", [tool("get_current_time"), tool("convert_time")])
    assert reg.close_matches("time__get_curent_time")[0] == "time__get_current_time"


@pytest.mark.anyio
async def test_wait_until_wakes_on_change_and_times_out() -> None:
    reg = ToolRegistry()

    async def later() -> None:
        await anyio.wait_all_tasks_blocked()  # the waiter below is asleep in wait_until: the change wakes it
        reg.set_server_tools("s", "s__", [tool("a")])

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        assert await reg.wait_until(lambda r: "s__a" in r, timeout=5)
    with anyio.fail_after(2):
        assert not await reg.wait_until(lambda r: "s__zzz" in r, timeout=0.05)
