"""benchmarks/quant_perplexity.py's GGUF copies: every quantized linear re-quantized to the asked type from its
dequantized values, the embedding, float tensors, metadata and tokenizer copied as they were."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.quants import dequantize, quantize

from benchmarks.quant_perplexity import TYPES, requantized_copy

T = gguf.GGMLQuantizationType


def _source(path: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    floats = {
        "token_embd.weight": rng.normal(0, 0.02, (64, 64)).astype(np.float32),
        "blk.0.attn_q.weight": rng.normal(0, 0.02, (64, 64)).astype(np.float32),
        "blk.0.ffn_down.weight": rng.normal(0, 0.02, (64, 128)).astype(np.float32),
    }
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_embedding_length(64)
    w.add_token_list(["<s>", "a", "b"])
    w.add_token_scores([0.0, -1.0, -2.0])
    w.add_tensor("token_embd.weight", quantize(floats["token_embd.weight"], T.Q8_0), raw_dtype=T.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", np.linspace(0.5, 1.5, 64, dtype=np.float32))
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        w.add_tensor(name, quantize(floats[name], T.Q4_1), raw_dtype=T.Q4_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return floats


@pytest.mark.parametrize("qtype", TYPES)
def test_copy_requantizes_the_linears_and_keeps_the_rest(tmp_path: Path, qtype: str) -> None:
    _source(tmp_path / "src.gguf")
    out = requantized_copy(tmp_path / "src.gguf", qtype, tmp_path / f"out.{qtype}.gguf")
    src, dst = gguf.GGUFReader(str(tmp_path / "src.gguf")), gguf.GGUFReader(str(out))
    assert not (tmp_path / f"out.{qtype}.tmp").exists()
    for key in (
        "general.architecture",
        "llama.block_count",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.scores",
    ):
        assert dst.fields[key].contents() == src.fields[key].contents(), key
    before = {t.name: t for t in src.tensors}
    after = {t.name: t for t in dst.tensors}
    assert list(after) == list(before)
    for name in ("token_embd.weight", "blk.0.attn_norm.weight"):  # copied as they were
        assert after[name].tensor_type == before[name].tensor_type
        assert np.array_equal(np.asarray(after[name].data), np.asarray(before[name].data))
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        assert after[name].tensor_type == T[qtype]
        assert tuple(after[name].shape) == tuple(before[name].shape)
        old = dequantize(np.asarray(before[name].data), before[name].tensor_type)
        new = dequantize(np.asarray(after[name].data), after[name].tensor_type)
        # re-quantized from Q4_1's values, not from the original floats
        expected = dequantize(quantize(old, T[qtype]), T[qtype])
        assert np.array_equal(new, expected)
        # and close to them: within the coarser of the two formats' steps
        assert np.abs(new - old).max() < 0.2 * np.abs(old).max()
