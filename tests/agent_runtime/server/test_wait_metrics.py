"""Wait-time histograms, from real components, read back through the Prometheus exposition format: the engine's
admission queue, KV-block waits after preemption and the step-thread hand-off (a tiny real model); the executor's
call slots and approvals (the faulty MCP server); the audit log's write failures."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import anyio
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent_runtime.server.metrics import ServerMetrics
from agent_runtime.tools.audit import AuditLog
from agent_runtime.tools.monitor import WAIT_BUCKETS
from inference.async_engine import AsyncEngine
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.loader import load_model
from inference.params import SamplingParams
from policies.audit import decision_record
from tests.agent_runtime.faulty_harness import harness
from tests.inference.test_hf_equivalence import build_tiny_model

pytestmark = pytest.mark.anyio

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(metrics: ServerMetrics) -> Samples:
    data, _ = metrics.render()
    out = {}
    for family in text_string_to_metric_families(data.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def histogram(s: Samples, name: str, **labels: str) -> tuple[float, float, dict[str, float]]:
    """(count, sum, cumulative buckets by `le`) of one series; checks the buckets are cumulative."""
    key = tuple(sorted(labels.items()))
    buckets = {
        dict(lbl)["le"]: v
        for (n, lbl), v in s.items()
        if n == f"{name}_bucket" and tuple(p for p in lbl if p[0] != "le") == key
    }
    assert len(buckets) == len(WAIT_BUCKETS) + 1, (name, sorted(buckets))
    ordered = [buckets[k] for k in sorted(buckets, key=lambda b: float(b))]
    assert ordered == sorted(ordered), f"{name}: buckets are not cumulative"
    count = s[(f"{name}_count", key)]
    assert buckets["+Inf"] == count
    return count, s[(f"{name}_sum", key)], buckets


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-llama-waits")
    build_tiny_model(folder, "llama", seed=1)
    return load_model(str(folder), dtype="float32")


async def test_engine_waits_are_histograms(tiny: Any) -> None:
    # 13 usable blocks of 16 tokens cannot hold four 110-token sequences at once: some are preempted and
    # wait for blocks; all four arrive together, so the later ones also wait in the admission queue
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 400) for _ in range(70)] for _ in range(4)]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    async with AsyncEngine(LLMEngine(tiny, EngineConfig(num_blocks=14, max_model_len=200))) as engine:

        async def one(p: list[int]) -> None:
            async for _ in engine.generate(p, params):
                pass

        async with anyio.create_task_group() as tg:
            for p in prompts:
                tg.start_soon(one, p)
        snap = engine.metrics()
    assert snap.preemptions > 0
    m = ServerMetrics()
    m.attach_engine("tiny", lambda: snap)
    s = samples(m)
    count, total, _ = histogram(s, "agent_runtime_engine_admission_wait_seconds", model="tiny")
    assert count == 4 and total > 0
    # every preemption ends in a re-admission (all four requests finished)
    count, total, _ = histogram(s, "agent_runtime_engine_kv_wait_seconds", model="tiny")
    assert count == snap.preemptions and total > 0
    count, _, buckets = histogram(s, "agent_runtime_engine_step_wait_seconds", model="tiny")
    assert count == 4 and buckets["120.0"] == 4
    # the quantile gauges of the recent window are still there beside the histogram
    assert ("agent_runtime_engine_queue_wait_seconds", (("model", "tiny"), ("quantile", "0.95"))) in s


async def test_call_slot_and_approval_waits(tmp_path: Path) -> None:
    async def slow_yes(request: Any) -> bool:
        await anyio.sleep(0.05)
        return True

    policies = {"approval": "destructive"}
    async with harness(
        tmp_path, policies=policies, trusted=True, max_concurrent_calls=1, approval_hook=slow_yes
    ) as h:
        m = ServerMetrics()
        m.attach_servers(h.supervisor.servers, h.executor.monitor)
        # one slot: the second of two concurrent calls waits for the first to finish (~0.3 s)
        async with anyio.create_task_group() as tg:
            for _ in range(2):
                tg.start_soon(h.executor.execute, "faulty__sleep", {"seconds": 0.3})
                await anyio.sleep(0.02)
        assert (await h.executor.execute("faulty__echo", {"text": "free slot"})).ok
        # `delete` is unannotated, so destructive: it needs approval, which takes the hook 50 ms (the read-only
        # tools of a trusted server need none)
        assert (await h.executor.execute("faulty__delete", {"path": "/x"})).ok
        s = samples(m)
        count, total, buckets = histogram(s, "agent_runtime_mcp_call_slot_wait_seconds", server="faulty")
        assert count == 4  # every call that reached the slots, waiting or not
        assert buckets[str(WAIT_BUCKETS[0])] == 3  # three found a free slot at once
        assert 0.15 < total < 5, total
        count, total, _ = histogram(s, "agent_runtime_mcp_approval_wait_seconds", server="faulty")
        assert count == 1 and total >= 0.05
        # the global limit does not bind with one server of one slot: nothing waits for it
        count, _, _ = histogram(s, "agent_runtime_mcp_global_call_slot_wait_seconds")
        assert count == 0


def test_audit_write_failures_are_counted(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the audit log's directory should be")
    audit = AuditLog(blocker / "audit.jsonl")
    m = ServerMetrics()
    m.attach_audit(audit)
    record = decision_record(agent=None, server="s", tool="t", digest={}, allowed=True, reason="", secrets=())
    audit.write(record, record)
    audit.flush()
    audit.write(record)
    audit.flush()
    s = samples(m)
    assert s[("agent_runtime_audit_write_failures_total", ())] == 2
    assert s[("agent_runtime_audit_records_lost_total", ())] == 3
    assert s[("agent_runtime_audit_encode_failures_total", ())] == 0
    # a writable path: no failures
    ok = AuditLog(tmp_path / "audit.jsonl")
    m2 = ServerMetrics()
    m2.attach_audit(ok)
    ok.write(record)
    ok.flush()
    ok.close()
    assert samples(m2)[("agent_runtime_audit_write_failures_total", ())] == 0
    assert (tmp_path / "audit.jsonl").read_text().count("\n") == 1
