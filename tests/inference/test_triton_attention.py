"""The Triton backend agrees with the reference backend (the oracle) on randomised paged batches.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set here before triton is imported);
on a CUDA machine the same tests run the compiled kernels on the GPU.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

# TRITON_INTERPRET is set in tests/conftest.py where there is no GPU, before anything imports triton
try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - triton ships with the dev environment
    pytest.skip(f"triton cannot be imported: {exc}", allow_module_level=True)

from inference import attention as reference
from inference import attention_backends, envs
from inference import triton_attention as tri
from inference.attention_backends import (
    AttentionBackend,
    AttentionBackendError,
    get_attention_backend,
    set_attention_backend,
)
from inference.metadata import AttentionMetadata

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_BLOCKS = 24
LAYERS = 2  # the cache under test is layer 1 of a 2-layer cache: a strided view, as the models pass it


@dataclass(slots=True)
class Case:
    q: torch.Tensor  # [T, H, D]
    new_k: torch.Tensor  # [T, KVH, D]
    new_v: torch.Tensor
    cache: torch.Tensor  # [2, LAYERS, NUM_BLOCKS, block_size, KVH, D], before this step's writes
    meta: AttentionMetadata


def make_case(
    seqs: list[tuple[int, int]],
    *,
    heads: int = 4,
    kv_heads: int = 2,
    dim: int = 16,
    block_size: int = 16,
    shared: tuple[tuple[int, int, int], ...] = (),
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Case:
    """A batch of sequences given as (context_len, query_len) over shuffled, non-contiguous block tables.

    `shared` holds (owner, sharer, n): the sharer's first n table entries are the owner's first n blocks, as a prefix
    cache hit leaves them. Cache slots hold random values everywhere (stale data the kernels must mask out).
    """
    gen = torch.Generator().manual_seed(seed)
    free = list(range(1, NUM_BLOCKS))
    random.Random(seed).shuffle(free)
    tables = [[free.pop() for _ in range(-(-ctx // block_size))] for ctx, _ in seqs]
    for owner, sharer, n in shared:
        ctx, q_len = seqs[sharer]
        assert ctx - q_len >= n * block_size, "a sharer only writes past its shared (full, cached) blocks"
        tables[sharer][:n] = tables[owner][:n]
    width = max(len(t) for t in tables) + 1  # one zero (null block) column of padding, like a real batch
    block_tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    slots, starts = [], [0]
    for i, ((ctx, q_len), table) in enumerate(zip(seqs, tables, strict=True)):
        block_tables[i, : len(table)] = torch.tensor(table, dtype=torch.int32)
        slots += [table[p // block_size] * block_size + p % block_size for p in range(ctx - q_len, ctx)]
        starts.append(starts[-1] + q_len)
    total = starts[-1]
    shape = (2, LAYERS, NUM_BLOCKS, block_size, kv_heads, dim)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        context_lens=torch.tensor([c for c, _ in seqs], dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        max_query_len=max(q for _, q in seqs),
        max_context_len=max(c for c, _ in seqs),
        block_size=block_size,
    )

    def rand(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen).to(dtype=dtype, device=DEVICE)

    return Case(
        rand(total, heads, dim), rand(total, kv_heads, dim), rand(total, kv_heads, dim), rand(*shape), meta
    )


def run_backend(
    case: Case, backend: str, *, upcast: bool = False, **kwargs: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, cache after the writes) of one backend; `upcast` runs on float32 copies of the same values."""
    conv = (lambda t: t.float()) if upcast else (lambda t: t)
    cache = conv(case.cache).clone()
    layer = cache[:, 1]
    mod = tri if backend == "triton" else reference
    mod.write_kv(layer, conv(case.new_k), conv(case.new_v), case.meta.slot_mapping)
    scale = case.q.shape[-1] ** -0.5
    return mod.paged_attention(conv(case.q), layer, case.meta, scale, **kwargs), cache


def check(case: Case, atol: float = 1e-5, **kwargs: object) -> None:
    want, want_cache = run_backend(case, "reference", upcast=True)
    got, got_cache = run_backend(case, "triton", **kwargs)
    assert got.dtype == case.q.dtype and got.shape == case.q.shape
    assert torch.equal(got_cache.float(), want_cache), "KV write differs from the reference"
    err = (got.float() - want).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol}"


