"""The fused CPU decode step (inference/fused_decode.py, inference/csrc/decode_step.cpp) against the eager model it
replaces: hidden states and K/V writes for every model feature it covers, in both dtypes and both builds; greedy
generation through the engine; the steps it takes and the ones it leaves; failures that fall back to eager."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from structlog.testing import capture_logs

from inference import qgemv
from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.fused_decode import CHECK_TOLERANCE, FusedDecode, fused_unsupported
from inference.loader import LoadedModel, load_model
from inference.metadata import AttentionMetadata, HostBatch
from inference.models.llama import LlamaForCausalLM
from inference.params import SamplingParams
from inference.quant import QuantLinear, quantize_model
from tests.inference.test_cuda_graphs import tiny_config
from tests.inference.test_hf_equivalence import build_tiny_model

ISAS = qgemv.supported_isas()
needs_qgemv = pytest.mark.skipif(qgemv.qgemv_kernel() is None, reason="no build of our kernel for this CPU")

# model shapes the step must cover: GQA, MHA, Qwen2's qkv bias, Llama's o_proj bias, Qwen3's q/k norms, and a head
# size that is no multiple of a vector (the attention's scalar tail)
SHAPES: dict[str, dict[str, Any]] = {
    "gqa": {},
    "mha": {"num_kv_heads": 4},
    "qkv_bias": {"attention_bias": True},
    "o_bias": {"attention_bias": True, "o_proj_bias": True},
    "qk_norm": {"qk_norm": True, "head_dim": 32},
    "head_dim_24": {"num_heads": 8, "num_kv_heads": 2, "head_dim": 24},
}


def quantized_llama(
    shape: str, dtype: torch.dtype, mode: str = "int8", seed: int = 0, **config: Any
) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(dtype=dtype, **SHAPES[shape], **config))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        for name, p in model.named_parameters():
            if "norm" in name:  # norms near 1, as trained models have them
                p.add_(1.0)
    model = model.to(dtype).eval()
    quantize_model(model, mode)  # type: ignore[arg-type]
    return model


def decode_inputs(
    contexts: list[int], block_size: int, num_blocks: int, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """One decode token for each row of context length `contexts[i]` (its K/V written at the last position), each row
    on blocks scattered over the cache."""
    rng = random.Random(seed)
    free = list(range(1, num_blocks))
    rng.shuffle(free)
    width = max(-(-c // block_size) for c in contexts)
    tables = torch.zeros(len(contexts), width, dtype=torch.int32)
    slots = []
    for i, c in enumerate(contexts):
        blocks = [free.pop() for _ in range(-(-c // block_size))]
        tables[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        slots.append(blocks[(c - 1) // block_size] * block_size + (c - 1) % block_size)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.arange(len(contexts) + 1, dtype=torch.int32),
        context_lens=torch.tensor(contexts, dtype=torch.int32),
        block_tables=tables,
        max_query_len=1,
        max_context_len=max(contexts),
        block_size=block_size,
    )
    ids = torch.tensor([rng.randrange(96) for _ in contexts])
    positions = torch.tensor([c - 1 for c in contexts])
    return ids, positions, meta


def random_cache(model: LlamaForCausalLM, num_blocks: int, block_size: int) -> torch.Tensor:
    c = model.config
    gen = torch.Generator().manual_seed(1)
    shape = (2, c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim)
    return torch.randn(shape, generator=gen).to(c.dtype)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def assert_agrees(got: torch.Tensor, want: torch.Tensor) -> None:
    """Each row's hidden state within 5% of the eager one's, and in float32 most rows within 1e-4.

    The two steps differ only in the order of a few float32 sums (and, in bf16, where such a sum then rounds). Now
    and then that moves an activation across a rounding boundary of the next product's int8 blocks, and that row's
    hidden state moves by 0.5-4% while the others stay equal: over 18 random bf16 models, rows were either exact or
    off by 0.7-3.6%. A real mistake (RoPE five positions off) moves every row by over 30%."""
    errors = [relative_error(got[i], want[i]) for i in range(got.shape[0])]
    assert max(errors) < 5e-2, errors
    if got.dtype == torch.float32:
        assert sum(e > 1e-4 for e in errors) <= max(1, len(errors) // 4), errors


def eager_and_fused(
    model: LlamaForCausalLM, contexts: list[int], isa: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """One decode step of rows with `contexts` on scattered 16-token blocks through the eager model and through the
    fused op of build `isa`, each on its copy of one random cache; checks they agree (`assert_agrees`, and every
    layer's K/V) and returns (fused, eager, fused's cache, eager's cache, the step's metadata)."""
    cache = random_cache(model, 24, 16)
    ids, positions, meta = decode_inputs(contexts, 16, 24)
    with torch.inference_mode():
        want_cache = cache.clone()
        want = model(ids, positions, meta, want_cache)
        fused = FusedDecode(model, cache)
        fused.op = qgemv.sibling_op(qgemv.load(isa), "decode_step")
        got = fused.run(ids, positions, meta)
    assert got is not None and fused.failed is None
    assert_agrees(got, want)
    assert relative_error(cache, want_cache) < 5e-3
    return got, want, cache, want_cache, meta


@needs_qgemv
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fused_step_computes_what_the_eager_model_does(shape: str, dtype: torch.dtype, isa: str) -> None:
    """Rows of 1 to 70 tokens of context on scattered 16-token blocks: the final hidden states and every layer's
    K/V in the cache agree with the eager model's."""
    model = quantized_llama(shape, dtype)
    got, want, cache, want_cache, meta = eager_and_fused(model, [1, 16, 17, 40, 70], isa)
    assert got.dtype == dtype and got.shape == want.shape
    # every layer's new K and V where the eager step wrote them, the rest of the cache untouched
    written = torch.zeros(cache.shape[2] * cache.shape[3], dtype=torch.bool)
    written[meta.slot_mapping] = True
    untouched = cache.flatten(2, 3)[:, :, ~written]
    assert torch.equal(untouched, want_cache.flatten(2, 3)[:, :, ~written])


