"""X-LoRA adapters (inference/xlora.py) equal PEFT's XLoraModel on a tiny random Llama: logits (dense and
layerwise gates, with and without top-k, a deep classifier, a nonzero scaling-pass value), greedy tokens in the
engine, a batch mixing X-LoRA, LoRA and base rows, the prefix cache; the scaling pass's own KV cache over long
generations, under preemption and on prefix hits; typed errors for bad X-LoRA folders."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.errors import AdapterError, RequestError
from inference.loader import LoadedModel, load_model
from inference.lora import LoRAManager
from inference.params import SamplingParams
from inference.xlora import XLoRAAdapter, read_any_adapter
from tests.inference.test_lora import ALL, cfg, greedy, make_adapter, prefill_logits
from tests.inference.test_models import PROMPT, _hf_model, hf_greedy, save_tiny_tokenizer

peft = pytest.importorskip("peft")

# three experts on different projections, so the X-LoRA layers are their union (PEFT's module order)
EXPERTS: dict[str, dict[str, Any]] = {
    "math": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
    "code": {"r": 2, "lora_alpha": 4, "use_rslora": True, "target_modules": ["q_proj", "k_proj", "o_proj"]},
    "chat": {"r": 3, "lora_alpha": 6, "target_modules": ["gate_proj", "up_proj", "v_proj"]},
}
# gate variants (XLoraConfig keywords)
GATES: dict[str, dict[str, Any]] = {
    "dense": {},
    "layerwise": {"layerwise_scalings": True, "softmax_temperature": 0.7},
    "topk": {"top_k_lora": 2, "enable_softmax": False, "enable_softmax_topk": True},
    "deep-layerwise-topk": {
        "layerwise_scalings": True,
        "top_k_lora": 1,
        "xlora_depth": 3,
        "xlora_size": 24,
        "global_scaling_weight": 0.6,
    },
    "pass-value": {"scaling_pass_value": 0.4, "top_k_lora": 2, "layerwise_scalings": True},
}


def make_xlora(folder: Path, experts: dict[str, Path], seed: int, **gate: Any) -> Any:
    """A PEFT X-LoRA over `experts` on a fresh copy of the tiny Llama, its classifier random (large enough that
    the gate moves the output), saved to `folder`. PEFT 0.21's save_pretrained writes the config but drops
    classifier weights whose layer index matches an expert's index (all of a depth-1 classifier), so the
    classifier is written from the model's state dict under the same keys."""
    from safetensors.torch import save_file

    hf = _hf_model("llama")
    hf.config.use_cache = False  # XLoraModel refuses a KV cache
    config = peft.XLoraConfig(
        task_type="CAUSAL_LM",
        hidden_size=hf.config.hidden_size,
        # PEFT 0.21 loads expert i under the name "i" and activates the config's names: only "0", "1", ... work
        adapters={str(i): str(v) for i, v in enumerate(experts.values())},
        **gate,
    )
    model = peft.get_peft_model(hf, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "internal_xlora_classifier" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    model.save_pretrained(str(folder))
    classifier = {
        k: v.contiguous() for k, v in model.state_dict().items() if "internal_xlora_classifier" in k
    }
    save_file(classifier, str(folder / "adapter_model.safetensors"))
    return model.eval()


@dataclass
class World:
    hf: Any
    loaded: LoadedModel
    lora: dict[str, Any]
    experts: dict[str, Path]
    root: Path


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("xlora")
    hf = _hf_model("llama")
    hf.save_pretrained(str(root / "base"))
    save_tiny_tokenizer(root / "base")
    loaded = load_model(root / "base", dtype=torch.float32)
    experts, lora = {}, {}
    for i, (name, kw) in enumerate(EXPERTS.items()):
        experts[name] = root / name
        lora[name] = make_adapter("llama", experts[name], seed=30 + i, **kw)
    return World(hf, loaded, lora, experts, root)


@pytest.fixture(scope="module")
def gates(world: World) -> dict[str, tuple[Path, Any]]:
    out = {}
    for i, (name, gate) in enumerate(GATES.items()):
        folder = world.root / f"x-{name}"
        out[name] = (folder, make_xlora(folder, world.experts, seed=50 + i, **gate))
    return out


@pytest.mark.parametrize("gate", list(GATES))
def test_logits_equal_peft(world: World, gates: dict[str, tuple[Path, Any]], gate: str) -> None:
    folder, model = gates[gate]
    manager = LoRAManager(world.loaded.model, world.loaded.config, torch.device("cpu"), block_size=4)
    manager.add(read_any_adapter("x", folder, world.loaded.config))
    manager.load("math", world.experts["math"])
    prompts = [PROMPT, PROMPT[3:14], PROMPT[::-1]]
    rows: list[tuple[list[int], str | None]] = [(prompts[0], "x"), (prompts[1], None), (prompts[2], "math")]
    ours, _ = prefill_logits(world.loaded, rows, manager)
    with torch.no_grad():
        expected = model(torch.tensor([PROMPT])).logits[0]
        torch.testing.assert_close(ours[0], expected, atol=1e-4, rtol=1e-4)
        # the gate matters: neither the base model nor any single expert gives these logits
        base = world.hf(torch.tensor([PROMPT])).logits[0]
        assert (expected - base).abs().max() > 1e-2
        for expert in world.lora.values():
            assert (expected - expert(torch.tensor([PROMPT])).logits[0]).abs().max() > 1e-3
        # the other rows of the same batch are untouched by the X-LoRA rows
        torch.testing.assert_close(
            ours[1], world.hf(torch.tensor([prompts[1]])).logits[0], atol=1e-4, rtol=1e-4
        )
        math_expected = world.lora["math"](torch.tensor([prompts[2]])).logits[0]
        torch.testing.assert_close(ours[2], math_expected, atol=1e-4, rtol=1e-4)


def test_read_structure(world: World, gates: dict[str, tuple[Path, Any]]) -> None:
    folder, model = gates["deep-layerwise-topk"]
    adapter = read_any_adapter("x", folder, world.loaded.config)
    assert isinstance(adapter, XLoRAAdapter)
    assert adapter.experts == ("0", "1", "2")
    # every layer adapts all seven projections through some expert: PEFT's count of X-LoRA layers
    assert adapter.n_layers == model.base_model.internal_xlora_classifier.n_layers == 3 * 7
    assert [tuple(w.shape) for w, _ in adapter.classifier] == [(24, 64), (24, 24), (3 * 21, 24)]
    assert adapter.options.top_k == 1 and adapter.options.layerwise_scalings
    with pytest.raises(AttributeError):  # frozen
        adapter.name = "y"  # type: ignore[misc]


@pytest.mark.parametrize("gate", ["layerwise", "pass-value"])
def test_greedy_equals_peft_generate(world: World, gates: dict[str, tuple[Path, Any]], gate: str) -> None:
    folder, model = gates[gate]
    engine = LLMEngine(world.loaded, cfg(num_blocks=64), adapters={"x": folder})
    for ids in (PROMPT, PROMPT[5:9]):
        tokens = engine.generate([ids], greedy(8, "x"))[0].token_ids
        assert tokens == hf_greedy(model, ids, 8)
        assert tokens != hf_greedy(world.hf, ids, 8)  # the adapter changes what is generated


def test_mixed_batch_equals_alone(world: World, gates: dict[str, tuple[Path, Any]]) -> None:
    adapters = {"x": gates["dense"][0], "y": gates["topk"][0], "math": world.experts["math"]}
    engine = LLMEngine(world.loaded, cfg(num_blocks=256), adapters=adapters)
    assert {a.name: a.kind for a in engine.adapters()} == {"x": "xlora", "y": "xlora", "math": "lora"}
    names: list[str | None] = ["x", None, "math", "y"] * 2
    prompts = [PROMPT[i : i + 6 + i] for i in range(len(names))]
    mixed = engine.generate(prompts, [greedy(6, a) for a in names])
    assert engine.metrics().batch_size_max == len(names)  # they shared steps
    for ids, name, out in zip(prompts, names, mixed, strict=True):
        alone = LLMEngine(world.loaded, cfg(num_blocks=64), adapters=adapters)
        assert alone.generate([ids], greedy(6, name))[0].token_ids == out.token_ids, name
    x_model = gates["dense"][1]
    assert mixed[0].token_ids == hf_greedy(x_model, prompts[0], 6)


def test_prefix_cache_keys_blocks_by_xlora_adapter(world: World, gates: dict[str, tuple[Path, Any]]) -> None:
    folder, model = gates["dense"]
    engine = LLMEngine(
        world.loaded, cfg(num_blocks=128), adapters={"x": folder, "math": world.experts["math"]}
    )
    prompt = PROMPT + PROMPT  # 34 tokens: 8 full blocks

    def cached(adapter: str | None) -> tuple[int, list[int]]:
        before = engine.block_manager.prefix_hit_tokens
        out = engine.generate([prompt], greedy(8, adapter))[0]
        return engine.block_manager.prefix_hit_tokens - before, out.token_ids

    assert cached(None)[0] == 0
    assert cached("x")[0] == 0  # the base model's blocks are not the X-LoRA adapter's
    hit, tokens = cached("x")
    assert hit == 32  # the X-LoRA prefill started after 32 cached tokens: the gate still saw them all
    assert tokens == hf_greedy(model, prompt, 8)
    assert cached("math")[0] == 0


def long_cfg(**settings: Any) -> EngineConfig:
    return EngineConfig(block_size=4, max_model_len=128, **settings)


def peft_logprobs(model: Any, ids: list[int]) -> torch.Tensor:
    """PEFT's log-probabilities at every position of `ids` (X-LoRA is causal: one forward over the whole
    sequence gives what its generate computes at each step)."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def assert_peft_steps(model: Any, prompt: list[int], tokens: list[int], logprobs: list[Any] | None) -> None:
    """Each generated token is PEFT's greedy choice after the tokens before it (so the tokens are its generate's),
    with PEFT's log-probability (fp32, 1e-4)."""
    expected = peft_logprobs(model, prompt + tokens)
    steps = list(range(len(prompt) - 1, len(prompt) + len(tokens) - 1))
    assert expected[steps].argmax(dim=-1).tolist() == tokens
    assert logprobs is not None and len(logprobs) == len(tokens)
    ours = torch.tensor([lp["logprob"] for lp in logprobs])
    torch.testing.assert_close(ours, expected[steps, tokens], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("gate", "budget"), [("layerwise", 2048), ("pass-value", 5)])
