"""Compiled CPU decode (inference/compiled_decode.py) agrees with eager decode, compiles once for growing contexts,
and falls back to eager when compiling or running a compiled step fails."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.loader import load_model
from inference.params import SamplingParams
from tests.inference.test_hf_equivalence import build_tiny_model

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="compiled decode is the CPU path")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-llama-compiled")
    build_tiny_model(folder, "llama", seed=3)
    return load_model(str(folder), dtype="float32", device="cpu")


def workload(n: int = 11, seed: int = 5) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 400) for _ in range(rng.randint(2, 40))] for _ in range(n)]
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
