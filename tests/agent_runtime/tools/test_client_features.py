"""Servers' requests to the runtime: sampling under each server's policy, elicitation (declined unless asked
for, answers checked against the schema), roots (configured, changed at run time), every request audited.

Real servers: the SDK's MCPServer (examples/servers/client_features_server.py, 2026-07-28 era),
server-everything (2025-11-25 era) and server-filesystem, which replaces its directories with our roots.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anyio
import pytest

from agent_runtime import (
    ElicitationAnswer,
    ElicitationRequest,
    Runtime,
    SamplingRequest,
    SamplingResult,
    parse_config,
)
from agent_runtime.errors import AgentRuntimeError, ConfigError
from agent_runtime.tools.supervisor import UnknownServer
from policies.approval import ApprovalRequest
from policies.audit import AuditRecord
from tests.conftest import EXAMPLES, PEERS, PYTHON
from tests.transports.conftest import EVERYTHING, needs_everything

pytestmark = pytest.mark.anyio

SERVER = str(EXAMPLES / "servers" / "client_features_server.py")
FILESYSTEM = PEERS / "@modelcontextprotocol" / "server-filesystem" / "dist" / "index.js"


def config(tmp_path: Path, server: dict[str, Any] | None = None, **top: Any) -> Any:
    entry = {"command": PYTHON, "args": [SERVER], **(server or {})}
    doc = {"mcpServers": {"cf": entry}, **top}
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(doc))
    return parse_config(path.read_text(), file=str(path))


class Model:
    """A sampler standing in for the engine (the policy is under test here, not the model)."""

    def __init__(self) -> None:
        self.requests: list[SamplingRequest] = []

    async def __call__(self, request: SamplingRequest) -> SamplingResult:
        self.requests.append(request)
        return SamplingResult(text="one line", model="local-test", prompt_tokens=12, completion_tokens=3)


def audited(rt: Runtime) -> list[AuditRecord]:
    records: list[AuditRecord] = []
    rt.executor.audit.listeners.append(records.append)
    return records


def real(path: Path) -> str:
    return str(path.resolve())  # tmp folders may sit behind a symlink; roots are resolved


def text_of(result: Any) -> str:
    return str(result.content[0].text)


async def test_sampling_is_declined_by_default_and_audited(tmp_path: Path) -> None:
    model = Model()
    async with Runtime(config(tmp_path), sampler=model) as rt:
        records = audited(rt)
        with pytest.raises(AgentRuntimeError) as refused:
            await rt.call_tool("cf__summarize", {"text": "abc"})
        assert "sampling declined by the client: sampling is not allowed for this server" in str(
            refused.value
        )
    assert model.requests == []
    [record] = [r for r in records if r.event == "sampling"]
    assert record.server == "cf" and record.decision == "deny" and record.outcome == "denied"
    assert "sampling.allow" in (record.reason or "")


async def test_allowed_sampling_is_clamped_and_maps_model_preferences(tmp_path: Path) -> None:
    policy = {"allow": True, "max_tokens": 64, "models": {"*haiku*": "small", "*": "default"}}
    model = Model()
    async with Runtime(config(tmp_path, {"sampling": policy}), sampler=model) as rt:
        records = audited(rt)
        result = await rt.call_tool("cf__summarize", {"text": "a long story", "max_tokens": 400})
        assert json.loads(text_of(result)) == {
            "text": "one line",
            "model": "local-test",
            "stop_reason": "endTurn",
        }
    [request] = model.requests
    assert request.max_tokens == 64  # the server asked for 400
    assert request.model == "small"  # its hint "claude-3-haiku" matched
    assert request.system_prompt == "You write one-line summaries."
    assert request.messages == [{"role": "user", "content": "Summarize in one line: a long story"}]
    [record] = [r for r in records if r.event == "sampling"]
    assert record.decision == "allow" and record.outcome == "result" and record.tokens == 3
    assert "clamped to 64" in (record.reason or "")


async def test_sampling_without_a_model_is_declined_with_the_reason(tmp_path: Path) -> None:
    async with Runtime(config(tmp_path, {"sampling": {"allow": True}})) as rt:
        with pytest.raises(AgentRuntimeError) as refused:
            await rt.call_tool("cf__summarize", {"text": "abc"})
        assert "no model is loaded" in str(refused.value)


async def test_sampling_approval_fails_closed_and_asks_the_approver(tmp_path: Path) -> None:
    cfg = config(tmp_path, {"sampling": {"allow": True, "approval": "always"}})
    model = Model()
    async with Runtime(cfg, sampler=model) as rt:  # no approver: refused
        with pytest.raises(AgentRuntimeError) as refused:
            await rt.call_tool("cf__summarize", {"text": "abc"})
        assert "no approver is configured" in str(refused.value)
    assert model.requests == []

    asked: list[ApprovalRequest] = []

    async def approver(request: ApprovalRequest) -> bool:
        asked.append(request)
        return len(asked) == 1  # yes once, then no

    async with Runtime(cfg, sampler=model, approval_hook=approver) as rt:
        result = await rt.call_tool("cf__summarize", {"text": "abc"})
        assert json.loads(text_of(result))["text"] == "one line"
        with pytest.raises(AgentRuntimeError) as denied:
            await rt.call_tool("cf__summarize", {"text": "def"})
        assert "was denied" in str(denied.value)
    assert [r.tool for r in asked] == ["sampling/createMessage"] * 2
    assert asked[0].server == "cf" and "Summarize in one line: abc" in json.dumps(asked[0].arguments)
    assert len(model.requests) == 1


async def test_elicitation_is_declined_by_default_and_audited(tmp_path: Path) -> None:
    asked: list[ElicitationRequest] = []

    async def handler(request: ElicitationRequest) -> ElicitationAnswer:
        asked.append(request)
        return ElicitationAnswer("accept", {"name": "x", "age": 1})

    async with Runtime(config(tmp_path), elicitation_handler=handler) as rt:
        records = audited(rt)
        result = await rt.call_tool("cf__ask_contact", {})
        assert json.loads(text_of(result)) == {"action": "decline", "data": None}
    assert asked == []
    [record] = [r for r in records if r.event == "elicitation"]
    assert (
        record.decision == "deny"
        and record.outcome == "decline"
        and "config: elicitation" in (record.reason or "")
    )


async def test_elicitation_ask_goes_to_the_handler_and_checks_the_answer(tmp_path: Path) -> None:
    answers = [
        ElicitationAnswer("accept", {"name": "Ada", "age": 36}),
        ElicitationAnswer("accept", {"name": "Ada", "age": "old"}),
    ]
    asked: list[ElicitationRequest] = []

    async def handler(request: ElicitationRequest) -> ElicitationAnswer:
        asked.append(request)
        return answers[len(asked) - 1]

    async with Runtime(config(tmp_path, {"elicitation": "ask"}), elicitation_handler=handler) as rt:
        records = audited(rt)
        result = await rt.call_tool("cf__ask_contact", {})
        assert json.loads(text_of(result)) == {
            "action": "accept",
            "data": {"name": "Ada", "age": 36, "newsletter": False},
        }
        with pytest.raises(
            AgentRuntimeError
        ) as bad:  # an answer that fails the schema never reaches the server
            await rt.call_tool("cf__ask_contact", {})
        assert "does not fit the requested schema: age must be a number" in str(bad.value)
    form = asked[0].form
    assert asked[0].server == "cf" and asked[0].mode == "form" and asked[0].message == "Who are you?"
    assert form is not None and [(f.name, f.kind, f.required) for f in form.fields] == [
        ("name", "string", True),
        ("age", "integer", True),
        ("newsletter", "boolean", False),
    ]
    elicited = [r for r in records if r.event == "elicitation"]
    assert [(r.outcome, r.answer) for r in elicited] == [
        ("accept", {"name": "Ada", "age": 36}),
        ("error", None),
    ]


async def test_an_oversized_elicitation_schema_is_refused_before_anyone_is_asked(tmp_path: Path) -> None:
    asked: list[ElicitationRequest] = []

    async def handler(request: ElicitationRequest) -> ElicitationAnswer:
        asked.append(request)
        return ElicitationAnswer("decline")

    async with Runtime(config(tmp_path, {"elicitation": "ask"}), elicitation_handler=handler) as rt:
        records = audited(rt)
        with pytest.raises(AgentRuntimeError) as refused:
            await rt.call_tool("cf__ask_oversized", {})
        assert "40 properties (at most 32)" in str(refused.value)
    assert asked == []
    [record] = [r for r in records if r.event == "elicitation"]
    assert record.outcome == "error" and record.decision == "deny"


async def test_roots_come_from_config_and_set_roots(tmp_path: Path) -> None:
    (tmp_path / "work").mkdir()
    cfg = config(tmp_path, {"roots": ["work", {"path": "/srv/data", "name": "data"}]})
    tmp_uri = Path(real(tmp_path)).as_uri()
    async with Runtime(cfg) as rt:
        listed = json.loads(text_of(await rt.call_tool("cf__list_client_roots", {})))
        assert listed == [
            {"uri": Path(real(tmp_path / "work")).as_uri(), "name": None},
            {"uri": "file:///srv/data", "name": "data"},
        ]
        await rt.set_roots([tmp_path], server="cf")
        listed = json.loads(text_of(await rt.call_tool("cf__list_client_roots", {})))
        assert listed == [{"uri": tmp_uri, "name": None}]
        assert rt.roots("cf") == [tmp_uri]
        with pytest.raises(ConfigError):
            await rt.set_roots(["https://example.com/not-a-directory"])
        with pytest.raises(UnknownServer):
            await rt.set_roots([tmp_path], server="nope")
        with pytest.raises(UnknownServer):
            rt.roots("nope")


@pytest.mark.skipif(not FILESYSTEM.exists(), reason="server-filesystem is not installed under .peers/")
async def test_server_filesystem_uses_our_roots_and_follows_list_changed(tmp_path: Path) -> None:
    started, configured, later = (tmp_path / name for name in ("started", "configured", "later"))
    for folder in (started, configured, later):
        folder.mkdir()
    configured_dir, later_dir = real(configured), real(later)
    doc = {
        "mcpServers": {"fs": {"command": "node", "args": [str(FILESYSTEM), str(started)]}},
        "runtime": {"roots": [str(configured)]},
    }
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(doc))

    async def allowed(rt: Runtime) -> str:
        return text_of(await rt.call_tool("fs__list_allowed_directories", {}))

    async with Runtime.from_config(path) as rt:
        # the server replaces its command-line directory with our roots once it has asked for them
        with anyio.fail_after(15):
            while configured_dir not in await allowed(rt):  # noqa: ASYNC110 - the state is in another process
                await anyio.sleep(0.05)
        assert str(started) not in await allowed(rt)
        await rt.set_roots([later])  # notifications/roots/list_changed: the server asks again
        with anyio.fail_after(15):
            while later_dir not in await allowed(rt):  # noqa: ASYNC110 - the state is in another process
                await anyio.sleep(0.05)
        assert configured_dir not in await allowed(rt)


@needs_everything
async def test_server_everything_samples_and_elicits_through_the_runtime(tmp_path: Path) -> None:
    doc = {
        "mcpServers": {
            "every": {
                "command": "node",
                "args": [str(EVERYTHING), "stdio"],
                "sampling": {"allow": True, "max_tokens": 5},
                "elicitation": "ask",
            }
        },
        "policies": {
            "egress": False
        },  # the URL below is only shown, never fetched (and does not resolve here)
    }
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps(doc))
    model = Model()
    asked: list[ElicitationRequest] = []

    async def handler(request: ElicitationRequest) -> ElicitationAnswer:
        asked.append(request)
        if request.mode == "url":
            return ElicitationAnswer("decline")
        return ElicitationAnswer(
            "accept",
            {
                "name": "Ada Lovelace",
                "email": "ada@example.com",
                "untitledMultipleSelectEnum": ["Piano", "Violin"],
                "titledSingleSelectEnum": "hero-3",
                "legacyTitledEnum": "pet-2",
                "integer": 7,
            },
        )

    async with Runtime.from_config(path, elicitation_handler=handler) as rt:
        rt.set_sampler(model)
        sampled = await rt.call_tool("every__trigger-sampling-request", {"prompt": "hi", "maxTokens": 100})
        assert "one line" in text_of(sampled) and "local-test" in text_of(sampled)
        assert model.requests[0].max_tokens == 5 and model.requests[0].temperature == 0.7

        elicited = await rt.call_tool("every__trigger-elicitation-request", {})
        body = "\n".join(str(getattr(b, "text", "")) for b in elicited.content)
        assert "Ada Lovelace" in body and "hero-3" in body
        form = asked[0].form
        assert form is not None
        kinds = {f.name: f.kind for f in form.fields}
        assert kinds["untitledMultipleSelectEnum"] == "multi" and kinds["titledSingleSelectEnum"] == "enum"

        url = await rt.call_tool("every__trigger-url-elicitation", {"url": "https://example.com/consent"})
        assert not url.is_error
        assert asked[-1].mode == "url" and asked[-1].url == "https://example.com/consent"


async def test_a_handler_answering_nonsense_is_an_error_to_the_server(tmp_path: Path) -> None:
    async def handler(request: ElicitationRequest) -> ElicitationAnswer:
        return ElicitationAnswer("sure")  # type: ignore[arg-type]  # what a buggy handler might return

    async with Runtime(config(tmp_path, {"elicitation": "ask"}), elicitation_handler=handler) as rt:
        with pytest.raises(AgentRuntimeError) as bad:
            await rt.call_tool("cf__ask_contact", {})
        assert "'sure' is not accept, decline or cancel" in str(bad.value)


async def test_a_server_flooding_sampling_requests_gets_two_generations_at_a_time(tmp_path: Path) -> None:
    in_flight = peak = 0

    async def slow_model(request: SamplingRequest) -> SamplingResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await anyio.sleep(0.05)  # stands in for generation time
        in_flight -= 1
        return SamplingResult(text=request.messages[0]["content"], model="m")

    cfg = config(tmp_path, {"sampling": {"allow": True}, "max_concurrent_calls": 8})
    replies: list[str] = []
    async with Runtime(cfg, sampler=slow_model) as rt:

        async def call(i: int) -> None:
            result = await rt.call_tool("cf__summarize", {"text": f"text {i}"})
            replies.append(json.loads(text_of(result))["text"])

        async with anyio.create_task_group() as tg:
            for i in range(6):
                tg.start_soon(call, i)
    assert sorted(replies) == [f"Summarize in one line: text {i}" for i in range(6)]
    assert peak == 2
