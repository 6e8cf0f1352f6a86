"""GGUF files with random weights in the shapes of bigger models, so that our engine and llama.cpp run the same
larger model: `python -m benchmarks.random_gguf --shape qwen2.5-0.5b --type Q8_0 [--out DIR]`.

Shapes (from the models' published configs): `qwen2.5-0.5b` (hidden 896, 24 layers, 14 heads, 2 KV heads,
intermediate 4864, vocabulary 151936) and `llama-3.2-1b` (hidden 2048, 16 layers, 32 heads, 8 KV heads,
intermediate 8192, vocabulary 128256); both tie the embedding and the head. Both are written as the `llama`
architecture (Qwen2's q/k/v biases are left out: a few thousand additions a step) with SmolLM2's tokenizer (the
packaged GGUF's BPE vocabulary and merges), its token list padded with unused tokens to the shape's vocabulary so
the embedding and the head have their real sizes. Tokens are meaningless; time and memory are not.

Types: Q8_0, Q4_0, Q4_K (Q4_K needs input sizes that are multiples of 256: not Qwen2.5-0.5B's 896, which is why
its real Q4_K_M files hold Q5_0/Q8_0 tensors too). The blocks are random bytes with scales picked so the weights
have a standard deviation near 0.02; norms are ones. Files are written once and reused (the name says the shape and
type). Exits 0 and prints the path.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path("/tmp/agent-runtime-bench-gguf")


@dataclass(frozen=True)
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    rope_theta: float
    context: int = 4096


SHAPES = {
    "qwen2.5-0.5b": Shape(896, 24, 14, 2, 4864, 151936, 1_000_000.0),
    "llama-3.2-1b": Shape(2048, 16, 32, 8, 8192, 128256, 500_000.0),
}
TYPES = ("Q8_0", "Q4_0", "Q4_K")


def _f16(values: np.ndarray) -> np.ndarray:
    return values.astype(np.float16).view(np.uint8).reshape(*values.shape, 2)


def random_blocks(qtype: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 `[rows, bytes per row]` of random blocks of `qtype` whose values have a std near 0.02."""
    if qtype == "Q8_0":
        nb = cols // 32
        raw = np.empty((rows, nb, 34), np.uint8)
        raw[..., 2:] = rng.integers(0, 256, (rows, nb, 32), dtype=np.uint8)  # int8 -128..127, std ~74
        raw[..., 0:2] = _f16(np.full((rows, nb), 0.02 / 74))
    elif qtype == "Q4_0":
        nb = cols // 32
        raw = np.empty((rows, nb, 18), np.uint8)
        raw[..., 2:] = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)  # q - 8, std ~4.6
        raw[..., 0:2] = _f16(np.full((rows, nb), 0.02 / 4.6))
    elif qtype == "Q4_K":
        nb = cols // 256
        raw = rng.integers(0, 256, (rows, nb, 144), dtype=np.uint8)  # 6-bit scales and mins ~32, q ~7.5
        raw[..., 0:2] = _f16(np.full((rows, nb), 0.02 / (32 * 4.6)))  # d
        raw[..., 2:4] = _f16(
            np.full((rows, nb), 0.02 * 7.5 / (32 * 4.6))
        )  # dmin = 7.5 d: values near 0 on average
    else:
        raise SystemExit(f"unknown type {qtype}; known: {', '.join(TYPES)}")
    return raw.reshape(rows, -1)


def _smollm2_tokenizer() -> dict[str, Any]:
    """The packaged SmolLM2 GGUF's tokenizer fields (model, pre, tokens, types, merges, special ids)."""
    from gguf import GGUFReader

    from inference.loader import smollm2_gguf_path

    reader = GGUFReader(str(smollm2_gguf_path()))

    def strings(key: str) -> list[str]:
        f = reader.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def scalar(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.parts[f.data[0]][0]

    types = reader.fields["tokenizer.ggml.token_type"]
    return {
        "model": strings("tokenizer.ggml.model")[0],
        "pre": strings("tokenizer.ggml.pre")[0] if "tokenizer.ggml.pre" in reader.fields else None,
        "tokens": strings("tokenizer.ggml.tokens"),
        "types": [int(types.parts[i][0]) for i in types.data],
        "merges": strings("tokenizer.ggml.merges"),
        "bos": scalar("tokenizer.ggml.bos_token_id"),
        "eos": scalar("tokenizer.ggml.eos_token_id"),
    }


def write(shape_name: str, qtype: str, out: Path) -> Path:
    import gguf
    from gguf import GGMLQuantizationType as T

    shape = SHAPES[shape_name]
    path = out / f"{shape_name}-random-{qtype}.gguf"
    if path.is_file():
        return path
    if qtype == "Q4_K" and (shape.hidden % 256 or shape.intermediate % 256):
        raise SystemExit(f"{shape_name}'s input sizes are not multiples of 256: no Q4_K (use Q4_0)")
    out.mkdir(parents=True, exist_ok=True)
    tok = _smollm2_tokenizer()
    pad = shape.vocab - len(tok["tokens"])
    tokens = tok["tokens"] + [f"<|unused_{i}|>" for i in range(pad)]
    types = tok["types"] + [int(gguf.TokenType.UNUSED)] * pad
    head_dim = shape.hidden // shape.heads
    tmp = path.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(f"{shape_name} random {qtype}")
    w.add_context_length(shape.context)
    w.add_embedding_length(shape.hidden)
    w.add_block_count(shape.layers)
    w.add_feed_forward_length(shape.intermediate)
    w.add_head_count(shape.heads)
    w.add_head_count_kv(shape.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(shape.rope_theta)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(shape.vocab)
    w.add_tokenizer_model(tok["model"])
    if tok["pre"]:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(tok["merges"])
    if tok["bos"] is not None:
        w.add_bos_token_id(int(tok["bos"]))
    if tok["eos"] is not None:
        w.add_eos_token_id(int(tok["eos"]))
    rng = np.random.default_rng(0)
    raw_type = T[qtype]
    kv = shape.kv_heads * head_dim

    def matrix(name: str, rows: int, cols: int) -> None:
        w.add_tensor(name, random_blocks(qtype, rows, cols, rng), raw_dtype=raw_type)

    matrix("token_embd.weight", shape.vocab, shape.hidden)
    w.add_tensor("output_norm.weight", np.ones(shape.hidden, np.float32))
    for i in range(shape.layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(shape.hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(shape.hidden, np.float32))
        matrix(f"blk.{i}.attn_q.weight", shape.hidden, shape.hidden)
        matrix(f"blk.{i}.attn_k.weight", kv, shape.hidden)
        matrix(f"blk.{i}.attn_v.weight", kv, shape.hidden)
        matrix(f"blk.{i}.attn_output.weight", shape.hidden, shape.hidden)
        matrix(f"blk.{i}.ffn_gate.weight", shape.intermediate, shape.hidden)
        matrix(f"blk.{i}.ffn_up.weight", shape.intermediate, shape.hidden)
        matrix(f"blk.{i}.ffn_down.weight", shape.hidden, shape.intermediate)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(path)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--type", choices=TYPES, default="Q8_0")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args()
    path = write(args.shape, args.type, args.out)
    print(f"{path} ({path.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
