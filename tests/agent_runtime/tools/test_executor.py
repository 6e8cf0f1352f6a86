"""The executor against a real (faulty) stdio server: each policy check is fed hostile input and the
server's own calls log proves nothing reached it."""

from __future__ import annotations

import ipaddress
import json
import time
from pathlib import Path

import anyio
import pytest

from agent_runtime.tools.executor import Executor, ToolOutcome
from policies.approval import ApprovalRequest
from policies.limits import AgentBudget
from tests.agent_runtime.faulty_harness import harness
from tests.conftest import wait_for_call

pytestmark = pytest.mark.anyio
MiB = 1024 * 1024


def assert_refused(outcome: ToolOutcome, kind: str = "denied") -> None:
    assert outcome.kind == kind, outcome
    assert outcome.attempts == 0 and outcome.result is None and outcome.reason


async def test_result_audit_and_monitor(tmp_path: Path) -> None:
    async with harness(tmp_path, policies={"audit_path": "audit.jsonl"}) as h:
        out = await h.executor.execute("faulty__echo", {"text": "secret payload"}, agent="a1")
        assert out.ok and out.text() == "secret payload" and out.attempts == 1 and not out.truncated
        assert out.server == "faulty" and out.duration > 0
        denied = await h.executor.execute("faulty__echo", {"text": 5}, agent="a1")
        assert_refused(denied, "invalid_arguments")
        h.executor.audit.flush()
        lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert [(x["event"], x["decision"], x.get("outcome")) for x in lines] == [
            ("decision", "allow", None),
            ("call", "allow", "result"),
            ("decision", "deny", None),
        ]
        assert all(x["agent"] == "a1" and x["args"].startswith("sha256:") for x in lines)
        assert "secret payload" not in (tmp_path / "audit.jsonl").read_text()
        row = next(r for r in h.executor.health() if r.name == "faulty")
        assert row.calls == 2 and row.denied == 1 and row.p50_ms is not None and row.state == "ready"
        assert len(h.received("echo")) == 1


