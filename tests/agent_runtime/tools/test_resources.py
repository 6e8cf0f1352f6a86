"""Resources, templates, prompts, completion and subscriptions through `Runtime`, against real servers:
our SDK resources server (both eras) and server-everything over stdio; policies, audit and floods included."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent_runtime.tools.resources import (
    AmbiguousName,
    PromptArgumentError,
    RequestRefused,
    UnknownPrompt,
    UnknownResource,
)
from agent_runtime.tools.runtime import Runtime
from tests.conftest import EXAMPLES, PYTHON
from tests.transports.conftest import EVERYTHING, needs_everything
from transports.errors import CallTimeout, CapabilityMissing, ResourceTooLarge

pytestmark = pytest.mark.anyio

SERVER = str(EXAMPLES / "servers" / "resources_server.py")


def runtime(tmp_path: Path, servers: dict[str, list[str]], policies: dict[str, Any] | None = None) -> Runtime:
    doc: dict[str, Any] = {
        "mcpServers": {
            name: {"command": PYTHON, "args": [SERVER, *flags]} for name, flags in servers.items()
        },
        "policies": {"audit_path": "audit.jsonl", **(policies or {})},
        "runtime": {"reconnect": {"initial_delay_secs": 0.05, "max_delay_secs": 0.3}},
    }
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(doc))
    return Runtime.from_config(path)


def audit(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]


async def test_listings_reads_prompts_and_completion(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"notes": ["--legacy"], "tools": ["--tools-only"]})
    async with rt:
        assert [e.resource.uri for e in rt.resources()] == ["note://1", "note://2", "note://3", "note://blob"]
        assert {e.server for e in rt.resources()} == {"notes"}
        assert rt.resources("tools") == []
        assert [e.template.uri_template for e in rt.resource_templates()] == ["note://{id}"]
        assert [e.prompt.name for e in rt.prompts("notes")] == ["greet", "review"]

        read = await rt.read_resource("note://3")  # found by its listing
        assert read.contents[0].text == "note 3: the launch code is 3333"  # type: ignore[union-attr]  # text
        with pytest.raises(Exception, match="no resource note://9"):  # found by the template's prefix
            await rt.read_resource("note://9")

        prompt = await rt.get_prompt("greet", {"name": "Grace"})
        assert [m.role for m in prompt.messages] == ["user", "assistant"]
        done = await rt.complete("name", "G", prompt="greet")
        assert done.completion.values == ["Grace"]
        done = await rt.complete("id", "", template="note://{id}")
        assert done.completion.values == ["1", "2", "3"]
        rt.executor.audit.flush()
    records = audit(tmp_path)
    calls = [r for r in records if r["event"] == "call"]
    assert [r["tool"] for r in calls] == [
        "resources/read",
        "resources/read",
        "prompts/get",
        "completion/complete",
        "completion/complete",
    ]
    assert [r["outcome"] for r in calls] == ["result", "failed", "result", "result", "result"]
    assert all(r["args"].startswith("sha256:") and r["server"] == "notes" for r in calls)


async def test_typed_errors_for_bad_requests(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"notes": ["--legacy"], "more": ["--legacy"], "tools": ["--tools-only"]})
    async with rt:
        with pytest.raises(AmbiguousName, match="offered by more, notes"):
            await rt.read_resource("note://1")
        assert (await rt.read_resource("note://1", server="more")).contents
        with pytest.raises(UnknownResource, match="no server lists the resource 'file:///x'"):
            await rt.read_resource("file:///x")
        with pytest.raises(UnknownPrompt) as unknown:
            await rt.get_prompt("gret", {"name": "x"}, server="notes")
        assert "greet" in str(unknown.value)
        with pytest.raises(PromptArgumentError, match=r"unknown argument.*colour.*missing required.*name"):
            await rt.get_prompt("greet", {"colour": "red"}, server="notes")
        with pytest.raises(CapabilityMissing, match="does not offer resources"):
            await rt.read_resource("note://1", server="tools")


async def test_policy_deny_covers_resource_reads(tmp_path: Path) -> None:
    policies = {"deny": ["notes/resources/*"]}  # a pattern with a slash matches `server/method`
    rt = runtime(tmp_path, {"notes": ["--legacy"]}, policies)
    async with rt:
        with pytest.raises(RequestRefused, match="denied by policy pattern"):
            await rt.read_resource("note://1")
        assert (await rt.get_prompt("review", {"topic": "x"})).messages  # prompts are not denied
        rt.executor.audit.flush()
    denied = [r for r in audit(tmp_path) if r["decision"] == "deny"]
    assert [r["tool"] for r in denied] == ["resources/read"]


async def test_a_read_that_never_answers_ends_at_its_deadline(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"notes": ["--legacy"]})
    async with rt:
        with anyio.fail_after(10), pytest.raises(CallTimeout, match=r"no reply within 0\.5s"):
            await rt.read_resource("note://slow", timeout=0.5)
        assert (await rt.read_resource("note://1")).contents  # the session is still fine
        rt.executor.audit.flush()
    outcomes = [r["outcome"] for r in audit(tmp_path) if r["event"] == "call"]
    assert outcomes == ["timeout", "result"]


async def test_oversized_resource_is_a_typed_error(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"notes": ["--legacy", "--big-bytes", str(9 * 1024 * 1024)]})
    async with rt:
        with pytest.raises(ResourceTooLarge, match="exceed the limit of 8388608 bytes"):
            await rt.read_resource("note://big")


@pytest.mark.parametrize("flags", [["--legacy"], []], ids=["2025-11-25", "2026-07-28"])
async def test_list_changed_refreshes_the_catalog(tmp_path: Path, flags: list[str]) -> None:
    rt = runtime(tmp_path, {"notes": flags})
    async with rt:
        await rt.call_tool("notes__add_note", {"text": "fresh"})
        ok = await rt.supervisor.wait_for(lambda: len(rt.resources()) == 5, 10)
        assert ok and "note://4" in [e.resource.uri for e in rt.resources()]
        assert (await rt.read_resource("note://4")).contents[0].text == "fresh"  # type: ignore[union-attr]


async def test_subscription_delivers_and_bounds_a_flood(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"notes": ["--legacy"]})
    async with rt:
        async with rt.subscribe("note://1", max_queued=5) as updates:
            await rt.call_tool("notes__touch", {"uri": "note://1"})
            with anyio.fail_after(10):
                first = await updates.__anext__()
            assert (first.server, first.uri) == ("notes", "note://1")
            await rt.call_tool("notes__flood", {"uri": "note://1", "n": 500})
            with anyio.fail_after(10):  # notifications are handled in their own tasks: wait for all 501
                await updates.wait_offered(501)
            assert updates.pending() == 5 and updates.dropped == 495
        # Unsubscribed on leaving: the server has no subscriber for the URI any more.
        result = await rt.call_tool("notes__touch", {"uri": "note://1"})
        assert result.content[0].text == "sent 0"  # type: ignore[union-attr]  # a text block


async def test_modern_era_reads_and_subscribes(tmp_path: Path) -> None:
    rt = runtime(tmp_path, {"notes": []})
    async with rt:
        assert rt.servers()[0].protocol_version == "2026-07-28"
        assert (await rt.read_resource("note://2")).contents
        conn = rt.supervisor.connection("notes")
        assert conn is not None
        async with rt.subscribe("note://1", max_queued=3) as updates:
            assert conn.listen_honored == {"note://1"}
            await rt.call_tool("notes__flood", {"uri": "note://1", "n": 50})
            with anyio.fail_after(10):
                await updates.wait_offered(50)
            assert updates.pending() == 3 and updates.dropped == 47
        assert conn.listen_uris == set() and rt.catalog.subscribed("notes") == []


@pytest.mark.parametrize("flags", [["--legacy"], []], ids=["2025-11-25", "2026-07-28"])
async def test_subscriptions_survive_a_reconnection(tmp_path: Path, flags: list[str]) -> None:
    rt = runtime(tmp_path, {"notes": flags})
    async with rt:
        async with rt.subscribe("note://2") as updates:
            first_pid = rt.servers()[0].pid
            assert first_pid is not None
            os.kill(first_pid, signal.SIGKILL)
            back = await rt.supervisor.wait_for(
                lambda: rt.servers()[0].state == "ready" and rt.servers()[0].pid not in (None, first_pid), 20
            )
            assert back and rt.resources()[0].resource.uri == "note://1"  # listed again
            await rt.call_tool("notes__touch", {"uri": "note://2"})  # the new process knows the subscription
            with anyio.fail_after(10):
                update = await updates.__anext__()
            assert update.uri == "note://2"


@needs_everything
async def test_everything_through_the_runtime(tmp_path: Path) -> None:
    doc = {"mcpServers": {"everything": {"command": "node", "args": [str(EVERYTHING), "stdio"]}}}
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(doc))
    async with Runtime.from_config(path) as rt:
        assert any(e.resource.uri.startswith("demo://resource/static/document/") for e in rt.resources())
        read = await rt.read_resource("demo://resource/dynamic/text/3")  # through its template
        assert read.contents[0].text.startswith("Resource 3:")  # type: ignore[union-attr]  # a text resource
        assert {"simple-prompt", "args-prompt", "completable-prompt"} <= {e.prompt.name for e in rt.prompts()}
        done = await rt.complete("department", "S", prompt="completable-prompt")
        assert done.completion.values == ["Sales", "Support"]
        async with rt.subscribe("demo://resource/dynamic/text/1") as updates:
            await rt.call_tool("everything__toggle-subscriber-updates", {})
            with anyio.fail_after(10):
                update = await updates.__anext__()
            assert update.uri == "demo://resource/dynamic/text/1"