def test_long_generation_equals_peft(
    world: World, gates: dict[str, tuple[Path, Any]], gate: str, budget: int
) -> None:
    """72 tokens: every decode step's scaling pass runs only its new token, against the pass's cached KV (with a
    budget of 5 tokens a step, the 17-token prompt is prefilled in four chunks, each against the ones before)."""
    folder, model = gates[gate]
    engine = LLMEngine(
        world.loaded, long_cfg(num_blocks=96, max_num_batched_tokens=budget), adapters={"x": folder}
    )
    params = SamplingParams(temperature=0.0, max_tokens=72, ignore_eos=True, adapter="x", logprobs=0)
    out = engine.generate([PROMPT], params)[0]
    assert len(out.token_ids) == 72
    assert engine.metrics().steps == 72 + (3 if budget == 5 else 0)  # prefill chunks, one decode step a token
    assert_peft_steps(model, PROMPT, out.token_ids, out.logprobs)
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_usable_blocks  # both caches' blocks went back with the request


def test_preemption_under_a_small_pool_keeps_the_tokens(
    world: World, gates: dict[str, tuple[Path, Any]]
) -> None:
    adapters = {"x": gates["dense"][0], "math": world.experts["math"]}
    names: list[str | None] = [None, "math", "x"]  # the X-LoRA request is the newest: preempted first
    prompts = [PROMPT, PROMPT[2:12], PROMPT[4:15]]
    alone = [
        LLMEngine(world.loaded, long_cfg(num_blocks=64), adapters=adapters).generate([p], greedy(40, a))[0]
        for p, a in zip(prompts, names, strict=True)
    ]
    # 32 usable blocks: the three need 15 + 13 + 2 * 13 at their longest, the X-LoRA one 26 alone
    engine = LLMEngine(world.loaded, long_cfg(num_blocks=33), adapters=adapters)
    with pytest.raises(RequestError, match="X-LoRA request of up to 65 tokens needs 34 KV blocks"):
        engine.add_request(None, PROMPT, greedy(48, "x"))  # could never fit its two caches
    ids = [engine.add_request(None, p, greedy(40, a)) for p, a in zip(prompts, names, strict=True)]
    bm, scheduler = engine.block_manager, engine.scheduler
    done: dict[str, list[int]] = {}
    xlora_preempted = False
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        tables = [t for s in scheduler.running for t in (s.block_table, s.pass_block_table)]
        assert bm.num_used_blocks == len({b for t in tables for b in t})  # the pass's blocks are counted
        for seq in scheduler.running:
            if seq.params.adapter == "x":
                assert len(seq.pass_block_table) == len(seq.block_table) > 0
        for seq in scheduler.waiting:
            assert seq.block_table == seq.pass_block_table == []
            xlora_preempted |= seq.params.adapter == "x" and seq.num_preemptions > 0
    assert xlora_preempted and scheduler.num_preemptions > 0
    assert [done[i] for i in ids] == [o.token_ids for o in alone]  # both caches rebuilt on recompute
    assert bm.num_free_blocks == bm.num_usable_blocks


