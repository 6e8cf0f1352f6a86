"""The Triton LoRA kernels inside the engine (inference/lora.py on `kernels="triton"`): a tiny random Llama with
test_lora's three PEFT adapters gives every row the torch path's logits, which are PEFT's, and the same greedy
tokens, also through the decode graphs' static path; an adapter above the buffers' rank capacity runs on torch.

Without a GPU the kernels run under the Triton interpreter and the decode graphs' static path eagerly; on a CUDA
machine the same tests run the compiled kernels and capture the graphs.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with the dev environment
    pytest.skip(f"triton cannot be imported: {exc}", allow_module_level=True)

pytest.importorskip("peft")  # the adapters are made with it (test_lora's fixtures)

from inference import triton_lora
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.lora import LoRAManager, read_adapter
from inference.lora_shapes import lora_buffer_bytes
from inference.params import SamplingParams
from tests.inference.test_lora import Tiny, build_tiny, prefill_logits
from tests.inference.test_models import PROMPT, hf_greedy

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def count_launches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The row count of each `triton_lora.add_lora` launch from now on (the Triton LoRA kernels' entry point)."""
    launches: list[int] = []
    real = triton_lora.add_lora

    def counted(*args: Any, **kwargs: Any) -> None:
        launches.append(args[0].shape[0])
        real(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "add_lora", counted)
    return launches


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """test_lora's tiny Llama and its three PEFT adapters (plain, rsLoRA on a subset, per-module rank and alpha)."""
    return build_tiny(tmp_path_factory.mktemp("triton-lora"), "llama")


