"""Compiled CPU decode (inference/compiled_decode.py) agrees with eager decode, compiles once for growing contexts,
and falls back to eager when compiling or running a compiled step fails."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from inference import attention as reference
from inference.attention_backends import REFERENCE
from inference.compiled_decode import CompiledDecode, compile_unsupported, static_decode_attention
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.loader import load_model
from inference.metadata import AttentionMetadata, HostBatch
from inference.params import SamplingParams
from tests.inference.test_cuda_graphs import tiny_config, tiny_llama
from tests.inference.test_hf_equivalence import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-llama-compiled")
    build_tiny_model(folder, "llama", seed=3)
    return load_model(str(folder), dtype="float32", device="cpu")


def workload(n: int = 11, seed: int = 5, vocab: int = 400) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(2, 40))] for _ in range(n)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 24), ignore_eos=True) for _ in prompts
    ]
    return prompts, params


def engine(tiny: Any, *, compile: bool, build: Callable[[LLMEngine], Any] | None = None) -> LLMEngine:
    config = EngineConfig(
        num_blocks=200, block_size=4, max_num_seqs=12, max_num_batched_tokens=64, max_model_len=128
    )
    eng = LLMEngine(tiny, config)
    if compile:
        (build or (lambda e: e.runner.build_compiled_decode()))(eng)
    return eng


def test_compiled_engine_generates_what_eager_does(tiny: Any) -> None:
    """Inductor's C++ code through the real scheduler: chunked prefill, batches from 12 rows (eager) down to one
    (compiled), contexts crossing many 4-token blocks: the same greedy tokens, and no compile after the start."""
    prompts, params = workload()
    want = engine(tiny, compile=False).generate(prompts, params)
    eng = engine(tiny, compile=True)
    compiled = eng.runner.compiled
    assert compiled is not None and compiled.steps == 0
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    got = eng.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert compiled.steps > 10 and compiled.failed is None
    assert eng.metrics().batch_size_max > compiled.max_rows  # the big steps ran eagerly
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames, "a step recompiled"


def test_static_attention_with_the_new_kv_equals_the_reference_after_the_write() -> None:
    """The compiled step's attention reads the new position from the step's K/V, not from the cache: the same as
    the reference attention once the write is done, for rows of different lengths padded to one table width."""
    torch.manual_seed(0)
    block, blocks, kv_heads, heads, dim = 4, 24, 2, 6, 8
    kv = torch.randn(2, blocks, block, kv_heads, dim)
    context = torch.tensor([1, 5, 12, 9], dtype=torch.int32)
    tables = torch.zeros(4, 3, dtype=torch.int32)  # padded with the null block past each row's own blocks
    tables[0, :1], tables[1, :2], tables[2, :3], tables[3, :3] = (
        torch.tensor([3]), torch.tensor([7, 2]), torch.tensor([5, 9, 11]), torch.tensor([1, 4, 6]),
    )  # fmt: skip
    slots = torch.stack(
        [tables[i, (int(c) - 1) // block] * block + (int(c) - 1) % block for i, c in enumerate(context)]
    )
    meta = AttentionMetadata(
        slot_mapping=slots.long(),
        query_start_loc=torch.arange(5, dtype=torch.int32),
        context_lens=context,
        block_tables=tables,
        max_query_len=1,
        max_context_len=12,
        block_size=block,
    )
    q, k, v = torch.randn(4, heads, dim), torch.randn(4, kv_heads, dim), torch.randn(4, kv_heads, dim)
    before = kv.clone()
    got = static_decode_attention(q, kv, meta, 0.3, (k, v))
    assert torch.equal(kv, before)  # nothing written
    reference.write_kv(kv, k, v, meta.slot_mapping)
    want = reference.paged_attention(q, kv, meta, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(static_decode_attention(q, kv, meta, 0.3), want, rtol=1e-5, atol=1e-5)


def test_where_it_does_not_compile() -> None:
    cfg = tiny_config()
    cpu = torch.device("cpu")
    assert compile_unsupported(cpu, "reference", cfg) is None
    assert "for the CPU" in (compile_unsupported(torch.device("cuda"), "reference", cfg) or "")
    assert "not triton" in (compile_unsupported(cpu, "triton", cfg) or "")
    ntk = tiny_config(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert "dynamic NTK" in (compile_unsupported(cpu, "reference", ntk) or "")


def failing_compiler(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
    raise RuntimeError("no C++ compiler on this machine")


def test_a_failing_compile_is_logged_and_the_engine_stays_eager(tiny: Any) -> None:
    prompts, params = workload(4)
    want = engine(tiny, compile=False).generate(prompts, params)
    with capture_logs() as logs:
        eng = engine(
            tiny, compile=True, build=lambda e: e.runner.build_compiled_decode(backend=failing_compiler)
        )
    assert eng.runner.compiled is None
    failed = [e for e in logs if e["event"] == "compiled_decode_failed"]
    assert failed and "no C++ compiler" in failed[0]["reason"] and failed[0]["fallback"] == "eager"
    assert all(layer.self_attn.attn_backend is REFERENCE for layer in tiny.model.layers)  # put back
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in want]


def test_a_compiled_step_failing_mid_generation_falls_back_to_eager(tiny: Any) -> None:
    """Never a crash mid-generation: the failing step reruns eagerly (its cache writes are idempotent), and every
    later step runs eagerly."""
    calls = 0

    def flaky(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        def run(*args: Any) -> Any:
            nonlocal calls
            calls += 1
            if calls > 8:  # two warm-up calls, then six good steps
                raise RuntimeError("kernel crashed")
            return gm.forward(*args)

        return run

    prompts, params = workload(3, seed=9)
    want = engine(tiny, compile=False).generate(prompts, params)
    eng = engine(tiny, compile=True, build=lambda e: e.runner.build_compiled_decode(backend=flaky))
    compiled = eng.runner.compiled
    assert compiled is not None
    with capture_logs() as logs:
        got = eng.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert compiled.steps == 6 and compiled.failed == "RuntimeError: kernel crashed"
    assert [e["event"] for e in logs].count("compiled_decode_failed") == 1


@pytest.mark.skipif(
    torch.cuda.is_available(),
    reason="build_tiny loads on the GPU where there is one; compiled decode is the CPU path",
)
def test_steps_with_adapter_hooks_run_eagerly(tmp_path: Path) -> None:
    """The graphs were traced without LoRA hooks: once an adapter is loaded, decode steps go eager (and still
    apply the adapter)."""
    from tests.inference.test_lora import build_tiny

    lora = build_tiny(tmp_path, "llama")
    config = EngineConfig(block_size=4, max_model_len=64, num_blocks=128)
    prompts, params = workload(3, seed=2, vocab=300)
    params = [
        SamplingParams(temperature=0.0, max_tokens=p.max_tokens, ignore_eos=True, adapter="plain")
        for p in params
    ]
    want = LLMEngine(lora.loaded, config, adapters=lora.paths).generate(prompts, params)
    eng = LLMEngine(lora.loaded, config, adapters=lora.paths)
    compiled = eng.runner.build_compiled_decode(backend="eager")
    assert compiled is not None and eng.lora.hooked
    assert [o.token_ids for o in eng.generate(prompts, params)] == [o.token_ids for o in want]
    assert compiled.steps == 0


def test_steps_that_run_compiled() -> None:
    """Decode steps of 1-8 rows whose tables are close in length; not prefill, not more rows, not rows whose padded
    gather would copy over 1.5x the blocks they hold."""
    compiled = CompiledDecode(tiny_llama(), torch.zeros(2, 2, 40, 4, 2, 16), max_rows=8, backend="eager")

    def step(contexts: list[int], new_tokens: int = 1) -> HostBatch:
        n = len(contexts)
        width = max(-(-c // 4) for c in contexts)
        return HostBatch(
            input_ids=np.zeros(n * new_tokens, np.int64),
            positions=np.zeros(n * new_tokens, np.int64),
            slot_mapping=np.zeros(n * new_tokens, np.int64),
            query_start_loc=np.arange(0, n * new_tokens + 1, new_tokens, dtype=np.int32),
            context_lens=np.array(contexts, np.int32),
            block_tables=np.zeros((n, width), np.int32),
            sample_indices=np.arange(n, dtype=np.int64),
            max_query_len=new_tokens,
            max_context_len=max(contexts),
        )

    assert compiled.fits(step([1])) and compiled.fits(step([900]))
    assert compiled.fits(step([60, 64])) and compiled.fits(step([64] * 8))
    assert not compiled.fits(step([4, 64]))  # 32 blocks gathered for 17 held
    assert not compiled.fits(step([64] * 9))
    assert not compiled.fits(step([5, 9], new_tokens=2))  # prefill chunks
    compiled.failed = "RuntimeError: kernel crashed"
    assert not compiled.fits(step([1]))