def test_prefix_hit_reuses_the_scaling_pass_cache(world: World, gates: dict[str, tuple[Path, Any]]) -> None:
    (dense, dense_model), (valued, valued_model) = gates["dense"], gates["pass-value"]
    engine = LLMEngine(world.loaded, long_cfg(num_blocks=128), adapters={"x": dense, "v": valued})
    bm = engine.block_manager

    def run(prompt: list[int], adapter: str | None) -> tuple[int, list[int], list[Any] | None]:
        before = bm.prefix_hit_tokens
        params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, adapter=adapter, logprobs=0)
        out = engine.generate([prompt], params)[0]
        return bm.prefix_hit_tokens - before, out.token_ids, out.logprobs

    prompt = PROMPT + PROMPT[::-1]  # 34 tokens
    hit, first, _ = run(prompt, "x")
    assert hit == 0
    hit, tokens, logprobs = run(prompt, "x")
    assert hit == 32 and tokens == first  # both caches' 8 blocks reused: the scaling pass ran 2 tokens
    assert_peft_steps(dense_model, prompt, tokens, logprobs)
    # blocks written by decode steps are cached too (both caches): a prompt that goes on from the answer
    longer = prompt + first[:10]
    hit, tokens, logprobs = run(longer, "x")
    assert hit == 40
    assert_peft_steps(dense_model, longer, tokens, logprobs)
    # scaling_pass_value 0: the scaling pass is the base model, its blocks the base model's
    hit, tokens, _ = run(prompt, None)
    assert hit == 32 and tokens == hf_greedy(world.hf, prompt, 12)
    # a nonzero scaling_pass_value runs the experts in the scaling pass: no blocks in common with the base model
    assert run(prompt, "v")[0] == 0
    hit, tokens, logprobs = run(prompt, "v")
    assert hit == 32
    assert_peft_steps(valued_model, prompt, tokens, logprobs)
    assert bm.num_free_blocks == bm.num_usable_blocks


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    raw = json.loads(path.read_text())
    raw.update(changes)
    path.write_text(json.dumps(raw))