def hold_compact(model: LlamaForCausalLM) -> int:
    """Each int4 product of `model` whose inputs are a multiple of 256 held in GGUF Q4_K's compact form instead (its
    weight quantized again about as Q4_K is: `qgemv.quantize_super_blocks`); how many were."""
    held = 0
    for layer in model.modules():
        if isinstance(layer, QuantLinear) and layer.qgemv_bits == 4 and layer.in_features % 256 == 0:
            ours = layer.qgemv_weight()
            assert ours is not None
            c = qgemv.quantize_super_blocks(ours.dequantize())
            layer.qcodes, layer.qscales, layer.qmins, layer.qsupers = c.codes, c.scales, c.mins, c.supers
            held += 1
    return held


@needs_qgemv
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_k_compact_products_run_fused(dtype: torch.dtype, isa: str) -> None:
    """Products whose scales are Q4_K's own (6-bit, packed as the file packs them, under an fp16 pair per 256
    values, as a Q4_K GGUF loads) pass their super-blocks to the step: it agrees with the eager model on the same
    weights."""
    model = quantized_llama("gqa", dtype, "int4", hidden_size=256, intermediate_size=512, head_dim=64)
    assert hold_compact(model) == 2 * 4  # qkv, o, gate_up and down of both layers
    eager_and_fused(model, [1, 17, 40, 70], isa)


@needs_qgemv
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_long_contexts_and_many_rows_agree_with_eager(mode: str) -> None:
    """Contexts long enough that the attention runs on the thread pool (above 4096 query-key pairs), and a batch
    of 24 rows: the step's other two regimes."""
    model = quantized_llama("gqa", torch.float32, mode, max_position_embeddings=2048)
    for contexts in ([1500, 3], list(range(5, 5 + 24 * 9, 9))):
        cache = random_cache(model, 200, 16)
        ids, positions, meta = decode_inputs(contexts, 16, 200)
        with torch.inference_mode():
            want_cache = cache.clone()
            want = model(ids, positions, meta, want_cache)
            got = FusedDecode(model, cache).run(ids, positions, meta)
        assert got is not None
        assert_agrees(got, want)
        assert relative_error(cache, want_cache) < 1e-3


