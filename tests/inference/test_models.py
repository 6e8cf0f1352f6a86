"""Our decoders over the paged KV cache equal Hugging Face transformers on the same (tiny, random) weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from inference.loader import LoadedModel, load_model
from inference.metadata import AttentionMetadata

VOCAB = 320


class PagedRunner:
    """Drives a model step by step over its own paged cache, like the scheduler would (not the real one).

    Blocks are handed out in a shuffled order so every sequence's block table is non-contiguous; block 0 stays the
    null block.
    """

    def __init__(
        self, loaded: LoadedModel, *, num_blocks: int = 96, block_size: int = 4, seed: int = 0
    ) -> None:
        c = loaded.config
        self.model = loaded.model
        self.block_size = block_size
        self.kv = torch.zeros(
            2, c.num_layers, num_blocks, block_size, c.num_kv_heads, c.head_dim, dtype=c.dtype
        )
        self.free = list(range(1, num_blocks))
        random.Random(seed).shuffle(self.free)
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: list[tuple[int, list[int]]]) -> torch.Tensor:
        """Feed each (seq_id, new tokens) chunk in one batch; returns the logits after each chunk's last token."""
        ids, positions, slots, starts, ctx = [], [], [], [0], []
        for seq, toks in chunks:
            table = self.tables.setdefault(seq, [])
            start = self.lens.get(seq, 0)
            end = start + len(toks)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for p in range(start, end):
                slots.append(table[p // self.block_size] * self.block_size + p % self.block_size)
            ids += toks
            positions += range(start, end)
            starts.append(starts[-1] + len(toks))
            ctx.append(end)
            self.lens[seq] = end
        width = max(len(self.tables[s]) for s, _ in chunks) + 2  # extra zero padding like a real batch
        tables = torch.zeros(len(chunks), width, dtype=torch.int32)
        for i, (seq, _) in enumerate(chunks):
            tables[i, : len(self.tables[seq])] = torch.tensor(self.tables[seq], dtype=torch.int32)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            block_tables=tables,
            max_query_len=max(len(t) for _, t in chunks),
            max_context_len=max(ctx),
            block_size=self.block_size,
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), meta, self.kv)
        last = torch.tensor(starts[1:]) - 1
        return self.model.compute_logits(hidden[last])

    def greedy(self, seq: int, prompt: list[int], n: int) -> list[int]:
        """Prefill `prompt`, then n - 1 decode steps; the n greedy tokens."""
        out = [int(self.step([(seq, prompt)])[0].argmax())]
        while len(out) < n:
            out.append(int(self.step([(seq, [out[-1]])])[0].argmax()))
        return out