def test_bad_xlora_folders_are_typed_errors(
    world: World, gates: dict[str, tuple[Path, Any]], tmp_path: Path
) -> None:
    config = world.loaded.config
    good = gates["dense"][0]

    def refused(folder: Path, *words: str) -> None:
        with pytest.raises(AdapterError) as info:
            read_any_adapter("bad", folder, config)
        message = str(info.value)
        assert "'bad'" in message
        for word in words:
            assert word in message, message

    refused(tmp_path / "nowhere", "is not a folder")
    missing_expert = _copy(good, tmp_path / "missing-expert")
    _edit_config(missing_expert, adapters={"0": str(world.experts["math"]), "gone": str(tmp_path / "gone")})
    refused(missing_expert, "expert 'gone' is missing")
    no_weights = _copy(good, tmp_path / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    refused(no_weights, "adapter_model.safetensors is missing")
    layerwise = _copy(good, tmp_path / "layerwise")  # the classifier gives 3 scalings, not 3 per projection
    _edit_config(layerwise, layerwise_scalings=True)
    refused(layerwise, "classifier layer 0 is (3, 64), expected (63, 64)")
    deeper = _copy(good, tmp_path / "deeper")
    _edit_config(deeper, xlora_depth=2)
    refused(deeper, "classifier layers [0]", "needs [0, 3]")
    too_many = _copy(good, tmp_path / "topk")
    _edit_config(too_many, top_k_lora=4)
    refused(too_many, "top_k_lora=4")
    other_base = _copy(good, tmp_path / "other-base")
    _edit_config(other_base, hidden_size=128)
    refused(other_base, "hidden_size 128, this model 64")
    # PEFT 0.21's own save_pretrained writes no classifier for a one-layer gate: refused, not run with zeros
    peft_saved = tmp_path / "peft-saved"
    make_xlora(peft_saved, world.experts, seed=1)
    from safetensors.torch import save_file

    save_file({}, str(peft_saved / "adapter_model.safetensors"))
    refused(peft_saved, "holds classifier layers []")
    # an expert this runtime cannot serve is refused with the expert named
    lm_head = tmp_path / "lm-head-expert"
    make_adapter("llama", lm_head, seed=2, r=2, lora_alpha=2, target_modules=["q_proj", "lm_head"])
    with_lm_head = _copy(good, tmp_path / "with-lm-head")
    _edit_config(
        with_lm_head, adapters={"0": str(world.experts["math"]), "1": str(lm_head), "2": str(lm_head)}
    )
    refused(with_lm_head, "expert '1'", "lm_head")
    # the engine survives a bad load and still serves
    engine = LLMEngine(world.loaded, cfg(num_blocks=64))
    with pytest.raises(AdapterError):
        engine.load_adapter("bad", layerwise)
    engine.load_adapter("x", good)
    assert engine.generate([PROMPT], greedy(4, "x"))[0].completion_tokens == 4


@pytest.mark.anyio
async def test_hot_load_on_async_engine(world: World, gates: dict[str, tuple[Path, Any]]) -> None:
    from inference.async_engine import AsyncEngine

    folder, model = gates["deep-layerwise-topk"]
    async with AsyncEngine(LLMEngine(world.loaded, cfg(num_blocks=64))) as engine:
        with anyio.fail_after(60):
            info = await engine.load_adapter("x", folder)  # read on a worker thread, the format detected
            assert info.name == "x" and info.target_modules == tuple(ALL) and info.kind == "xlora"
            assert info.rank == 4  # the largest expert rank
            outputs = [o async for o in engine.generate(PROMPT, greedy(6, "x"))]
            assert outputs[-1].token_ids == hf_greedy(model, PROMPT, 6)
            assert await engine.unload_adapter("x") is True


def test_xlora_steps_stay_on_torch_beside_the_triton_lora_kernels(
    world: World, gates: dict[str, tuple[Path, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the Triton LoRA path (`kernels="triton"`, interpreted here) a step with an X-LoRA row applies every adapter
    with torch (its columns are scaled per row), and still gives PEFT's logits; a step with LoRA rows only launches
    the kernels."""
    pytest.importorskip("triton")
    from tests.inference.test_triton_lora_engine import count_launches

    launches = count_launches(monkeypatch)
    folder, model = gates["dense"]
    config = world.loaded.config
    manager = LoRAManager(world.loaded.model, config, torch.device("cpu"), block_size=4, kernels="triton")
    manager.add(read_any_adapter("x", folder, config))
    manager.load("math", world.experts["math"])
    rows: list[tuple[list[int], str | None]] = [(PROMPT, "x"), (PROMPT[3:14], None), (PROMPT[::-1], "math")]
    ours, _ = prefill_logits(world.loaded, rows, manager)
    assert launches == []
    with torch.no_grad():
        torch.testing.assert_close(ours[0], model(torch.tensor([PROMPT])).logits[0], atol=1e-4, rtol=1e-4)
        math_expected = world.lora["math"](torch.tensor([PROMPT[::-1]])).logits[0]
        torch.testing.assert_close(ours[2], math_expected, atol=1e-4, rtol=1e-4)
    lora_only, _ = prefill_logits(world.loaded, rows[1:], manager)
    assert len(launches) == 4 * config.num_layers
    torch.testing.assert_close(lora_only[1], ours[2], atol=1e-4, rtol=1e-4)
    for name in ("x", "math"):
        manager.unload(name)