@needs_qgemv
def test_a_wrong_step_is_told_apart_from_a_right_one() -> None:
    """The tolerance above separates the step from a plausible mistake: RoPE five positions off changes every row
    by over four times as much, and the start-up check catches a wrong weight."""
    model = quantized_llama("gqa", torch.bfloat16)
    cache = random_cache(model, 24, 16)
    ids, positions, meta = decode_inputs([9, 33], 16, 24)
    with torch.inference_mode():
        right = FusedDecode(model, cache.clone()).run(ids, positions, meta)
        shifted = FusedDecode(model, cache.clone()).run(ids, positions + 5, meta)
    assert right is not None and shifted is not None
    assert min(relative_error(shifted[i], right[i]) for i in range(2)) > 0.2
    fused = FusedDecode(model, cache)
    assert fused.check() < CHECK_TOLERANCE
    fused.weights[0] = fused.weights[0] * 0.5  # layer 0's input norm halved
    assert fused.check() >= CHECK_TOLERANCE


def engine_for(loaded: LoadedModel, *, fused: bool) -> LLMEngine:
    config = EngineConfig(
        num_blocks=300,
        block_size=4,
        max_num_seqs=12,
        max_num_batched_tokens=64,
        max_model_len=256,
        fused_decode=fused,
    )
    return LLMEngine(loaded, config)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LoadedModel]:
    """Random tiny HF checkpoints loaded as users load them, quantized to int4 (float32 activations)."""
    loaded = {}
    for arch in ("llama", "qwen2", "qwen3"):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}-fused")
        build_tiny_model(folder, arch, seed=4)
        loaded[arch] = load_model(str(folder), dtype="float32", device="cpu", quantize="int4")
    return loaded


# How far apart eager decoding's best two tokens may be where the fused step takes the other one. These tiny models
# have two int8 activation blocks a row, so one block rounding the other way moves a hidden state by up to 0.5%:
# the eager model itself, its embeddings scaled by 1 + 1e-7 noise, moves a row by 5.5e-3, and a logit by ~0.1.
NEAR_TIE = 0.15


def same_or_near_tie(got: list[int], want: list[int], want_logprobs: list[dict[str, Any]]) -> bool:
    """The same greedy tokens, or the same up to a step where eager decoding's best two tokens were within
    `NEAR_TIE` in log probability and the fused step took the other one (after it the continuations differ)."""
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if a != b:
            (first, lp_first), (second, lp_second) = want_logprobs[i]["top"][:2]
            return {first, second} == {a, b} and lp_first - lp_second < NEAR_TIE
    return True


@needs_qgemv
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_engine_generates_what_eager_does(tiny_models: dict[str, LoadedModel], arch: str) -> None:
    """Through the real loader and scheduler (chunked prefill, decode batches of 12 rows down to one, contexts
    crossing many 4-token blocks): the greedy tokens eager decoding gives (all but near ties), the decode steps
    served fused."""
    loaded = tiny_models[arch]
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 500) for _ in range(rng.randint(2, 60))] for _ in range(11)]
    params = [
        SamplingParams(temperature=0.0, max_tokens=rng.randint(3, 30), ignore_eos=True, logprobs=2)
        for _ in prompts
    ]
    want = engine_for(loaded, fused=False).generate(prompts, params)
    assert engine_for(loaded, fused=False).runner.decode_path == "eager"
    with capture_logs() as logs:
        eng = engine_for(loaded, fused=True)
    fused = eng.runner.fused
    assert fused is not None and fused.steps == 0
    assert [e["decode"] for e in logs if e["event"] == "engine ready"] == ["fused"]
    got = eng.generate(prompts, params)
    assert all(
        same_or_near_tie(g.token_ids, w.token_ids, w.logprobs or []) for g, w in zip(got, want, strict=True)
    )
    # near ties are rare: most requests match token for token
    assert sum(g.token_ids == w.token_ids for g, w in zip(got, want, strict=True)) >= 9
    assert fused.steps > 20 and fused.failed is None
    assert eng.metrics().batch_size_max > 1