async def test_unknown_tool(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        out = await h.executor.execute("faulty__ecko", {"text": "x"})
        assert_refused(out, "unknown_tool")
        assert "faulty__echo" in (out.reason or "")
        assert_refused(await h.executor.execute("nobody__echo", {}), "unknown_tool")
        not_an_object = await h.executor.execute("faulty__echo", ["not", "an", "object"])  # type: ignore[arg-type]  # on purpose: a JSON array where the arguments object belongs
        assert_refused(not_an_object, "invalid_arguments")
        assert h.received() == []


async def test_allow_deny_globs(tmp_path: Path) -> None:
    policies = {
        "deny": ["*delete*"],
        "servers": {"faulty": {"allow": ["echo", "delete", "env"], "deny": ["env"]}},
    }
    async with harness(tmp_path, policies=policies) as h:
        assert (await h.executor.execute("faulty__echo", {"text": "ok"})).ok
        for name, args in [
            ("faulty__delete", {"path": "/x"}),
            ("faulty__env", {"name": "PATH"}),
            ("faulty__work", {}),
        ]:
            assert_refused(await h.executor.execute(name, args))
        assert [e["tool"] for e in h.received()] == ["echo"]


async def test_argument_validation_hostile(tmp_path: Path) -> None:
    deep: dict = {}
    node = deep
    for _ in range(200):
        node["x"] = {}
        node = node["x"]
    async with harness(tmp_path) as h:
        for args in [
            {"text": 42},  # type error
            {},  # missing required
            {"text": "a" * MiB},  # 1 MiB string
            {"text": "ok", "extra": deep},  # deep nesting
            {"n_bytes": "ten"},
        ]:
            assert_refused(await h.executor.execute("faulty__echo", args), "invalid_arguments")
        bool_for_int = await h.executor.execute("faulty__big", {"n_bytes": True})  # bool is not an integer
        assert_refused(bool_for_int, "invalid_arguments")
        assert h.received() == []


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.txt").write_text("inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    (root / "escape").symlink_to(outside)
    return root


async def test_path_confinement_hostile(tmp_path: Path, sandbox: Path) -> None:
    policies = {"roots": [str(sandbox)], "path_args": ["path"]}
    async with harness(tmp_path, policies=policies) as h:
        ok = await h.executor.execute("faulty__read_file", {"path": str(sandbox / "ok.txt")})
        assert ok.ok and ok.text() == "inside"
        hostile = [
            f"{sandbox}/../outside/secret.txt",
            f"{sandbox}/%2e%2e/outside/secret.txt",
            f"{sandbox}/..%2foutside%2fsecret.txt",
            f"{sandbox}/ok.txt\x00/../../outside/secret.txt",
            f"{sandbox}/escape/secret.txt",  # symlink escape
            "/etc/passwd",
            "file:///etc/passwd",
            "file:///etc",
            "../outside/secret.txt",
        ]
        for path in hostile:
            assert_refused(await h.executor.execute("faulty__read_file", {"path": path}))
        # file:// URIs are confined in any argument, declared or not
        assert_refused(await h.executor.execute("faulty__echo", {"text": "file:///etc/shadow"}))
        assert [e["arguments"]["path"] for e in h.received()] == [str(sandbox / "ok.txt")]


async def test_egress_hostile(tmp_path: Path) -> None:
    async def resolver(host: str) -> list:
        table = {
            "public.example": ["93.184.216.34"],
            "rebind.example": ["10.0.0.7"],
            "localhost": ["127.0.0.1"],
        }
        return [ipaddress.ip_address(a) for a in table.get(host, [])]

    async with harness(tmp_path, resolver=resolver) as h:
        for url in ["https://public.example/page", "http://93.184.216.34/"]:
            assert (await h.executor.execute("faulty__fetch", {"url": url})).ok
        hostile = [
            "http://127.0.0.1/",
            "http://127.1/",
            "http://2130706433/",
            "http://0x7f.0.0.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[fd00::1]/",
            "http://100.64.0.1/",
            "http://localhost:8080/",
            "http://rebind.example/",
            "http://nxdomain.example/",
            "gopher://public.example/",
        ]
        for url in hostile:
            assert_refused(await h.executor.execute("faulty__fetch", {"url": url}))
        # URLs are judged in any string argument
        assert_refused(await h.executor.execute("faulty__echo", {"text": "http://169.254.169.254/"}))
        assert [e["arguments"]["url"] for e in h.received()] == [
            "https://public.example/page",
            "http://93.184.216.34/",
        ]

    # allow-listed networks pass
    async with harness(
        tmp_path, policies={"egress_allow": ["127.0.0.0/8"]}, calls_log=tmp_path / "c2.jsonl"
    ) as h:
        assert (await h.executor.execute("faulty__fetch", {"url": "http://127.0.0.1:9/"})).ok


async def test_approvals_fail_closed(tmp_path: Path) -> None:
    asked: list[ApprovalRequest] = []

    def make_hook(answer: object):
        async def hook(request: ApprovalRequest) -> bool:
            asked.append(request)
            if answer == "hang":
                await anyio.sleep_forever()
            if answer == "raise":
                raise RuntimeError("approver crashed")
            return answer  # type: ignore[return-value]  # on purpose: the hook also answers non-bools ("yes"), which must deny

        return hook

    policies = {"approval": "destructive", "approval_timeout": 0.3}
    async with harness(tmp_path, policies=policies, trusted=True) as h:
        # read-only tools of a trusted server need no approval
        assert (await h.executor.execute("faulty__echo", {"text": "x"})).ok
        # no hook, False, a non-bool truthy answer, an exception, a hang: all deny
        assert_refused(await h.executor.execute("faulty__delete", {"path": "/x"}))
        for answer in [False, "yes", "raise", "hang"]:
            h.executor.approval_hook = make_hook(answer)
            with anyio.fail_after(5):  # a hanging approver is given up on at approval_timeout, not waited on
                out = await h.executor.execute("faulty__delete", {"path": "/x"})
            assert_refused(out)
        assert "unannotated" in asked[0].reason and asked[0].destructive
        h.executor.approval_hook = make_hook(True)
        assert (await h.executor.execute("faulty__mutate", {"payload": "p"})).ok
        assert [e["tool"] for e in h.received()] == ["echo", "mutate"]


async def test_output_cap_and_sanitising(tmp_path: Path) -> None:
    async with harness(tmp_path, policies={"max_output_chars": 1000}) as h:
        out = await h.executor.execute("faulty__big", {"n_bytes": 200_000})
        assert out.ok and out.truncated
        assert "output truncated: 1000 of 200000" in out.text() and len(out.text()) < 1200
        out = await h.executor.execute("faulty__ansi", {})
        assert out.ok and not out.truncated
        assert "\x1b" not in out.text() and "\x00" not in out.text() and "\x07" not in out.text()
        assert "red" in out.text() and "done" in out.text()


async def test_budgets(tmp_path: Path) -> None:
    async with harness(tmp_path) as h:
        budget = AgentBudget(max_steps=3, max_calls_per_tool=2)
        for _ in range(2):
            assert (await h.executor.execute("faulty__echo", {"text": "x"}, budget=budget)).ok
        assert_refused(
            await h.executor.execute("faulty__echo", {"text": "x"}, budget=budget), "budget_exhausted"
        )
        assert (await h.executor.execute("faulty__work", {}, budget=budget)).ok
        assert_refused(await h.executor.execute("faulty__work", {}, budget=budget), "budget_exhausted")
        # the wall clock shortens the deadline of a call in progress
        clock_budget = AgentBudget(wall_clock=0.4)
        out = await h.executor.execute("faulty__sleep", {"seconds": 5}, budget=clock_budget)
        assert out.kind == "timeout"  # the 5 s sleep is within the 10 s tool timeout: only the budget cut it
        assert_refused(
            await h.executor.execute("faulty__echo", {"text": "x"}, budget=clock_budget), "budget_exhausted"
        )
        assert len(h.received("echo")) == 2 and len(h.received("work")) == 1


async def test_timeouts_and_per_tool_override(tmp_path: Path) -> None:
    policies = {"servers": {"faulty": {"tools": {"sleep": {"timeout": 0.3}}}}}
    async with harness(tmp_path, policies=policies) as h:
        out = await h.executor.execute("faulty__sleep", {"seconds": 5})
        # the 5 s sleep is within the server's 10 s tool timeout: only the per-tool 0.3 s cut it
        assert out.kind == "timeout" and out.attempts >= 1
        with anyio.fail_after(5):  # the caller's 0.3 s shortens the server's 10 s tool timeout
            out = await h.executor.execute("faulty__hang", {}, timeout=0.3)
        assert out.kind == "timeout"
        assert (await h.executor.execute("faulty__echo", {"text": "still alive"})).ok


async def test_tool_errors_are_typed_and_neutral(tmp_path: Path) -> None:
    async with harness(tmp_path, policies={"breaker": {"minimum_calls": 2}}) as h:
        for _ in range(5):
            out = await h.executor.execute("faulty__fail", {"message": "boom"})
            assert out.kind == "tool_error" and out.result is not None and "boom" in out.text()
        assert (await h.executor.execute("faulty__echo", {"text": "x"})).ok  # breaker still closed


async def _peak_in_flight(executor: Executor, calls: int) -> tuple[int, float]:
    """Run `calls` 0.3 s sleeps at once; returns the most in flight at any poll and the wall time."""
    peak = 0

    async def one() -> None:
        assert (await executor.execute("faulty__sleep", {"seconds": 0.3})).ok

    async def watch() -> None:
        nonlocal peak
        while True:
            row = next(r for r in executor.health() if r.name == "faulty")
            peak = max(peak, row.in_flight)
            await anyio.sleep(0.02)

    t0 = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        async with anyio.create_task_group() as group:
            for _ in range(calls):
                group.start_soon(one)
        tg.cancel_scope.cancel()
    return peak, time.perf_counter() - t0


async def test_concurrency_limit(tmp_path: Path) -> None:
    async with harness(tmp_path, max_concurrent_calls=2) as h:
        peak, wall = await _peak_in_flight(h.executor, 5)
        assert peak == 2
        assert wall >= 0.85  # 3 waves of 0.3 s


async def test_global_concurrency_limit_below_the_servers_own(tmp_path: Path) -> None:
    """The global limit still binds when it is lower than the server limits add up to (the call path
    skips it only when it cannot bind)."""
    policies = {"max_concurrent_calls_global": 2}
    async with harness(tmp_path, max_concurrent_calls=4, policies=policies) as h:
        assert h.executor._global_binds
        peak, wall = await _peak_in_flight(h.executor, 5)
        assert peak == 2
        assert wall >= 0.85  # 3 waves of 0.3 s


async def test_parent_secrets_never_reach_stdio_servers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "parent-secret")
    monkeypatch.setenv("GITHUB_TOKEN", "ghp_parent")
    async with harness(tmp_path, env={"CONFIGURED": "yes"}) as h:
        for name, expected in [
            ("AWS_SECRET_ACCESS_KEY", "<unset>"),
            ("GITHUB_TOKEN", "<unset>"),
            ("CONFIGURED", "yes"),
        ]:
            out = await h.executor.execute("faulty__env", {"name": name})
            assert out.text() == expected, name


async def test_cancellation_propagates_and_is_audited(tmp_path: Path) -> None:
    async with harness(tmp_path, policies={"audit_path": "audit.jsonl"}) as h:
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:

                async def cancel_mid_call() -> None:
                    await wait_for_call(h.calls_log, "hang")  # the call is at the server, in flight
                    scope.cancel()

                tg.start_soon(cancel_mid_call)
                await h.executor.execute("faulty__hang", {})
        assert scope.cancelled_caught
        h.executor.audit.flush()
        outcomes = [json.loads(x).get("outcome") for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
        assert outcomes == [None, "cancelled"]
        row = next(r for r in h.executor.health() if r.name == "faulty")
        assert row.in_flight == 0 and row.breaker == "closed"
        assert (await h.executor.execute("faulty__echo", {"text": "x"})).ok