def test_model_logits_equal_the_torch_path_and_peft(llama: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """One prefill mixing the three adapters and the base model: the Triton path gives every row the torch path's
    logits (fp32, 1e-4), which are PEFT's, and really ran the kernels."""
    launches = []
    real = triton_lora.add_lora

    def counted(*args: Any, **kwargs: Any) -> None:
        launches.append(args[0].shape)
        real(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "add_lora", counted)
    config = llama.loaded.config
    managers = {
        kind: LoRAManager(llama.loaded.model, config, DEVICE, max_loras=4, kernels=kind)
        for kind in ("torch", "triton")
    }
    rows: list[tuple[list[int], str | None]] = [
        (PROMPT, "plain"),
        (PROMPT[2:13], None),
        (PROMPT[::-1], "rslora"),
        (PROMPT[:7], "pattern"),
    ]
    got = {}
    for kind, manager in managers.items():
        for name, path in llama.paths.items():
            manager.load(name, path)
        got[kind], _ = prefill_logits(llama.loaded, rows, manager)
        for name in llama.paths:  # the next manager hooks the same model
            manager.unload(name)
        if kind == "torch":
            assert launches == []
    # 4 hooked projections per layer, every one adapted by some adapter
    assert len(launches) == 4 * config.num_layers
    with torch.no_grad():
        for (ids, name), ours, theirs in zip(rows, got["triton"], got["torch"], strict=True):
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
            model = llama.hf if name is None else llama.peft[name]
            torch.testing.assert_close(ours, model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)


def test_engine_greedy_tokens_equal_the_torch_path(llama: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole engine (prefill, then decode steps mixing three adapters and base rows) on the Triton kernels gives
    each request the torch path's greedy tokens, which are PEFT's `generate`."""
    steps: list[tuple[int, int]] = []  # (rows, slots with rows) of each launch
    real = triton_lora.add_lora

    def counted(*args: Any, **kwargs: Any) -> None:
        steps.append((args[0].shape[0], int((args[4].lens > 0).sum())))
        real(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "add_lora", counted)
    names: list[str | None] = [None, "plain", "rslora", "pattern"]
    prompts = [PROMPT[i : i + 6 + 2 * i] for i in range(len(names))]

    def run(kernels: str) -> list[list[int]]:
        config = EngineConfig(block_size=4, max_model_len=64, num_blocks=64, lora_kernels=kernels)
        engine = LLMEngine(llama.loaded, config, adapters=llama.paths)
        assert engine.lora.kernels == kernels
        params = [SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, adapter=a) for a in names]
        outs = [o.token_ids for o in engine.generate(prompts, params)]
        for name in llama.paths:  # the hooks go with the last adapter, before the next engine hooks the model
            engine.unload_adapter(name)
        return outs

    triton_tokens = run("triton")
    assert (4, 3) in steps  # decode steps of four rows, three of them on adapters, ran the kernels
    launches = len(steps)
    assert triton_tokens == run("torch")
    assert len(steps) == launches  # the torch engine launched nothing
    for ids, name, tokens in zip(prompts, names, triton_tokens, strict=True):
        assert hf_greedy(llama.hf if name is None else llama.peft[name], ids, 6) == tokens, name


def test_decode_graphs_static_path_with_adapters(llama: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode steps with adapter rows go through the decode graphs' static buffers (captured on CUDA, run eagerly
    here): the kernels read the same segment tensors at every step of a bucket, sized by the bucket, and every
    request gets the eager torch engine's greedy tokens, which are PEFT's, while the batch shrinks and pads."""
    seen: dict[int, set[tuple[int, int, int]]] = {}  # rows -> (order, lens addresses, grid bound) per launch
    real = triton_lora.add_lora

    def spy(*args: Any, **kwargs: Any) -> None:
        segs = args[4]
        seen.setdefault(segs.num_rows, set()).add((segs.order.data_ptr(), segs.lens.data_ptr(), segs.max_len))
        real(*args, **kwargs)

    monkeypatch.setattr(triton_lora, "add_lora", spy)
    names: list[str | None] = [None, "plain", "rslora", "pattern"] * 2 + ["plain", None]
    prompts = [PROMPT[i % 5 : i % 5 + 3 + i] for i in range(len(names))]
    lengths = [3, 8, 5, 7, 4, 6, 8, 3, 5, 7]

    def run(kernels: str, graphs: bool) -> tuple[list[list[int]], LLMEngine]:
        config = EngineConfig(
            block_size=4, max_model_len=64, num_blocks=128, max_num_seqs=12, lora_kernels=kernels
        )
        engine = LLMEngine(llama.loaded, config, adapters=llama.paths)
        if graphs:
            engine.runner.build_decode_graphs(capture=DEVICE.type == "cuda", batch_sizes=(1, 2, 4, 8))
        else:
            engine.runner.decode_graphs = None
        params = [
            SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, adapter=a)
            for n, a in zip(lengths, names, strict=True)
        ]
        outs = [o.token_ids for o in engine.generate(prompts, params)]
        for name in llama.paths:
            engine.unload_adapter(name)
        return outs, engine

    want, _ = run("torch", graphs=False)
    got, engine = run("triton", graphs=True)
    assert got == want
    graphs = engine.runner.decode_graphs
    assert graphs is not None and graphs.replays >= 5
    assert graphs.lora_buckets and graphs.lora_buckets <= {1, 2, 4, 8}
    for bucket in graphs.lora_buckets:  # one set of static tensors per bucket, the bucket as the grid bound
        assert len(seen[bucket]) == 1 and next(iter(seen[bucket]))[2] == bucket
    assert engine.metrics().batch_size_max > graphs.max_batch  # the first steps were too big: eager kernels
    for ids, name, tokens in zip(prompts, names, got, strict=True):
        assert hf_greedy(llama.hf if name is None else llama.peft[name], ids, len(tokens)) == tokens, name


def test_adapter_above_the_rank_capacity_runs_on_torch(llama: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """With max_lora_rank 4, 'rslora' (rank 4) fits the Triton buffers and 'plain' (rank 8) does not: a step with
    'plain' rows runs the torch update, one without runs the kernels, and both give PEFT's logits."""
    launches = count_launches(monkeypatch)
    config = llama.loaded.config
    manager = LoRAManager(llama.loaded.model, config, DEVICE, kernels="triton", max_rank=4)
    for name in ("plain", "rslora"):
        manager.load(name, llama.paths[name])
    assert manager.slots is not None
    assert "needs 24 rank columns" in (
        manager.slots.misfit(read_adapter("plain", llama.paths["plain"], config)) or ""
    )
    per_step = []
    for rows in ([(PROMPT, "rslora"), (PROMPT[:9], None)], [(PROMPT, "plain"), (PROMPT[3:], "rslora")]):
        before = len(launches)
        logits, _ = prefill_logits(llama.loaded, rows, manager)
        per_step.append(len(launches) - before)
        with torch.no_grad():
            for (ids, name), got in zip(rows, logits, strict=True):
                model = llama.hf if name is None else llama.peft[name]
                torch.testing.assert_close(got, model(torch.tensor([ids])).logits[0], atol=1e-4, rtol=1e-4)
    assert per_step == [4 * config.num_layers, 0]
    for name in ("plain", "rslora"):
        manager.unload(name)


def test_buffers_are_what_the_kv_profile_reserves(llama: Tiny) -> None:
    """The buffers the manager allocates at its first adapter are exactly `lora_buffer_bytes`, which the KV-cache
    profile computes from the model's shapes before any adapter exists (inference/memory_profile.py)."""
    config = llama.loaded.config
    for max_loras, max_rank in ((4, 16), (2, 4), (3, 7)):
        manager = LoRAManager(
            llama.loaded.model, config, DEVICE, max_loras, kernels="triton", max_rank=max_rank
        )
        # 'rslora' adapts three projections: the buffers cover all four of every layer
        manager.load("rslora", llama.paths["rslora"])
        assert manager.slots is not None and len(manager.slots.buffers) == 4 * config.num_layers
        allocated = sum(a.nbytes + b.nbytes for a, b in manager.slots.buffers.values())
        assert allocated == lora_buffer_bytes(config, max_loras, max_rank) > 0
        manager.unload("rslora")


def test_resident_adapters_live_only_in_their_slots(llama: Tiny) -> None:
    """On the Triton path the buffers are exactly `lora_buffer_bytes` (what the KV-cache profile reserves, from the
    shapes), and a resident adapter's weights are its slot: the manager's device bytes are the buffers plus the own
    copy of the one adapter above the capacity ('plain', rank 8 over max_lora_rank 4), which has no slot. A step
    with 'plain' rows falls back to torch for both its adapters, reading 'rslora' from its slot, with PEFT's
    logits; 'pattern', evicted for 'plain', comes back into its freed slot."""
    config = llama.loaded.config
    manager = LoRAManager(
        llama.loaded.model, config, DEVICE, max_loras=2, kernels="triton", max_rank=4, pad_limit=0
    )
    for name, path in llama.paths.items():
        manager.load(name, path)
    slots = manager.slots
    assert slots is not None
    buffers = lora_buffer_bytes(config, 2, 4)
    assert sum(a.nbytes + b.nbytes for a, b in slots.buffers.values()) == buffers
    assert manager.device_bytes == buffers  # registered, none resident yet
    plain = read_adapter("plain", llama.paths["plain"], config).nbytes  # float32, as the tiny model
    # both in slots: nothing beside the buffers; then 'pattern' evicted for 'plain', which has no slot; then
    # 'pattern' back in the freed slot, 'plain' evicted
    for rows, resident in (
        ([(PROMPT, "rslora"), (PROMPT[4:], "pattern")], buffers),
        ([(PROMPT, "plain"), (PROMPT[3:], "rslora")], buffers + plain),
        ([(PROMPT[2:], "pattern"), (PROMPT[:9], "rslora")], buffers),
    ):
        logits, padded = prefill_logits(llama.loaded, rows, manager)
        assert not padded and manager.device_bytes == resident
        with torch.no_grad():
            for (ids, name), got in zip(rows, logits, strict=True):
                theirs = llama.peft[name](torch.tensor([ids])).logits[0]
                torch.testing.assert_close(got, theirs, atol=1e-4, rtol=1e-4)
    for name in llama.paths:
        manager.unload(name)
