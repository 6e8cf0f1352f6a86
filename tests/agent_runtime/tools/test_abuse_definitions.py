"""Abuse suite: hostile tool definitions and hostile arguments, against real server processes.

Each test names the hole it keeps closed: schemas that make the runtime fetch or read for a server (`$ref`),
malformed definitions that cost a server all its tools, quarantined definitions that still reach a prompt
or an MCP host, untrusted annotations that lower the approval bar, arguments deep enough to take the audit
writer (and the runtime) down, server regexes that block the event loop, lone surrogates that reset the
connection.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from agent_runtime.agents.host import AgentHost
from agent_runtime.config.types import RuntimeConfig
from agent_runtime.tools.runtime import Runtime
from tests.agent_runtime.agent_fixtures import ScriptedBackend
from tests.agent_runtime.faulty_harness import harness, make_config
from tests.conftest import EXAMPLES, PYTHON
from transports.targets import StdioTarget

pytestmark = pytest.mark.anyio
HOSTILE = str(EXAMPLES / "servers" / "hostile_schema_server.py")
SECRET = "top-secret-content-7f3a9c"


@contextmanager
def recording_http_server() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 that records every request path (and serves a schema if asked)."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            body = json.dumps({"type": "string", "description": SECRET}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/s.json", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def hostile_config(
    tmp: Path, *flags: str, policies: Mapping[str, Any] | None = None, trusted: bool = False, **sections: Any
) -> RuntimeConfig:
    target = StdioTarget(PYTHON, (HOSTILE, "--calls-log", str(tmp / "calls.jsonl"), *flags))
    config = make_config(tmp, target, policies=policies, name="h", trusted=trusted)
    return RuntimeConfig(
        servers=config.servers,
        runtime=config.runtime,
        path=config.path,
        sections={**config.sections, **sections},
    )


@asynccontextmanager
async def hostile_runtime(tmp: Path, *flags: str, **kw: Any) -> AsyncIterator[Runtime]:
    async with Runtime(hostile_config(tmp, *flags, **kw), ready_timeout=30) as rt:
        assert rt.supervisor.server("h").state == "ready", rt.servers()
        yield rt


def received(tmp: Path) -> list[dict[str, Any]]:
    log = tmp / "calls.jsonl"
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


# -- 1. schemas never make the runtime fetch or read ------------------------------------------------------


async def test_remote_and_file_references_are_never_resolved(tmp_path: Path) -> None:
    secret_file = tmp_path / "local.json"
    secret_file.write_text(json.dumps({"type": "string", "description": SECRET}))
    with recording_http_server() as (url, hits):
        policies = {"audit_path": "audit.jsonl"}
        async with hostile_runtime(
            tmp_path, "--ref-url", url, "--ref-file", str(secret_file), policies=policies
        ) as rt:
            # The tools are invalid, not the server: its other tools stay callable.
            names = {e.name for e in rt.tools()}
            assert "h__ok" in names and not {"h__fetch_ref", "h__file_ref"} & names
            problems = {p.name: p for p in rt.registry.problems("h")}
            assert problems["h__fetch_ref"].kind == "invalid_definition"
            assert "inputSchema.properties.x.$ref" in problems["h__fetch_ref"].detail
            assert "not a local reference" in problems["h__file_ref"].detail
            outs = [
                await rt.execute("h__fetch_ref", {"x": "anything"}),
                await rt.execute("h__file_ref", {"x": "anything"}),
            ]
            for out in outs:
                assert out.kind == "denied" and "definition is invalid" in (out.reason or ""), out
            assert (await rt.execute("h__ok", {"text": "still here"})).text() == "still here"
            rt.executor.audit.flush()
        assert hits == [], "the runtime fetched a server-chosen URL"
    seen = " ".join(o.reason or "" for o in outs) + (tmp_path / "audit.jsonl").read_text()
    assert SECRET not in seen
    assert [c["tool"] for c in received(tmp_path)] == ["ok"]


def test_a_schema_validator_never_retrieves() -> None:
    """Below the registry too: a validator compiled from such a schema refuses it, and a `$ref` that
    jsonschema would otherwise retrieve (relative to an `$id`) is never fetched."""
    from policies.arguments import ArgumentValidator

    with recording_http_server() as (url, hits):
        for schema in (
            {"type": "object", "properties": {"x": {"$ref": url}}},
            {"$id": url.rsplit("/", 1)[0] + "/", "type": "object", "properties": {"x": {"$ref": "s.json"}}},
        ):
            v = ArgumentValidator.compile(schema)
            found = v.check({"x": 1})
            assert found is not None and found.kind == "denied" and "not a local reference" in found.reason
        assert hits == []


# -- malformed definitions cost the server nothing else ----------------------------------------------------


async def test_one_malformed_definition_keeps_the_valid_tools(tmp_path: Path) -> None:
    async with hostile_runtime(tmp_path, "--malformed") as rt:
        names = {e.name for e in rt.tools()}
        assert {"h__ok", "h__calls", "h__tagged"} <= names and "h__bad_schema" not in names
        details = [p.detail for p in rt.registry.problems("h")]
        assert any("bad_schema" in d and "inputSchema" in d for d in details), details
        assert any("#6" in d and "name" in d for d in details), details  # the nameless entry, by position
        out = await rt.execute("h__bad_schema", {})
        assert out.kind == "denied" and "inputSchema" in (out.reason or ""), out
        assert (await rt.execute("h__ok", {"text": "x"})).ok


# -- 4. quarantined definitions are not offered ------------------------------------------------------------


async def test_a_rug_pulled_tool_reaches_neither_prompt_nor_host(tmp_path: Path) -> None:
    from mcp import Client

    from agent_runtime.server.mcp_server import AgentMCPServer
    from examples.servers.hostile_schema_server import POISONED

    async with hostile_runtime(tmp_path, "--rugpull") as rt:
        backend = ScriptedBackend()
        host = AgentHost(rt, backend=backend)
        assert "h__ok" in {s.name for s in host.agent().tools()}
        assert (await rt.execute("h__ok", {"text": "first"})).ok  # pinned on first use; then the rug pull
        pulled = await rt.registry.wait_until(
            lambda r: (e := r.get("h__ok")) is not None and e.definition.description == POISONED, 15
        )
        assert pulled
        out = await rt.execute("h__ok", {"text": "second"})
        assert out.kind == "denied" and "quarantined" in (out.reason or "")
        assert "title" in (out.reason or "") and "description" in (out.reason or "")  # titles are pinned
        assert out.hint is not None and "tools approve h__ok" in out.hint
        # Not offered to agents: neither in their tool list nor anywhere in the prompt.
        assert "h__ok" not in {s.name for s in host.agent().tools()}
        await host.agent().run("say hi")
        prompt = json.dumps([r.messages for r in backend.requests])
        assert "IMPORTANT" not in prompt and "id_rsa" not in prompt and "h__ok" not in prompt
        assert "h__tagged" in prompt  # the other tools still are
        # Not listed to MCP hosts by `mcp-server --expose-tools`.
        served = AgentMCPServer(None, rt, reexport=True)
        async with Client(served.server) as client:
            listed = {t.name: t for t in (await client.list_tools()).tools}
        assert "h__ok" not in listed and "h__tagged" in listed
        assert all("IMPORTANT" not in (t.description or "") for t in listed.values())
        # Approval brings it back.
        rt.executor.pins.approve("h", [rt.registry.get("h__ok").definition])  # type: ignore[union-attr]  # h__ok is quarantined, not removed: the registry still has it
        assert "h__ok" in {s.name for s in host.agent().tools()}
        await host.aclose()
    assert [c["arguments"].get("text") for c in received(tmp_path)] == ["first"]


# -- untrusted annotations never lower the approval bar -----------------------------------------------------


async def test_untrusted_annotations_do_not_skip_approval(tmp_path: Path) -> None:
    policies = {"approval": "destructive", "approval_timeout": 1}
    async with hostile_runtime(tmp_path, policies=policies) as rt:  # not trusted; no approver
        out = await rt.execute("h__tagged", {})
        assert out.kind == "denied" and "approval required" in (out.reason or ""), out
        assert "trusted" in (out.reason or "")
    assert received(tmp_path) == []
    async with hostile_runtime(tmp_path, policies=policies, trusted=True) as rt:
        assert (await rt.execute("h__tagged", {})).ok  # a trusted server's read-only hint is believed


# -- 5. deep arguments are refused, audited, and the runtime stays up --------------------------------------


def nested(depth: int) -> dict[str, Any]:
    root: dict[str, Any] = {}
    node = root
    for _ in range(depth):
        node["x"] = {}
        node = node["x"]
    return root


async def test_deep_arguments_are_denied_audited_and_survived(tmp_path: Path) -> None:
    async with hostile_runtime(tmp_path, policies={"audit_path": "audit.jsonl"}) as rt:
        for depth in (1_000, 100_000):
            out = await rt.execute("h__ok", {"text": "x", "deep": nested(depth)})
            assert out.kind == "invalid_arguments" and "nested deeper" in (out.reason or ""), out
            # A tool that does not exist digests its (unchecked) arguments too: that must not crash either.
            gone = await rt.execute("h__nope", {"deep": nested(depth)})
            assert gone.kind == "unknown_tool"
            await anyio.sleep(0.2)  # let the audit flusher (every 50 ms) write them
            ok = await rt.execute("h__ok", {"text": f"after {depth}"})
            assert ok.ok and ok.text() == f"after {depth}", ok
        with anyio.fail_after(5):
            await rt.execute("h__ok", {"text": "still alive"})
    records = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    denied = [r for r in records if r["decision"] == "deny" and "nested deeper" in (r.get("reason") or "")]
    assert len(denied) == 2 and all(r["args"].startswith("unhashed") for r in denied)
    assert sum(1 for r in records if r.get("outcome") == "result") == 3
    assert [c["arguments"]["text"] for c in received(tmp_path)] == [
        "after 1000",
        "after 100000",
        "still alive",
    ]


# -- 6. a server's regex never blocks the event loop --------------------------------------------------------


async def test_server_patterns_cannot_stall_the_loop(tmp_path: Path) -> None:
    async with hostile_runtime(tmp_path) as rt:
        assert (await rt.execute("h__ok", {"text": "warm"})).ok
        # ^(a+)+$ on 25 a's and a '!': seconds for a backtracking engine; RE2 answers in microseconds.
        t0 = time.perf_counter()
        out = await rt.execute("h__slow_pattern", {"s": "a" * 25 + "!"})
        assert out.kind == "invalid_arguments" and "does not match" in (out.reason or ""), out
        assert time.perf_counter() - t0 < 1.0
        assert (await rt.execute("h__slow_pattern", {"s": "a" * 25})).ok

        # A look-around RE2 refuses runs under the validation budget; a concurrent call is not stalled.
        latencies: list[float] = []

        async def valid_call() -> None:
            t = time.perf_counter()
            assert (await rt.execute("h__ok", {"text": "concurrent"})).ok
            latencies.append(time.perf_counter() - t)

        async with anyio.create_task_group() as tg:
            tg.start_soon(valid_call)
            await anyio.lowlevel.checkpoint()  # let the valid call start first
            t0 = time.perf_counter()
            slow = await rt.execute("h__slow_lookaround", {"s": "a" * 36 + "!"})
            slow_took = time.perf_counter() - t0
        assert slow.kind == "denied" and "could not be checked" in (slow.reason or ""), slow
        # Unbounded, this validation takes many seconds (backtracking); both end well before that.
        assert slow_took < 2.0 and latencies and latencies[0] < 2.0, (slow_took, latencies)
        # The call's own deadline bounds its validation too.
        t0 = time.perf_counter()
        short = await rt.execute("h__slow_lookaround", {"s": "a" * 36 + "!"}, timeout=0.05)
        assert short.kind == "denied" and "0.05s" in (short.reason or "") and time.perf_counter() - t0 < 1.0
        assert (await rt.execute("h__slow_lookaround", {"s": "aaaa"})).ok
    assert [c["tool"] for c in received(tmp_path)] == ["ok", "slow_pattern", "ok", "slow_lookaround"]


# -- 10. a lone surrogate is an argument error, not a dead connection ---------------------------------------


async def test_lone_surrogate_is_refused_and_the_server_keeps_running(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        pid = h.supervisor.server("faulty").pid
        for args in ({"text": "\ud800"}, {"text": "ok", "\udc80key": 1}, {"text": ["a\udfffb"]}):
            out = await h.executor.execute("faulty__echo", args)
            assert out.kind == "invalid_arguments" and "lone surrogate" in (out.reason or ""), out
            assert out.attempts == 0
        status = h.supervisor.server("faulty")
        assert status.pid == pid and status.restarts == 0 and status.state == "ready"
        assert (await h.executor.execute("faulty__echo", {"text": "é ok"})).text() == "é ok"
        assert [e["arguments"]["text"] for e in h.received("echo")] == ["é ok"]


async def test_values_json_cannot_carry_are_refused(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        for value, why in [(float("nan"), "nan"), (float("inf"), "inf"), (10**5000, "larger than")]:
            out = await h.executor.execute("faulty__echo", {"text": "x", "v": value})
            assert out.kind == "invalid_arguments" and why in (out.reason or ""), out
        assert h.received() == []
