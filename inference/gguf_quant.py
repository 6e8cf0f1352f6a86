"""A GGUF file's linear weights straight into our quantized layouts, named as our model's fused parameters.

`gguf_quant_weights(path, mode)` reads the file with `gguf.GGUFReader` (memory-mapped), converts each linear
weight's raw blocks with `inference.quant` (no float copy of the model: one matrix at a time at most), fuses
q/k/v into `qkv_proj` and gate/up into `gate_up_proj` by stacking rows (codes, scales and zeros are per row, so
stacking is exact), undoes llama.cpp's q/k row interleaving for the `llama` architecture (a row permutation:
exact), and returns `{module name: QuantWeight}` for `install_quant_weights` to put into a built model.

Norms, biases and the embedding are not handled here: they stay on the loader's float path. A tied output head
(no `output.weight`) is built from `token_embd.weight`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import nn

from inference.quant import (
    Int4Weight,
    Int8Weight,
    QuantEmbedding,
    QuantError,
    QuantLinear,
    QuantWeight,
    dequantize_weight,
    gguf_to_int4,
    gguf_to_int8,
    quantize_int4,
    quantize_int8,
)

if TYPE_CHECKING:
    from gguf import GGUFReader

GGUFMode = Literal["int4", "int8", "auto"]

_LAYER_LINEARS = {
    "attn_q": ("self_attn.qkv_proj", 0),
    "attn_k": ("self_attn.qkv_proj", 1),
    "attn_v": ("self_attn.qkv_proj", 2),
    "attn_output": ("self_attn.o_proj", 0),
    "ffn_gate": ("mlp.gate_up_proj", 0),
    "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": ("mlp.down_proj", 0),
}
_SHARDS = {"self_attn.qkv_proj": 3, "mlp.gate_up_proj": 2}
# GGUF types that load into int4 planes without loss of codes
INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q8_0")
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(slots=True)
class GGUFQuantReport:
    """What was converted: tensors per GGUF type and layout, and the bytes our layouts take."""

    tensors: dict[str, int]
    bytes_after: int


def _torch_shape(tensor: Any) -> tuple[int, int]:
    """GGUF lists dimensions fastest first (`[K, N]`); ours are `[N, K]`."""
    dims = [int(d) for d in tensor.shape]
    return (dims[1], dims[0])


def _unpermute_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """The row order that undoes convert_hf_to_gguf's q/k permutation (as loader._unpermute, on row indices)."""
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(n_rows)


def _take_rows(w: QuantWeight, rows: torch.Tensor) -> QuantWeight:
    if isinstance(w, Int8Weight):
        return Int8Weight(w.qweight[rows].contiguous(), w.scales[rows].contiguous())
    return [Int4Weight(p.codes[rows], p.scales[rows], p.zeros[rows], p.group_size) for p in w]


def _stack_rows(parts: Sequence[QuantWeight]) -> QuantWeight:
    if all(isinstance(p, Int8Weight) for p in parts):
        int8s = [p for p in parts if isinstance(p, Int8Weight)]
        return Int8Weight(torch.cat([p.qweight for p in int8s]), torch.cat([p.scales for p in int8s]))
    planes = [p for p in parts if isinstance(p, list)]
    if len(planes) != len(parts) or len({len(p) for p in planes}) != 1:
        # a fused layer whose shards came in different layouts (say Q4_K q with Q6_K v): one int8 for all
        return _stack_rows([_as_int8(p) for p in parts])
    out = []
    for i in range(len(planes[0])):
        group = {p[i].group_size for p in planes}
        if len(group) != 1:
            raise QuantError("shards of a fused layer have different int4 group sizes")
        out.append(
            Int4Weight(
                torch.cat([p[i].codes for p in planes]),
                torch.cat([p[i].scales for p in planes]),
                torch.cat([p[i].zeros for p in planes]),
                planes[0][i].group_size,
            )
        )
    return out


def _as_int8(w: QuantWeight) -> Int8Weight:
    return w if isinstance(w, Int8Weight) else quantize_int8(dequantize_weight(w))


def convert_tensor(tensor: Any, mode: GGUFMode) -> QuantWeight | None:
    """One GGUF matrix (a `ReaderTensor`) in our layout. `auto` keeps the file's choice: int4 planes for the types
    that map exactly (INT4_TYPES), int8 re-quantized per row otherwise (Q6_K), and None for float tensors (they
    stay on the float path). `int4`/`int8` re-target every tensor, float ones quantized like ISQ."""
    from gguf import GGMLQuantizationType as T

    shape = _torch_shape(tensor)
    qtype = T(int(tensor.tensor_type))
    if qtype.name in FLOAT_TYPES:
        if mode == "auto":
            return None
        from gguf.quants import dequantize

        w = torch.from_numpy(np.ascontiguousarray(dequantize(tensor.data, qtype)).reshape(shape))
        return quantize_int8(w) if mode == "int8" else [quantize_int4(w, 32)]
    if mode == "int8" or (mode == "auto" and qtype.name not in INT4_TYPES):
        return gguf_to_int8(tensor.data, qtype, shape)
    return gguf_to_int4(tensor.data, qtype, shape)


