"""LoRA adapters (inference/lora.py) equal PEFT on tiny random Llama, Qwen2 and Qwen3 models: logits, greedy tokens, and
batches that mix adapters and the base model; typed errors for bad adapters and requests; hot unload drains."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import AdapterError, UnknownAdapterError
from inference.loader import LoadedModel, load_model
from inference.lora import LoRAManager, read_adapter
from inference.metadata import AttentionMetadata
from inference.params import SamplingParams
from inference.sequence import Sequence
from tests.inference.test_models import PROMPT, _hf_model, hf_greedy, save_tiny_tokenizer

peft = pytest.importorskip("peft")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (name, LoraConfig keywords): plain, rsLoRA on a subset, per-module rank and alpha
ADAPTERS: dict[str, dict[str, Any]] = {
    "plain": {"r": 8, "lora_alpha": 16, "target_modules": ALL},
    "rslora": {
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": True,
        "target_modules": ["q_proj", "v_proj", "down_proj"],
    },
    "pattern": {
        "r": 6,
        "lora_alpha": 12,
        "target_modules": ["k_proj", "o_proj", "gate_proj", "up_proj"],
        "rank_pattern": {"gate_proj": 2},
        "alpha_pattern": {"o_proj": 3},
    },
}


def make_adapter(kind: str, folder: Path, seed: int, **lora: Any) -> Any:
    """A PEFT LoRA on a fresh copy of the tiny HF model (same base weights every time), random A and B so that
    every adapted module changes the output; saved to `folder`. Returns the PEFT model."""
    hf = _hf_model(kind, **({"tie_word_embeddings": True} if kind == "qwen2" else {}))
    model = peft.get_peft_model(hf, peft.LoraConfig(**lora))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    model.save_pretrained(str(folder))
    return model.eval()


@dataclass
class Tiny:
    kind: str
    hf: Any
    loaded: LoadedModel
    peft: dict[str, Any]
    paths: dict[str, Path]


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def tiny(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    kind = request.param
    extra = {"tie_word_embeddings": True} if kind == "qwen2" else {}
    return build_tiny(tmp_path_factory.mktemp(f"lora-{kind}"), kind, **extra)


def build_tiny(root: Path, kind: str, **hf_settings: Any) -> Tiny:
    """A tiny random model of `kind` saved under `root/base` and loaded in float32, with the three PEFT adapters
    of `ADAPTERS` beside it (plain, rsLoRA on a subset, per-module rank and alpha)."""
    hf = _hf_model(kind, **hf_settings)
    hf.save_pretrained(str(root / "base"))
    save_tiny_tokenizer(root / "base")
    loaded = load_model(root / "base", dtype=torch.float32)
    models, paths = {}, {}
    for i, (name, lora) in enumerate(ADAPTERS.items()):
        paths[name] = root / name
        models[name] = make_adapter(kind, paths[name], seed=10 + i, **lora)
    return Tiny(kind, hf, loaded, models, paths)


def prefill_logits(
    loaded: LoadedModel, rows: list[tuple[list[int], str | None]], manager: LoRAManager
) -> tuple[list[torch.Tensor], bool]:
    """One batched prefill of several prompts, each under its adapter (or none): every position's logits per
    prompt, and whether the padded batched update ran. Goes through the manager's step ordering like the model
    runner does."""
    c = loaded.config
    bs = 4
    seqs = [Sequence(f"r{i}", ids, SamplingParams(adapter=a)) for i, (ids, a) in enumerate(rows)]
    items = manager.begin_step([(s, len(s.token_ids)) for s in seqs])
    try:
        kv = torch.zeros(2, c.num_layers, 200, bs, c.num_kv_heads, c.head_dim)
        ids, pos, slots, starts, tables = [], [], [], [0], []
        nxt = 1
        for s, n in items:
            table = list(range(nxt, nxt + -(-n // bs)))
            nxt += len(table)
            tables.append(table)
            ids += s.token_ids
            pos += range(n)
            slots += [table[p // bs] * bs + p % bs for p in range(n)]
            starts.append(starts[-1] + n)
        width = max(map(len, tables))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            context_lens=torch.tensor([n for _, n in items], dtype=torch.int32),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            max_query_len=max(n for _, n in items),
            max_context_len=max(n for _, n in items),
            block_size=bs,
        )
        logits = loaded.model.compute_logits(loaded.model(torch.tensor(ids), torch.tensor(pos), meta, kv))
        padded = manager.padded_step
    finally:
        manager.end_step()
    by_id = {s.request_id: logits[starts[i] : starts[i + 1]] for i, (s, _) in enumerate(items)}
    return [by_id[s.request_id] for s in seqs], padded


@pytest.mark.parametrize("pad_limit", [0.0, 2.0], ids=["matmul-per-adapter", "padded-batched"])
def test_logits_equal_peft(tiny: Tiny, pad_limit: float) -> None:
    manager = LoRAManager(
        tiny.loaded.model, tiny.loaded.config, torch.device("cpu"), max_loras=4, pad_limit=pad_limit
    )
    for name, path in tiny.paths.items():
        manager.load(name, path)
    prompts = [PROMPT, PROMPT[2:13], PROMPT[::-1], PROMPT[:7]]
    rows: list[tuple[list[int], str | None]] = [
        (prompts[0], "plain"),
        (prompts[1], None),
        (prompts[2], "rslora"),
    ]
    rows.append((prompts[3], "pattern"))
    ours, padded = prefill_logits(tiny.loaded, rows, manager)
    assert padded == (pad_limit > 0)  # both update paths are tested
    with torch.no_grad():
        for (ids, name), got in zip(rows, ours, strict=True):
            model = tiny.hf if name is None else tiny.peft[name]
            expected = model(torch.tensor([ids])).logits[0]
            torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
            if name is not None:  # the adapter changes the output well beyond the tolerance
                assert (expected - tiny.hf(torch.tensor([ids])).logits[0]).abs().max() > 1e-2
    assert read_adapter("plain", tiny.paths["plain"], tiny.loaded.config).target_modules == tuple(ALL)


def cfg(**settings: Any) -> EngineConfig:
    return EngineConfig(block_size=4, max_model_len=64, **settings)


def greedy(n: int = 10, adapter: str | None = None) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, adapter=adapter)


def test_mixed_batch_equals_alone_and_peft_generate(tiny: Tiny) -> None:
    engine = LLMEngine(tiny.loaded, cfg(num_blocks=256), adapters=tiny.paths)
    rng = random.Random(3)
    names: list[str | None] = [None, "plain", "rslora", "pattern"] * 3
    prompts = [[rng.randrange(2, 300) for _ in range(rng.randint(3, 20))] for _ in names]
    mixed = engine.generate(prompts, [greedy(adapter=a) for a in names])
    assert engine.metrics().batch_size_max == len(names)  # they really shared steps
    for ids, name, out in zip(prompts, names, mixed, strict=True):
        alone = LLMEngine(tiny.loaded, cfg(num_blocks=64), adapters=tiny.paths)
        assert alone.generate([ids], greedy(adapter=name))[0].token_ids == out.token_ids
        reference = tiny.hf if name is None else tiny.peft[name]
        assert hf_greedy(reference, ids, 10) == out.token_ids, name


def test_prefix_cache_never_shares_kv_across_adapters(tiny: Tiny) -> None:
    engine = LLMEngine(tiny.loaded, cfg(num_blocks=128), adapters=tiny.paths)
    prompt = PROMPT + PROMPT  # 34 tokens: 8 full blocks

    def cached(adapter: str | None) -> tuple[int, list[int]]:
        before = engine.block_manager.prefix_hit_tokens
        engine.add_request(None, prompt, greedy(4, adapter))
        outs = [o for _ in range(6) for o in engine.step() if o.finished]
        return engine.block_manager.prefix_hit_tokens - before, outs[0].token_ids

    assert cached("plain")[0] == 0
    hit, tokens = cached("plain")
    assert hit == 32 and tokens == engine.generate([prompt], greedy(4, "plain"))[0].token_ids
    assert cached("rslora")[0] == 0  # same tokens, another adapter: no reuse
    assert cached(None)[0] == 0  # nor the base model
    assert cached(None)[0] == 32
    # an adapter unloaded and loaded again under the same name gets fresh keys (its weights may differ)
    engine.unload_adapter("plain")
    engine.load_adapter("plain", tiny.paths["pattern"])
    assert cached("plain")[0] == 0


def test_lru_cap_on_resident_adapters(tiny: Tiny) -> None:
    engine = LLMEngine(tiny.loaded, cfg(num_blocks=256, max_loras=2), adapters=tiny.paths)
    names = ["plain", "rslora", "pattern", None] * 3
    prompts = [PROMPT[i : i + 9] for i in range(len(names))]
    for i, (p, a) in enumerate(zip(prompts, names, strict=True)):
        engine.add_request(f"q{i}", p, greedy(6, a))
    done: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        running = {s.params.adapter for s in engine.scheduler.running} - {None}
        assert len(running) <= 2
        assert sum(a.resident for a in engine.adapters()) <= 2
    assert engine.lora.loads > 3  # an adapter was evicted and made resident again
    alone = LLMEngine(tiny.loaded, cfg(num_blocks=64), adapters=tiny.paths)
    for i, (p, a) in enumerate(zip(prompts, names, strict=True)):
        assert done[f"q{i}"] == alone.generate([p], greedy(6, a))[0].token_ids


def test_unload_lets_requests_in_flight_finish(tiny: Tiny) -> None:
    engine = LLMEngine(tiny.loaded, cfg(num_blocks=128), adapters=tiny.paths)
    expected = engine.generate([PROMPT], greedy(12, "rslora"))[0].token_ids
    engine.add_request("inflight", PROMPT, greedy(12, "rslora"))
    engine.step()
    engine.step()
    assert engine.unload_adapter("rslora") is False  # one request still runs on it
    with pytest.raises(UnknownAdapterError, match="rslora"):
        engine.add_request(None, PROMPT, greedy(4, "rslora"))
    final = [o for _ in range(20) for o in engine.step() if o.finished]
    assert final[0].token_ids == expected and final[0].finish_reason == "length"
    assert "rslora" not in [a.name for a in engine.adapters()]
    assert engine.unload_adapter("plain") is True  # idle: gone at once


def test_unknown_adapter_in_request_is_a_request_error(tiny: Tiny) -> None:
    engine = LLMEngine(tiny.loaded, cfg(num_blocks=64), adapters={"plain": tiny.paths["plain"]})
    with pytest.raises(UnknownAdapterError, match="'nope' is not loaded") as err:
        engine.add_request(None, PROMPT, greedy(4, "nope"))
    assert "plain" in (err.value.hint or "")
    assert not engine.has_unfinished()
    assert engine.generate([PROMPT], greedy(4))[0].completion_tokens == 4  # the engine is fine


def test_merged_weights_equal_unmerged(tiny: Tiny, tmp_path: Path) -> None:
    engine = LLMEngine(tiny.loaded, cfg(num_blocks=64), adapters=tiny.paths)
    batched = engine.generate([PROMPT], greedy(8, "plain"))[0].token_ids
    merged = load_model(tiny.paths["plain"].parent / "base", dtype=torch.float32)
    read_adapter("plain", tiny.paths["plain"], merged.config).merge_into(merged.model)
    assert LLMEngine(merged, cfg(num_blocks=64)).generate([PROMPT], greedy(8))[0].token_ids == batched


# ---- bad adapters: typed errors naming the adapter ---------------------------------------------------------------


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoadedModel]:
    root = tmp_path_factory.mktemp("lora-bad")
    _hf_model("llama").save_pretrained(str(root / "base"))
    save_tiny_tokenizer(root / "base")
    return root, load_model(root / "base", dtype=torch.float32)


def test_missing_files(llama: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = llama
    with pytest.raises(AdapterError, match=r"adapter 'gone'.*not a folder"):
        read_adapter("gone", tmp_path / "nowhere", loaded.config)
    make_adapter("llama", tmp_path / "a", 1, r=2, lora_alpha=2, target_modules=["q_proj"])
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter 'a'.*adapter_model.safetensors is missing"):
        read_adapter("a", tmp_path / "a", loaded.config)


def test_module_we_do_not_adapt(llama: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = llama
    make_adapter("llama", tmp_path / "head", 1, r=2, lora_alpha=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(AdapterError, match="adapter 'head' adapts 'lm_head'"):
        read_adapter("head", tmp_path / "head", loaded.config)


def test_rank_mismatch(llama: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = llama
    make_adapter("llama", tmp_path / "r", 1, r=4, lora_alpha=4, target_modules=["v_proj"])
    cfg_path = tmp_path / "r" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["r"] = 8
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r"adapter 'r'.*rank 4.*r=8"):
        read_adapter("r", tmp_path / "r", loaded.config)


def test_adapter_for_another_base_model(llama: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = llama
    make_adapter("llama", tmp_path / "wide", 1, r=2, lora_alpha=2, target_modules=["q_proj"])  # hidden 64
    wide = _hf_model("llama", hidden_size=32, intermediate_size=48)
    peft.get_peft_model(wide, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["o_proj"])).save_pretrained(
        str(tmp_path / "narrow")
    )
    with pytest.raises(AdapterError, match=r"adapter 'narrow'.*o_proj maps"):
        read_adapter("narrow", tmp_path / "narrow", loaded.config)
    deep = _hf_model("llama", num_hidden_layers=5)
    peft.get_peft_model(deep, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "deep")
    )
    with pytest.raises(AdapterError, match="adapter 'deep' adapts layer 3, but this model has 3 layers"):
        read_adapter("deep", tmp_path / "deep", loaded.config)
    read_adapter("wide", tmp_path / "wide", loaded.config)  # the right base loads


def test_unsupported_variants_and_names(llama: tuple[Path, LoadedModel], tmp_path: Path) -> None:
    _, loaded = llama
    make_adapter("llama", tmp_path / "dora", 1, r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    with pytest.raises(AdapterError, match="adapter 'dora' uses use_dora"):
        read_adapter("dora", tmp_path / "dora", loaded.config)
    make_adapter("llama", tmp_path / "ok", 1, r=2, lora_alpha=2, target_modules=["q_proj"])
    with pytest.raises(AdapterError, match="invalid adapter name"):
        read_adapter("base:ok", tmp_path / "ok", loaded.config)
    engine = LLMEngine(loaded, cfg(num_blocks=64), adapters={"ok": tmp_path / "ok"})
    with pytest.raises(AdapterError, match="already loaded"):
        engine.load_adapter("ok", tmp_path / "ok")
    with pytest.raises(UnknownAdapterError):
        engine.unload_adapter("missing")


def test_an_adapter_on_a_quantized_base_adds_the_same_update(tmp_path: Path) -> None:
    """A GGUF in bf16 on the CPU now loads into QuantLinear layers by default: the adapter's hooks act on the
    projections' outputs, so the update it adds there is the float model's update, up to bf16 and int8."""
    from inference.quant import QuantLinear

    _hf_model("llama").save_pretrained(str(tmp_path / "base"))
    save_tiny_tokenizer(tmp_path / "base")
    make_adapter("llama", tmp_path / "plain", 10, **ADAPTERS["plain"])
    deltas = {}
    for label, dtype, quantize in (("float", torch.float32, "none"), ("int8", torch.bfloat16, "int8")):
        loaded = load_model(tmp_path / "base", dtype=dtype, quantize=quantize)
        assert any(isinstance(m, QuantLinear) for m in loaded.model.modules()) == (label == "int8")
        manager = LoRAManager(loaded.model, loaded.config, torch.device("cpu"), max_loras=2)
        manager.load("plain", tmp_path / "plain")
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # the test's KV cache in the model's dtype
        try:
            (base, adapted), _ = prefill_logits(loaded, [(PROMPT, None), (PROMPT, "plain")], manager)
        finally:
            torch.set_default_dtype(previous)
        deltas[label] = (adapted - base).float()
    float_delta, int8_delta = deltas["float"], deltas["int8"]
    assert float_delta.abs().mean() > 0.05  # the adapter changes the logits
    cosine = torch.nn.functional.cosine_similarity(float_delta.flatten(), int8_delta.flatten(), dim=0)
    assert cosine > 0.999
    assert (float_delta - int8_delta).abs().max() < 0.1 * float_delta.abs().max()


def test_merging_into_a_quantized_base_is_refused_with_a_hint(tmp_path: Path) -> None:
    _hf_model("llama").save_pretrained(str(tmp_path / "base"))
    save_tiny_tokenizer(tmp_path / "base")
    make_adapter("llama", tmp_path / "plain", 10, **ADAPTERS["plain"])
    loaded = load_model(tmp_path / "base", dtype=torch.bfloat16, quantize="int8")
    adapter = read_adapter("plain", tmp_path / "plain", loaded.config)
    with pytest.raises(AdapterError, match=r"adapter 'plain'.*not a plain linear weight") as refused:
        adapter.merge_into(loaded.model)
    assert "quantize 'none'" in (refused.value.hint or "")