@needs_qgemv
def test_which_steps_run_fused() -> None:
    """Decode steps of any number of rows; not prefill or mixed steps (the eager model runs those)."""
    model = quantized_llama("gqa", torch.float32)
    fused = FusedDecode(model, random_cache(model, 8, 4))

    def step(query_lens: list[int]) -> HostBatch:
        n, t = len(query_lens), sum(query_lens)
        return HostBatch(
            input_ids=np.zeros(t, np.int64),
            positions=np.zeros(t, np.int64),
            slot_mapping=np.zeros(t, np.int64),
            query_start_loc=np.concatenate([[0], np.cumsum(query_lens)]).astype(np.int32),
            context_lens=np.full(n, 8, np.int32),
            block_tables=np.zeros((n, 2), np.int32),
            sample_indices=np.arange(n, dtype=np.int64),
            max_query_len=max(query_lens),
            max_context_len=8,
        )

    assert fused.fits(step([1])) and fused.fits(step([1] * 40))
    assert not fused.fits(step([5])) and not fused.fits(step([1, 3]))
    fused.failed = "an earlier failure"
    assert not fused.fits(step([1]))


def test_where_it_does_not_run() -> None:
    """A model with plain float linears, a cache on another dtype, another attention backend: each with its
    reason; the runner then stays op by op."""
    plain = LlamaForCausalLM(tiny_config()).eval()
    cache = torch.zeros(2, 2, 8, 4, 2, 16)
    assert "qgemv" in str(fused_unsupported(plain, cache, "reference"))
    assert "triton" in str(fused_unsupported(plain, cache, "triton"))
    if qgemv.qgemv_kernel() is not None:
        model = quantized_llama("gqa", torch.float32)
        assert fused_unsupported(model, cache, "reference") is None
        assert "bfloat16" in str(fused_unsupported(model, cache.bfloat16(), "reference"))


@needs_qgemv
def test_a_failing_step_is_logged_and_decode_goes_on_eagerly(tiny_models: dict[str, LoadedModel]) -> None:
    """A step the op refuses (here a slot outside the cache) returns None with the reason, once; the engine's
    next steps run eagerly and the request completes with the tokens eager decoding gives."""
    model = quantized_llama("gqa", torch.float32)
    fused = FusedDecode(model, random_cache(model, 8, 4))
    ids, positions, meta = decode_inputs([3], 4, 8)
    meta.slot_mapping = torch.tensor([8 * 4])
    with capture_logs() as logs:
        assert fused.run(ids, positions, meta) is None
    assert fused.failed is not None and "outside the cache" in fused.failed
    assert [e["event"] for e in logs] == ["fused_decode_failed"]

    prompts, params = [[5, 6, 7, 8, 9]], [SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)]
    want = engine_for(tiny_models["llama"], fused=False).generate(prompts, params)
    eng = engine_for(tiny_models["llama"], fused=True)
    runner_fused = eng.runner.fused
    assert runner_fused is not None
    calls = 0
    real_op = runner_fused.op

    def flaky(*args: Any) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise RuntimeError("the op broke mid-generation")
        return real_op(*args)

    runner_fused.op = flaky
    with capture_logs() as logs:
        got = eng.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert runner_fused.failed == "the op broke mid-generation" and runner_fused.steps == 3
    assert eng.runner.decode_path == "eager"
    assert [e["event"] for e in logs].count("fused_decode_failed") == 1


@needs_qgemv
def test_a_step_that_disagrees_at_start_is_not_used(tiny_models: dict[str, LoadedModel]) -> None:
    """The runner's start-up check: an op whose answer differs from the eager model's is logged and left out."""
    eng = engine_for(tiny_models["llama"], fused=False)
    real = FusedDecode.check
    try:
        FusedDecode.check = lambda self: 0.5  # type: ignore[method-assign]
        with capture_logs() as logs:
            assert eng.runner.build_fused_decode() is None
    finally:
        FusedDecode.check = real  # type: ignore[method-assign]
    assert eng.runner.fused is None
    assert [e["event"] for e in logs] == ["fused_decode_wrong"]
    assert eng.runner.build_fused_decode() is not None


@needs_qgemv
def test_compile_gives_way_to_the_fused_step(tiny_models: dict[str, LoadedModel]) -> None:
    """With `compile` on and the fused step serving, the runner does not compile (it would only cost minutes)."""
    config = EngineConfig(num_blocks=64, block_size=4, max_model_len=64, compile=True)
    with capture_logs() as logs:
        eng = LLMEngine(tiny_models["llama"], config)
    assert eng.runner.fused is not None and eng.runner.compiled is None
    off = [e for e in logs if e["event"] == "compiled_decode_off"]
    assert off and "fused decode step" in off[0]["reason"]