def gguf_quant_weights(
    path: str | Path | GGUFReader,
    mode: GGUFMode = "auto",
    *,
    head_mode: GGUFMode | None = None,
    unpermute_qk: bool | None = None,
) -> tuple[dict[str, QuantWeight], GGUFQuantReport]:
    """`{our module name: QuantWeight}` for every linear of the GGUF model at `path` (`layers.3.mlp.down_proj`,
    `lm_head`); `head_mode` for the output head (default `mode`). `unpermute_qk` defaults to the `llama`
    architecture's need (its converter interleaves q/k rows for llama.cpp's RoPE). `path` may be an open
    `GGUFReader` (parsing one takes seconds: its tokenizer's strings)."""
    from gguf import GGUFReader

    reader = path if isinstance(path, GGUFReader) else GGUFReader(str(path))
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else "unknown"
    if unpermute_qk is None:
        unpermute_qk = arch == "llama"

    def scalar(key: str) -> int:
        field = reader.fields.get(f"{arch}.{key}")
        if field is None:
            raise QuantError(f"GGUF file {reader.data.filename} has no {arch}.{key}")
        return int(field.parts[field.data[0]][0])

    n_head = scalar("attention.head_count")
    n_kv = scalar("attention.head_count_kv")
    by_name = {t.name: t for t in reader.tensors}
    shards: dict[str, dict[int, QuantWeight]] = {}
    out: dict[str, QuantWeight] = {}
    counts: dict[str, int] = {}
    for name, tensor in by_name.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in _LAYER_LINEARS:
            continue
        module, shard = _LAYER_LINEARS[parts[2]]
        w = convert_tensor(tensor, mode)
        if w is None:
            continue  # a float tensor in `auto`: the float loader keeps it
        if unpermute_qk and parts[2] in ("attn_q", "attn_k"):
            rows = _unpermute_rows(_torch_shape(tensor)[0], n_head if parts[2] == "attn_q" else n_kv)
            w = _take_rows(w, rows)
        _count(counts, tensor, w)
        full = f"layers.{parts[1]}.{module}"
        if module in _SHARDS:
            shards.setdefault(full, {})[shard] = w
        else:
            out[full] = w
    for full, got in shards.items():
        need = _SHARDS[full.split(".", 2)[2]]
        if sorted(got) != list(range(need)):
            # in `auto`, some shards float and some quantized: the whole fused layer stays on the float path
            if mode != "auto":
                raise QuantError(
                    f"GGUF file {reader.data.filename} lacks shards of {full}: has {sorted(got)}"
                )
            continue
        out[full] = _stack_rows([got[i] for i in range(need)])
    head = by_name.get("output.weight") or by_name.get("token_embd.weight")
    hw = None if head is None else convert_tensor(head, head_mode or mode)
    if head is not None and hw is not None:
        _count(counts, head, hw)
        out["lm_head"] = hw
    report = GGUFQuantReport(counts, sum(_bytes(w) for w in out.values()))
    return out, report


def _count(counts: dict[str, int], tensor: Any, w: QuantWeight) -> None:
    layout = "int8" if isinstance(w, Int8Weight) else f"int4x{len(w)}"
    key = f"{tensor.tensor_type.name}->{layout}"
    counts[key] = counts.get(key, 0) + 1


def _bytes(w: QuantWeight) -> int:
    """Bytes in the kernels' layouts (codes packed two per byte for int4, bf16 scales)."""
    if isinstance(w, Int8Weight):
        return w.qweight.numel() + 2 * w.scales.numel()
    return sum(p.codes.numel() // 2 + 2 * (p.scales.numel() + p.zeros.numel()) for p in w)


def install_quant_weights(model: nn.Module, weights: dict[str, QuantWeight]) -> int:
    """Replace the named `nn.Linear` modules of `model` (and set `lm_head` for a tied head) by `QuantLinear`s
    holding `weights`; biases stay. Returns the layers replaced."""
    done = 0
    for name, w in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        bias = old.bias if isinstance(old, nn.Linear) else None
        if old is not None and not isinstance(old, nn.Linear):
            raise QuantError(f"{name} is a {type(old).__name__}, not a linear layer")
        setattr(parent, child, QuantLinear(w, bias))
        done += 1
    if hasattr(model, "packed_head"):
        model.packed_head = None
    return done


def tie_embedding_to_head(model: nn.Module) -> bool:
    """Give a model whose `lm_head` is a per-channel int8 `QuantLinear` an embedding that reads the same int8 codes
    (`QuantEmbedding.shared_with`): one copy of the table instead of a bf16 embedding plus a quantized head. Lossy for
    the lookup when the head was re-quantized (Q8_0 -> int8 per row). Returns whether it did."""
    head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed_tokens", None)
    if not (isinstance(head, QuantLinear) and head.mode == "int8" and not head.fallback):
        return False
    if not isinstance(embed, nn.Embedding) or embed.weight.shape != (head.out_features, head.in_features):
        return False
    shared = Int8Weight(head.qweight0, head.scales0.float())
    model.embed_tokens = QuantEmbedding.shared_with(shared, embed.weight.dtype)
    return True