CASES: dict[str, dict] = {
    "decode_batch_partial_pages": {"seqs": [(1, 1), (33, 1), (48, 1), (17, 1)]},
    "prefill_batch": {"seqs": [(20, 20), (7, 7), (1, 1)]},
    "chunked_prefill_offsets": {"seqs": [(40, 9), (33, 16), (64, 2)]},
    "mixed_decode_and_prefill": {"seqs": [(45, 1), (30, 12), (3, 3), (64, 1)]},
    "shared_prefix_pages_prefill": {"seqs": [(40, 8), (50, 18), (37, 5)], "shared": ((0, 1, 2), (0, 2, 2))},
    "shared_prefix_pages_decode": {"seqs": [(40, 1), (35, 1), (17, 1)], "shared": ((0, 1, 2), (0, 2, 1))},
    "gqa_group3_odd_head_dim": {"seqs": [(26, 26), (19, 4), (50, 1)], "heads": 6, "kv_heads": 2, "dim": 24},
    "mha_decode": {"seqs": [(21, 1), (9, 1)], "heads": 2, "kv_heads": 2, "dim": 32},
    "mqa_long_query": {"seqs": [(70, 40)], "heads": 4, "kv_heads": 1},
    "pages_smaller_than_tile": {"seqs": [(22, 1), (13, 6), (9, 9)], "block_size": 4},
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_fp32(name: str) -> None:
    check(make_case(**CASES[name]))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_randomised_batches_fp32(seed: int) -> None:
    """Random lengths, query lengths and prefix sharing between neighbours, decode-only or mixed."""
    rng = random.Random(seed)
    decode_only = seed % 2 == 1
    seqs: list[tuple[int, int]] = []
    shared: list[tuple[int, int, int]] = []
    for i in range(rng.randint(2, 4)):
        ctx = rng.randint(1, 64)
        q_len = 1 if decode_only else rng.randint(1, ctx)
        seqs.append((ctx, q_len))
        prefix_blocks = (ctx - q_len) // 16
        if i > 0 and prefix_blocks and rng.random() < 0.7:
            owner = i - 1
            n = min(prefix_blocks, seqs[owner][0] // 16)
            if n:
                shared.append((owner, i, n))
    check(make_case(seqs, shared=tuple(shared), seed=seed))


@pytest.mark.parametrize("splits", [1, 2, 4])
def test_split_kv_decode_matches_reference(splits: int) -> None:
    """Forced KV partitions, including splits that are empty for the short sequence."""
    check(make_case([(70, 1), (5, 1), (33, 1)]), num_splits=splits)


def test_decode_sized_for_max_model_len_with_padding_rows() -> None:
    """The CUDA-graph decode launch: splits sized for a 4096-token bound, so most are empty for these contexts,
    plus padding rows (context 1, all-zero block table, K/V written to slot 0 of the null block)."""
    case = make_case([(70, 1), (5, 1), (33, 1)])
    pads = 3
    meta = case.meta
    case.meta = AttentionMetadata(
        slot_mapping=torch.cat([meta.slot_mapping, meta.slot_mapping.new_zeros(pads)]),
        query_start_loc=torch.arange(3 + pads + 1, dtype=torch.int32, device=DEVICE),
        context_lens=torch.cat([meta.context_lens, meta.context_lens.new_ones(pads)]),
        block_tables=torch.cat(
            [meta.block_tables, meta.block_tables.new_zeros(pads, meta.block_tables.shape[1])]
        ),
        max_query_len=1,
        max_context_len=4096,
        block_size=meta.block_size,
    )
    # padding rows all carry token 0 at position 0: identical K/V, so their shared slot holds one value
    case.q = torch.cat([case.q, case.q[:1].expand(pads, -1, -1)])
    case.new_k = torch.cat([case.new_k, case.new_k[:1].expand(pads, -1, -1)])
    case.new_v = torch.cat([case.new_v, case.new_v[:1].expand(pads, -1, -1)])
    case.cache[:, 1, 0] = float("nan")  # the null block's stale contents: Triton must never read them
    out, cache = run_backend(case, "triton", num_splits=16)
    auto, _ = run_backend(case, "triton")  # the split count chosen from the bound
    assert torch.isfinite(out).all() and torch.isfinite(cache[:, 1, 0, 0]).all()
    # the reference gathers whole pages and masks afterwards (0 * NaN is NaN): give it a clean null block
    case.cache[:, 1, 0] = 0.0
    want, _ = run_backend(case, "reference", upcast=True)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(auto, want, atol=1e-5, rtol=0)


def test_split_count_must_be_power_of_two() -> None:
    with pytest.raises(ValueError, match="power of two"):
        run_backend(make_case([(20, 1)]), "triton", num_splits=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["mixed_decode_and_prefill", "shared_prefix_pages_decode"])
def test_half_precision_close_to_fp32_reference(name: str, dtype: torch.dtype) -> None:
    """16-bit inputs against the reference run in fp32 on the very same (rounded) values."""
    check(make_case(**CASES[name], dtype=dtype), atol=2e-2)


TILE_VARIANTS = {
    "small_tiles": tri.Tiles(decode_block_n=16, prefill_block_m=16, prefill_block_n=16),
    "large_tiles": tri.Tiles(decode_block_n=128, prefill_block_m=128, prefill_block_n=64, decode_warps=8),
    "wide_keys": tri.Tiles(decode_block_n=64, prefill_block_m=64, prefill_block_n=128, prefill_stages=2),
}


@pytest.fixture
def restore_tiles() -> Any:
    before = tri.tiles()
    yield
    tri.set_tiles(before)


@pytest.mark.parametrize("variant", list(TILE_VARIANTS))
@pytest.mark.parametrize(
    "name",
    ["mixed_decode_and_prefill", "gqa_group3_odd_head_dim", "pages_smaller_than_tile", "mqa_long_query"],
)
def test_every_tile_choice_matches_reference(name: str, variant: str, restore_tiles: None) -> None:
    """The tiles the sweep (benchmarks/triton_tiles.py) may pick change speed only: key tiles smaller and larger than
    a page, query tiles smaller than a GQA group's rows, and split-KV decode all agree with the oracle."""
    tri.set_tiles(TILE_VARIANTS[variant])
    check(make_case(**CASES[name]))
    check(make_case(**{**CASES[name], "seqs": [(40, 1), (30, 1)]}), num_splits=2)


def test_tiles_parse_validate_and_round_trip() -> None:
    t = tri.Tiles.parse(" decode_block_n=64, prefill_warps=8 ,")
    assert t == tri.Tiles(decode_block_n=64, prefill_warps=8)
    assert tri.Tiles.parse(t.spec()) == t and tri.Tiles().spec() == ""
    for spec, message in [
        ("decode_block_n=48", "power of two from 16 to 256"),
        ("prefill_block_m=8", "power of two from 16 to 256"),
        ("decode_warps=3", "1, 2, 4, 8 or 16"),
        ("prefill_stages=0", "from 1 to 6"),
        ("decode_block_n=x", "must be an integer, got 'x'"),
        ("block=32", "is not name=value with a name among"),
        ("decode_block_n", "is not name=value"),
    ]:
        with pytest.raises(ValueError, match=message):
            tri.Tiles.parse(spec)


def test_tiles_from_the_environment(monkeypatch: pytest.MonkeyPatch, restore_tiles: None) -> None:
    attention_backends._resolve.cache_clear()
    try:
        monkeypatch.setenv(envs.TRITON_TILES, "decode_block_n=64,prefill_stages=2")
        assert get_attention_backend("cuda", "triton").name == "triton"
        assert tri.tiles() == tri.Tiles(decode_block_n=64, prefill_stages=2)
        attention_backends._resolve.cache_clear()
        monkeypatch.setenv(envs.TRITON_TILES, "decode_block_n=100")
        with pytest.raises(
            AttentionBackendError, match="AGENT_RUNTIME_TRITON_TILES='decode_block_n=100'"
        ) as err:
            get_attention_backend("cuda", "triton")
        assert err.value.user_facing and "unset it" in (err.value.hint or "")
    finally:
        attention_backends._resolve.cache_clear()


def test_write_kv_casts_and_takes_strided_inputs() -> None:
    """K/V arrive as strided views of the fused qkv projection and in fp32 while the cache is bf16."""
    case = make_case([(20, 5), (9, 3)], dtype=torch.bfloat16)
    t, kvh, d = case.new_k.shape
    qkv = torch.randn(t, (4 + 2 * kvh) * d, device=DEVICE)
    k = qkv[:, 4 * d : (4 + kvh) * d].view(t, kvh, d)
    v = qkv[:, (4 + kvh) * d :].view(t, kvh, d)
    assert not k.is_contiguous()
    want = case.cache.clone()
    got = case.cache.clone()
    reference.write_kv(want[:, 0], k, v, case.meta.slot_mapping)
    tri.write_kv(got[:, 0], k, v, case.meta.slot_mapping)
    assert torch.equal(got, want)
    assert not torch.equal(got, case.cache)


def test_auto_backend_is_reference_on_cpu_and_triton_on_cuda() -> None:
    assert get_attention_backend("cpu").name == "reference"
    assert get_attention_backend(torch.device("cpu"), "auto") is attention_backends.REFERENCE
    assert get_attention_backend("cuda", "reference").name == "reference"
    cuda = get_attention_backend("cuda")
    assert cuda.name == "triton"
    assert cuda.paged_attention is tri.paged_attention and cuda.write_kv is tri.write_kv


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    attention_backends._resolve.cache_clear()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        with pytest.raises(AttentionBackendError) as err:
            get_attention_backend("cpu", "triton")
        assert err.value.user_facing and err.value.hint
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        attention_backends._resolve.cache_clear()
        assert get_attention_backend("cpu", "triton").name == "triton"
    finally:
        attention_backends._resolve.cache_clear()


def test_unknown_backend_name_is_a_user_facing_error() -> None:
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'flash'") as err:
        get_attention_backend("cpu", "flash")
    assert "reference" in (err.value.hint or "")


def test_selected_backend_runs_the_same_contract() -> None:
    """The pair returned for this device is callable exactly like the reference module's functions."""
    backend = get_attention_backend(DEVICE, "triton")
    case = make_case([(30, 6), (12, 1)])
    cache = case.cache.clone()
    backend.write_kv(cache[:, 1], case.new_k, case.new_v, case.meta.slot_mapping)
    out = backend.paged_attention(case.q, cache[:, 1], case.meta, 0.25)
    want_cache = case.cache.clone()
    reference.write_kv(want_cache[:, 1], case.new_k, case.new_v, case.meta.slot_mapping)
    want = reference.paged_attention(case.q, want_cache[:, 1], case.meta, 0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=0)


def _tiny_llama(*, qwen3: bool = False) -> torch.nn.Module:
    """A tiny random Llama; `qwen3` adds per-head q/k RMSNorm and qkv biases, as Qwen3 has."""
    from inference.model_config import ModelConfig
    from inference.models.llama import LlamaForCausalLM

    config = ModelConfig(
        architecture="Qwen3ForCausalLM" if qwen3 else "LlamaForCausalLM", vocab_size=96, hidden_size=64,
        intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
        rope_scaling=None, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=qwen3, qk_norm=qwen3,
        max_position_embeddings=256, bos_token_id=None, eos_token_ids=(), dtype=torch.float32,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)  # large enough that attention patterns are far from uniform
    return model.to(DEVICE).eval()


def _greedy_through_model(
    model: torch.nn.Module, prompts: list[list[int]], steps: int
) -> tuple[list, torch.Tensor]:
    """Chunked prefill (two chunks per prompt, batched), then batched greedy decode; (tokens, all logits)."""
    block = 16
    c = model.config
    kv = torch.zeros(2, c.num_layers, NUM_BLOCKS, block, c.num_kv_heads, c.head_dim, device=DEVICE)
    free = list(range(1, NUM_BLOCKS))
    random.Random(7).shuffle(free)
    tables: list[list[int]] = [[] for _ in prompts]
    lens = [0 for _ in prompts]
    seqs = [list(p) for p in prompts]
    logits_seen = []

    def step(chunks: list[list[int]]) -> torch.Tensor:
        slots, starts, positions, ids = [], [0], [], []
        for i, toks in enumerate(chunks):
            end = lens[i] + len(toks)
            while len(tables[i]) * block < end:
                tables[i].append(free.pop())
            slots += [tables[i][p // block] * block + p % block for p in range(lens[i], end)]
            positions += range(lens[i], end)
            ids += toks
            starts.append(starts[-1] + len(toks))
            lens[i] = end
        bt = torch.zeros(len(chunks), max(map(len, tables)) + 1, dtype=torch.int32)
        for i, t in enumerate(tables):
            bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=DEVICE),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=DEVICE),
            block_tables=bt.to(DEVICE),
            max_query_len=max(map(len, chunks)),
            max_context_len=max(lens),
            block_size=block,
        )
        ids_t = torch.tensor(ids, device=DEVICE)
        hidden = model(ids_t, torch.tensor(positions, device=DEVICE), meta, kv)
        logits = model.compute_logits(hidden[torch.tensor(starts[1:], device=DEVICE) - 1])
        logits_seen.append(logits)
        return logits

    half = [len(p) // 2 for p in prompts]
    step([p[:h] for p, h in zip(prompts, half, strict=True)])
    logits = step([p[h:] for p, h in zip(prompts, half, strict=True)])
    for _ in range(steps):
        nxt = logits.argmax(-1).tolist()
        for s, t in zip(seqs, nxt, strict=True):
            s.append(t)
        logits = step([[t] for t in nxt])
    return seqs, torch.cat(logits_seen)


@pytest.mark.parametrize("qwen3", [False, True], ids=["llama", "qwen3-qk-norm"])
def test_model_generates_the_same_through_the_triton_backend(qwen3: bool) -> None:
    """A real (tiny, random) model: chunked prefill then batched decode through the whole Triton backend (attention
    kernels and fused layer kernels) against the reference backend: same tokens, logits within 1e-5."""
    from inference.triton_layers import TRITON_OPS

    model = _tiny_llama(qwen3=qwen3)
    prompts = [[5, 17, 33, 2, 9, 60, 41, 7, 88, 12, 3, 70, 25, 19, 44, 8, 51, 6, 30, 77], [11, 4, 93, 27, 61]]
    want_tokens, want_logits = _greedy_through_model(model, prompts, steps=4)

    calls: list[str] = []

    def counted(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: object, **kwargs: object) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    ops = TRITON_OPS
    backend = AttentionBackend(
        "triton",
        tri.write_kv,
        counted("attention", tri.paged_attention),
        type(ops)(
            "triton",
            counted("rms_norm", ops.rms_norm),
            counted("add_rms_norm", ops.add_rms_norm),
            counted("silu_and_mul", ops.silu_and_mul),
            counted("norm_rotary", ops.norm_rotary),
        ),
    )
    assert set_attention_backend(model, backend) == model.config.num_layers
    got_tokens, got_logits = _greedy_through_model(model, prompts, steps=4)
    assert set(calls) == {"attention", "rms_norm", "add_rms_norm", "silu_and_mul", "norm_rotary"}
    assert got_tokens == want_tokens
    torch.testing.assert_close(got_logits, want_logits, atol=1e-5, rtol=0)


def test_set_attention_backend_reaches_every_attention_layer() -> None:
    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn_backend = attention_backends.REFERENCE
            self.proj = torch.nn.Linear(2, 2)

    model = torch.nn.Sequential(Layer(), torch.nn.ReLU(), torch.nn.Sequential(Layer()))
    backend = get_attention_backend(DEVICE, "triton")
    assert set_attention_backend(model, backend) == 2
    assert all(m.attn_backend is backend for m in model.modules() if isinstance(m, Layer))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_engine_on_the_triton_backend_matches_transformers(tmp_path: Path, arch: str) -> None:
    """Greedy tokens of the whole engine on the Triton backend (attention kernels, fused layer kernels, decode
    through the graphs' static buffers: captured on a GPU, run eagerly here) equal transformers `generate` on the
    same fp32 weights, on the same device."""
    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model
    from tests.inference.test_hf_equivalence import PROMPTS, build_tiny_model, greedy, hf_greedy

    hf = build_tiny_model(tmp_path, arch).to(DEVICE)
    hf.generation_config.eos_token_id = None
    loaded = load_model(str(tmp_path), dtype="float32", device=DEVICE)
    engine = LLMEngine(loaded, EngineConfig(num_blocks=80, max_num_seqs=4, attention_backend="triton"))
    runner = engine.runner
    assert runner.attention.name == "triton" and runner.attention.layer_ops.name == "triton"
    graphs = runner.decode_graphs if DEVICE.type == "cuda" else runner.build_decode_graphs(capture=False)
    assert graphs is not None and graphs.captured == (DEVICE.type == "cuda")
    outs = engine.generate(PROMPTS, greedy(12))
    assert graphs.replays > 0  # the decode steps went through the static path
    for messages, out in zip(PROMPTS, outs, strict=True):
        ids = loaded.tokenizer.apply_chat_template(messages)
        assert out.token_ids == hf_greedy(hf, ids, 12), f"{arch}: {messages[-1]['content']!r}"