@needs_qgemv
def test_bad_arguments_are_errors_not_crashes() -> None:
    """The op checks what it is handed before it reads memory: each mistake a RuntimeError that says what."""
    model = quantized_llama("gqa", torch.float32)
    cache = random_cache(model, 8, 4)
    fused = FusedDecode(model, cache)
    ids, positions, meta = decode_inputs([3, 6], 4, 8)
    with torch.inference_mode():
        x = model.embed_tokens(ids)
        cos, sin = (t.reshape(2, -1).contiguous() for t in model.rotary.cos_sin(positions, x.dtype))

    def call(**change: Any) -> torch.Tensor:
        args: dict[str, Any] = {
            "x": x,
            "cos": cos,
            "sin": sin,
            "weights": fused.weights,
            "ints": fused.ints,
            "final_norm": fused.final_norm,
            "kv_cache": cache,
            "slot_mapping": meta.slot_mapping,
            "block_tables": meta.block_tables,
            "context_lens": meta.context_lens,
            "heads": fused.heads,
            "kv_heads": fused.kv_heads,
            "eps": fused.eps,
            "scale": fused.scale,
        }
        args.update(change)
        return fused.op(*args.values())

    call()  # as handed, it runs
    cases: list[tuple[dict[str, Any], str]] = [
        ({"weights": fused.weights[:-1]}, "tensors a layer"),
        ({"ints": fused.ints[:-1]}, "integers a layer"),
        ({"kv_cache": cache.bfloat16()}, "kv_cache must be"),
        ({"x": x.half()}, "float32 or bfloat16"),
        ({"cos": cos[:1]}, "cos and sin"),
        ({"slot_mapping": meta.slot_mapping.int()}, "slot_mapping"),
        ({"context_lens": torch.tensor([3, 9], dtype=torch.int32)}, "outside the row's block table"),
        ({"block_tables": torch.full_like(meta.block_tables, 8)}, "outside the cache"),
        ({"heads": 3}, "multiple of kv_heads"),
        ({"final_norm": fused.final_norm[:-1]}, "final_norm"),
        ({"weights": [w[:-1] if i == 0 else w for i, w in enumerate(fused.weights)]}, "norm weights"),
    ]
    for change, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**change)


@needs_qgemv
@pytest.mark.smollm2
def test_a_q4_k_gguf_loads_compact_and_decodes_fused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Llama GGUF of Q4_K matrices (random blocks, benchmarks/random_gguf.py, in a tiny shape): every product,
    q/k rows reordered and q/k/v and gate/up stacked, and the tied table hold the file's own scales, their weights
    exactly the file's; the engine's decode steps run fused on them."""
    from benchmarks import random_gguf

    monkeypatch.setitem(random_gguf.SHAPES, "tiny-q4k", random_gguf.Shape(256, 2, 4, 2, 512, 49152, 10000.0))
    path = random_gguf.write("tiny-q4k", "Q4_K", tmp_path)
    loaded = load_model(str(path), dtype="bfloat16")
    exact = load_model(str(path), dtype="float32", quantize="none")
    products = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    assert len(products) == 2 * 4 + 1
    floats = dict(exact.model.named_modules())
    for name, layer in products.items():
        ours = layer.qgemv_weight()
        assert ours is not None and ours.compact, name
        assert layer.weight_bytes() == layer.out_features * layer.in_features // 32 * 18  # the file's bytes
        if name != "lm_head":  # the tied head: the float model holds the table once, as its embedding
            assert torch.equal(ours.dequantize(), floats[name].weight.float()), name
    table = exact.model.embed_tokens.weight.float()
    ids = torch.tensor([0, 7, 49151])
    assert torch.equal(loaded.model.embed_tokens(ids).float(), table[ids].bfloat16().float())
    engine = LLMEngine(loaded, EngineConfig(num_blocks=64, block_size=16, max_num_seqs=4, max_model_len=256))
    out = engine.generate([[1, 2, 3, 4, 5]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0]
    runner = engine.runner
    assert len(out.token_ids) == 6
    assert runner.decode_path == "fused" and runner.fused is not None
    assert runner.fused.steps >= 5 and runner.fused.failed is None