def save_tiny_tokenizer(folder: Path) -> None:
    """A small byte-level BPE tokenizer (every id < VOCAB) so tiny models load like real folders."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog " * 20, "hello world, paged attention"], trainer
    )
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(
        str(folder)
    )


def _hf_model(kind: str, **overrides: object) -> torch.nn.Module:
    import transformers as tf

    common: dict[str, object] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
    }
    common.update(overrides)
    if kind == "llama":
        cfg = tf.LlamaConfig(**common)
        cls = tf.LlamaForCausalLM
    elif kind == "mistral":
        cfg = tf.MistralConfig(sliding_window=None, **common)
        cls = tf.MistralForCausalLM
    elif kind == "qwen2":
        cfg = tf.Qwen2Config(**common)
        cls = tf.Qwen2ForCausalLM
    elif kind == "qwen3":
        cfg = tf.Qwen3Config(head_dim=32, **common)  # head_dim != hidden/heads, as in real Qwen3
        cls = tf.Qwen3ForCausalLM
    else:
        raise AssertionError(kind)
    torch.manual_seed(1234)
    model = cls(cfg).float().eval()
    with torch.no_grad():
        # Random norm weights and biases so a mapping mistake in them shows up in the logits.
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    model.generation_config.eos_token_id = None  # compare full-length greedy runs
    model.generation_config.pad_token_id = 1
    return model


def hf_greedy(hf: torch.nn.Module, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def build_tiny(tmp_path: Path, kind: str, **overrides: object) -> tuple[torch.nn.Module, LoadedModel]:
    """A tiny random HF model saved to disk and loaded back through load_model (float32)."""
    hf = _hf_model(kind, **overrides)
    folder = tmp_path / kind
    hf.save_pretrained(str(folder))
    save_tiny_tokenizer(folder)
    return hf, load_model(folder, dtype=torch.float32)


PROMPT = [0, 17, 250, 33, 4, 99, 150, 7, 64, 201, 12, 3, 88, 290, 45, 61, 9]


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def tiny(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[torch.nn.Module, LoadedModel]:
    overrides = {"tie_word_embeddings": True} if request.param == "qwen2" else {}
    return build_tiny(tmp_path_factory.mktemp(request.param), request.param, **overrides)


def test_loaded_config_matches_hf(tiny: tuple[torch.nn.Module, LoadedModel]) -> None:
    hf, ours = tiny
    c = ours.config
    assert c.num_layers == 3 and c.num_heads == 4 and c.num_kv_heads == 2
    assert c.dtype == torch.float32
    assert c.attention_bias == (hf.config.model_type == "qwen2")
    assert c.qk_norm == (hf.config.model_type == "qwen3")
    assert c.head_dim == (32 if c.qk_norm else 16)
    assert c.kv_bytes_per_token() == 2 * 3 * 2 * c.head_dim * 4


def test_prefill_logits_match_hf(tiny: tuple[torch.nn.Module, LoadedModel]) -> None:
    hf, ours = tiny
    runner = PagedRunner(ours)
    c = ours.config
    meta_ids = torch.tensor(PROMPT)
    with torch.no_grad():
        expected = hf(meta_ids[None]).logits[0]
    # All positions' logits, not only the last: run the prefill and read every hidden state.
    table = runner.free[: -(-len(PROMPT) // runner.block_size)]
    slots = [
        table[p // runner.block_size] * runner.block_size + p % runner.block_size for p in range(len(PROMPT))
    ]
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, len(PROMPT)], dtype=torch.int32),
        context_lens=torch.tensor([len(PROMPT)], dtype=torch.int32),
        block_tables=torch.tensor([table], dtype=torch.int32),
        max_query_len=len(PROMPT),
        max_context_len=len(PROMPT),
        block_size=runner.block_size,
    )
    hidden = ours.model(meta_ids, torch.arange(len(PROMPT)), meta, runner.kv)
    assert hidden.shape == (len(PROMPT), c.hidden_size)
    logits = ours.model.compute_logits(hidden)
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPT), c.vocab_size)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_greedy_decode_matches_hf_generate(tiny: tuple[torch.nn.Module, LoadedModel]) -> None:
    hf, ours = tiny
    n = 12
    expected = hf_greedy(hf, PROMPT, n)
    assert PagedRunner(ours, seed=7).greedy(0, PROMPT, n) == expected


def test_batched_decode_equals_separate_runs(tiny: tuple[torch.nn.Module, LoadedModel]) -> None:
    _, ours = tiny
    prompts = [PROMPT[:5], PROMPT, PROMPT[3:12]]
    n = 6
    alone = [PagedRunner(ours, seed=i).greedy(i, p, n) for i, p in enumerate(prompts)]
    runner = PagedRunner(ours, seed=42)
    outs: list[list[int]] = [[] for _ in prompts]
    for i, p in enumerate(prompts):  # separate prefills, interleaved block allocation
        outs[i].append(int(runner.step([(i, p)])[0].argmax()))
    for _ in range(n - 1):
        logits = runner.step([(i, [outs[i][-1]]) for i in range(len(prompts))])
        for i in range(len(prompts)):
            outs[i].append(int(logits[i].argmax()))
    assert outs == alone


def test_chunked_and_mixed_prefill_equal_one_shot(tiny: tuple[torch.nn.Module, LoadedModel]) -> None:
    _, ours = tiny
    one_shot = PagedRunner(ours).step([(0, PROMPT)])[0]
    runner = PagedRunner(ours, seed=3)
    # Sequence 1 decodes while sequence 0 prefills in two chunks in the same batches (a mixed batch).
    runner.step([(1, PROMPT[:6])])
    first = runner.step([(0, PROMPT[:7]), (1, [5])])
    second = runner.step([(1, [6]), (0, PROMPT[7:])])
    torch.testing.assert_close(second[1], one_shot, atol=1e-5, rtol=1e-5)
    reference = PagedRunner(ours, seed=5)
    reference.step([(1, PROMPT[:6])])
    torch.testing.assert_close(first[1], reference.step([(1, [5])])[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(second[0], reference.step([(1, [6])])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "rope",
    [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
            "rope_theta": 500000.0,
        },
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "rope_theta": 10000.0},
        # Dynamic NTK only changes frequencies past max_position_embeddings, so the test model gets a short one.
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "max_position_embeddings": 64},
    ],
    ids=lambda r: r["rope_type"],
)
def test_rope_scaling_matches_hf(tmp_path: Path, rope: dict) -> None:
    rope = dict(rope)
    extra = (
        {"max_position_embeddings": rope.pop("max_position_embeddings")}
        if "max_position_embeddings" in rope
        else {}
    )
    hf, ours = build_tiny(tmp_path, "llama", rope_parameters=rope, **extra)
    assert ours.config.rope_scaling is not None and ours.config.rope_scaling["rope_type"] == rope["rope_type"]
    prompt = (PROMPT * 5)[:80]  # past original_max_position_embeddings
    n = 5
    expected = hf_greedy(hf, prompt, n)
    runner = PagedRunner(ours, num_blocks=64, block_size=8)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1]
    torch.testing.assert_close(runner.step([(0, prompt)])[0], ref, atol=1e-4, rtol=1e-4)
    assert PagedRunner(ours, num_blocks=64, block_size=8, seed=1).greedy(0, prompt, n) == expected


def test_bfloat16_load_runs_close_to_float32(tmp_path: Path) -> None:
    _, ours32 = build_tiny(tmp_path, "llama")
    ours16 = load_model(tmp_path / "llama", dtype="bfloat16")
    assert ours16.config.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in ours16.model.parameters())
    a = PagedRunner(ours32).step([(0, PROMPT)])[0]
    b = PagedRunner(ours16).step([(0, PROMPT)])[0]
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
