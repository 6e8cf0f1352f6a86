"""AsyncEngine: streaming, shared batches across concurrent callers, cancellation frees blocks, bad requests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from inference.async_engine import AsyncEngine
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import EngineStoppedError, RequestError
from inference.loader import load_model
from inference.params import SamplingParams
from tests.inference.test_hf_equivalence import build_tiny_model

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Any:
    folder: Path = tmp_path_factory.mktemp("tiny-qwen3")
    build_tiny_model(folder, "qwen3", seed=2)
    return load_model(str(folder), dtype="float32")


@pytest.fixture
async def engine(tiny: Any) -> Any:
    async with AsyncEngine(LLMEngine(tiny, EngineConfig(num_blocks=200, max_model_len=512))) as eng:
        yield eng


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


async def wait_for(cond: Any, limit_s: float = 10.0) -> None:
    """Poll state owned by the step thread (no event crosses threads) under a deadline."""
    with anyio.fail_after(limit_s):
        while not cond():  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_stream_matches_sync_engine(engine: AsyncEngine, tiny: Any) -> None:
    messages = [{"role": "user", "content": "Hello world, how are you?"}]
    deltas: list[str] = []
    ids: list[int] = []
    last = None
    async for out in engine.generate(messages, greedy(12)):
        deltas.append(out.delta_text)
        ids += out.delta_token_ids
        last = out
    assert last is not None and last.finished and last.finish_reason == "length"
    assert ids == last.token_ids and "".join(deltas) == last.text
    config = EngineConfig(num_blocks=200, max_model_len=512)
    expected = LLMEngine(tiny, config).generate([messages], greedy(12))[0]
    assert last.token_ids == expected.token_ids


async def test_concurrent_callers_share_batches(engine: AsyncEngine) -> None:
    results: dict[int, list[int]] = {}

    async def one(i: int) -> None:
        async for out in engine.generate(f"The quick brown fox {i}", greedy(10)):
            if out.finished:
                results[i] = out.token_ids

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for i in range(8):
                tg.start_soon(one, i)
    assert sorted(results) == list(range(8)) and all(len(v) == 10 for v in results.values())
    m = engine.metrics()
    assert m.batch_size_max > 1 and m.max_running_seqs > 1
    assert m.requests_finished == 8 and m.ttft.count == 8


async def test_cancel_mid_stream_frees_blocks(engine: AsyncEngine) -> None:
    bm = engine.engine.block_manager
    free0 = bm.num_free_blocks
    got = 0
    agen = engine.generate("Paged attention keeps the KV cache", greedy(400))
    async for _out in agen:
        got += 1
        if got == 3:
            break
    await agen.aclose()
    await wait_for(lambda: bm.num_free_blocks == free0 and not engine.engine.has_unfinished())
    # a task cancelled while it waits for output aborts its request too
    started = anyio.Event()

    async def consume() -> None:
        async for _ in engine.generate("The quick brown fox", greedy(400)):
            started.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume)
            await started.wait()
            tg.cancel_scope.cancel()
    await wait_for(lambda: bm.num_free_blocks == free0 and not engine.engine.has_unfinished())


async def test_bad_requests_fail_alone(engine: AsyncEngine) -> None:
    async def drain(prompt: Any, params: SamplingParams) -> list[Any]:
        return [o async for o in engine.generate(prompt, params)]

    for prompt, params in [("", greedy(4)), ([1] * 600, greedy(4)), ("hi", SamplingParams(temperature=-1))]:
        with pytest.raises(RequestError):
            await drain(prompt, params)
    outs = await drain("Hello world", greedy(4))
    assert outs[-1].finished and outs[-1].completion_tokens == 4


async def test_the_step_thread_makes_the_model_device_current(
    tiny: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Triton launches and CUDA graph streams follow the calling thread's current GPU, which is per thread: the
    step thread sets the model's device before it steps (a no-op on the CPU, checked here by its call)."""
    import threading

    from inference import async_engine

    seen: list[tuple[str, Any]] = []
    real = async_engine.make_current

    def spy(device: Any) -> None:
        seen.append((threading.current_thread().name, device))
        real(device)

    monkeypatch.setattr(async_engine, "make_current", spy)
    llm = LLMEngine(tiny, EngineConfig(num_blocks=200, max_model_len=512))
    async with AsyncEngine(llm) as eng:
        async for _ in eng.generate([1, 2, 3], greedy(2)):
            pass
    assert seen == [("engine-step", llm.runner.device)]


def test_make_current_selects_only_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from inference.model_runner import make_current

    calls: list[Any] = []
    monkeypatch.setattr(torch.cuda, "set_device", calls.append)
    make_current(torch.device("cpu"))
    make_current(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


async def test_closed_engine_rejects(tiny: Any) -> None:
    eng = AsyncEngine(LLMEngine(tiny, EngineConfig(num_blocks=80)))
    await eng.aclose()
    with pytest.raises(EngineStoppedError):
        async for _ in eng.generate("hello", greedy(2)):
            pass
