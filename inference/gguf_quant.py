"""A GGUF model built with its quantized tensors kept quantized: no float copy of the model at any point.

`build_quantized_model(gguf, config, mode)` builds our model on the meta device, converts each linear weight's raw
blocks with `inference.quant` (one matrix at a time), fuses q/k/v into `qkv_proj` and gate/up into `gate_up_proj` by
stacking rows (codes, scales and zeros are per row: exact), undoes llama.cpp's q/k row interleaving for the
`llama` architecture (a row permutation: exact), installs quantized layers (`QuantLinear` for the CPU,
`TritonQuantLinear` for CUDA), and materializes only what stays float:
norms, biases, and the embedding when the file holds it in float.

What each GGUF type becomes (`mode` "auto" keeps the file's choice; "int8" / "int4" re-target):

| GGUF type | auto | int8 | int4 |
| --- | --- | --- | --- |
| Q4_0, Q4_1, Q4_K | int4 group 32, exact codes | int8 per row | int4 group 32, exact codes |
| Q8_0 | int8 blocks of 32, exact (our kernel, below); else int8 per row | the same | int4, `group_size` |
| Q5_0, Q5_1, Q5_K, Q6_K | int8 per row (re-quantized: one kernel) | int8 per row | int4, `group_size` |
| F32, F16, BF16 | int8 per row | int8 per row | int4, `group_size` |
| anything else | UnsupportedQuantTypeError naming the tensor and type | same | same |

Where our own kernel runs on this CPU (inference/qgemv.py; `QuantLinear` then holds int8 and int4 group-32 weights
in its layout), a Q8_0 matrix keeps its own blocks and fp16 scales (`gguf_q8_0_blocks`) instead of a per-row
re-quantization. The output head is per-channel int8 in every mode (a tied head from `token_embd`), but for a tied
4-bit table (Q4_0, Q4_1, Q4_K) in `auto` / `int4` on the CPU, which stays int4 group 32 with the file's codes
(exact, half the bytes of int8), and a Q8_0 one under our kernel (its blocks). The embedding lookup reads a float
table as float and any other type through the tied head's codes where it can (`QGemvEmbedding` for a head in our
kernel's layout, `QuantEmbedding.shared_with` an int8 head, `Int4HeadEmbedding` an int4 one), else its own int8
rows (a Q8_0 table's own blocks, exact).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch import nn

from inference import qgemv
from inference.errors import QuantError, UnsupportedQuantTypeError
from inference.gguf_file import GGUFFile, GGUFTensor, hf_name, unpermute_rows
from inference.quant import (
    Int4HeadEmbedding,
    Int4Weight,
    Int8Weight,
    QGemvEmbedding,
    QuantEmbedding,
    QuantKernels,
    QuantLinear,
    QuantLinearBase,
    QuantReport,
    QuantWeight,
    SuperBlocks,
    dequantize_weight,
    gguf_q8_0_blocks,
    gguf_q8_0_embedding,
    gguf_to_int4,
    gguf_to_int8,
    int4_layout,
    model_weight_bytes,
    per_row,
    quant_linear,
    quantize_int4,
    quantize_int8,
)

if TYPE_CHECKING:
    from inference.model_config import ModelConfig
    from inference.models.layers import CausalLM

GGUFMode = Literal["auto", "int8", "int4"]

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
_UNFUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
EXACT_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")  # one int4 plane of group 32, codes as stored
WIDE_TYPES = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")  # more than 4 bits a value
FLOAT_TYPES = ("F32", "F16", "BF16")
SUPPORTED_TYPES = EXACT_INT4_TYPES + WIDE_TYPES + FLOAT_TYPES


def has_quantized_linears(gguf: GGUFFile) -> bool:
    """Whether any linear weight of the file is block-quantized (else "auto" loads it as a float model)."""
    return any(
        t.type_name not in FLOAT_TYPES
        for t in gguf.tensors
        if t.name.startswith("blk.") and t.name.split(".")[2] in _LAYER_LINEARS
    )


def check_supported_types(gguf: GGUFFile) -> None:
    """UnsupportedQuantTypeError for the first linear (or head) tensor whose type cannot be kept quantized: found
    before anything is converted or cached."""
    for t in gguf.tensors:
        parts = t.name.split(".")
        linear = len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_LINEARS and parts[3] == "weight"
        if (
            linear or t.name in ("output.weight", "token_embd.weight")
        ) and t.type_name not in SUPPORTED_TYPES:
            raise _unsupported(t)


def _unsupported(tensor: GGUFTensor) -> UnsupportedQuantTypeError:
    return UnsupportedQuantTypeError(
        f"GGUF tensor {tensor.name} is stored as {tensor.type_name}, which cannot be kept quantized",
        hint=f"supported types: {', '.join(SUPPORTED_TYPES)}; load the file dequantized with quantize none "
        "(model.quantize: none, --quantize none)",
    )


def _float_matrix(tensor: GGUFTensor) -> torch.Tensor:
    from gguf.quants import dequantize

    values = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    return torch.from_numpy(values.reshape(tensor.torch_shape()))


def convert_tensor(
    tensor: GGUFTensor, mode: GGUFMode, group_size: int, *, q8_blocks: bool = False
) -> QuantWeight:
    """One GGUF matrix in our layout (the table in the module docstring); with `q8_blocks` (our own kernel runs
    here, inference/qgemv.py) a Q8_0 matrix keeps its own blocks under `auto` and `int8`: exact."""
    name = tensor.type_name
    shape = tensor.torch_shape()
    if name not in SUPPORTED_TYPES:
        raise _unsupported(tensor)
    if q8_blocks and name == "Q8_0" and mode != "int4":
        return gguf_q8_0_blocks(tensor.data, shape)
    if name in FLOAT_TYPES:
        w = _float_matrix(tensor)
        return (
            [quantize_int4(w, group_size)]
            if mode == "int4" and shape[1] % group_size == 0
            else quantize_int8(w)
        )
    if mode == "int8" or (mode == "auto" and name in WIDE_TYPES):
        return gguf_to_int8(tensor.data, int(tensor.tensor_type), shape)
    if name in EXACT_INT4_TYPES:
        return gguf_to_int4(tensor.data, int(tensor.tensor_type), shape)
    if shape[1] % group_size:
        return gguf_to_int8(tensor.data, int(tensor.tensor_type), shape)
    return [quantize_int4(_float_matrix(tensor), group_size)]


def head_weight(tensor: GGUFTensor, *, int4_rows: int | None = None, q8_blocks: bool = False) -> QuantWeight:
    """The output head (or the tied embedding) as per-channel int8, whatever the file's type; with `int4_rows` (the
    row block a tied lookup can read, `quant.int4_layout().block`, or 1 with our own kernel) a 4-bit tensor (Q4_0,
    Q4_1, Q4_K) whose rows fill whole blocks stays int4 group 32 with its own codes: exact, and half the bytes a
    decode step reads. With `q8_blocks` a Q8_0 tensor keeps its own blocks (exact)."""
    name = tensor.type_name
    if name not in SUPPORTED_TYPES:
        raise _unsupported(tensor)
    shape = tensor.torch_shape()
    if q8_blocks and name == "Q8_0":
        return gguf_q8_0_blocks(tensor.data, shape)
    if int4_rows and name in EXACT_INT4_TYPES and shape[0] % int4_rows == 0:
        return gguf_to_int4(tensor.data, int(tensor.tensor_type), shape)
    if name in FLOAT_TYPES:
        return quantize_int8(_float_matrix(tensor))
    return gguf_to_int8(tensor.data, int(tensor.tensor_type), shape)


def own_embedding(tensor: GGUFTensor, dtype: torch.dtype) -> QuantEmbedding:
    """An untied quantized embedding table as int8 rows (Q8_0 keeps its own blocks)."""
    if tensor.type_name == "Q8_0":
        return gguf_q8_0_embedding(tensor.data, tensor.torch_shape(), dtype)
    own = head_weight(tensor)
    assert isinstance(own, Int8Weight)
    return QuantEmbedding(own.qweight, own.scales, dtype)


def _take_rows(w: QuantWeight, rows: torch.Tensor) -> QuantWeight:
    if isinstance(w, Int8Weight):
        return Int8Weight(w.qweight[rows].contiguous(), w.scales[rows].contiguous())
    return [
        Int4Weight(
            p.codes[rows],
            p.scales[rows],
            p.zeros[rows],
            p.group_size,
            None if p.super_blocks is None else p.super_blocks.take(rows),
        )
        for p in w
    ]


def _stack_rows(parts: Sequence[QuantWeight]) -> QuantWeight:
    int8s = [p for p in parts if isinstance(p, Int8Weight)]
    planes = [p for p in parts if isinstance(p, list)]
    if len(int8s) == len(parts):
        if len({p.per_block for p in int8s}) > 1:  # Q8_0 blocks fused with another type's per-row int8
            int8s = [per_row(p) for p in int8s]
        return Int8Weight(torch.cat([p.qweight for p in int8s]), torch.cat([p.scales for p in int8s]))
    if (
        len(planes) != len(parts)
        or len({len(p) for p in planes}) != 1
        or len({q.group_size for p in planes for q in p}) != 1
    ):
        # shards of one fused layer in different layouts (say Q4_K q with Q6_K v): int8 for the whole layer
        return _stack_rows([_as_int8(p) for p in parts])
    return [
        Int4Weight(
            torch.cat([p[i].codes for p in planes]),
            torch.cat([p[i].scales for p in planes]),
            torch.cat([p[i].zeros for p in planes]),
            planes[0][i].group_size,
            _stack_super_blocks([p[i].super_blocks for p in planes]),
        )
        for i in range(len(planes[0]))
    ]


def _stack_super_blocks(parts: Sequence[SuperBlocks | None]) -> SuperBlocks | None:
    """The shards' own Q4_K scales stacked, or None unless every shard has them (the fused layer then holds fp16
    scales)."""
    have = [p for p in parts if p is not None]
    if len(have) != len(parts):
        return None
    return SuperBlocks(torch.cat([p.packed for p in have]), torch.cat([p.pairs for p in have]))


def _as_int8(w: QuantWeight) -> Int8Weight:
    if isinstance(w, Int8Weight):
        return w
    return quantize_int8(dequantize_weight(w))


def gguf_linear_weights(
    gguf: GGUFFile,
    mode: GGUFMode,
    group_size: int,
    *,
    unpermute_qk: bool | None = None,
    int4_head_rows: int | None = None,
    q8_blocks: bool = False,
) -> tuple[dict[str, QuantWeight], dict[str, int]]:
    """`{our module name: QuantWeight}` for every linear of the file (`layers.3.mlp.down_proj`, `lm_head`; q/k/v
    and gate/up fused) and the count of tensors per `type->layout`. `unpermute_qk` defaults to what the `llama`
    architecture needs; `q8_blocks` keeps Q8_0 matrices as they are (`convert_tensor`)."""
    if unpermute_qk is None:
        unpermute_qk = gguf.architecture == "llama"
    n_head, n_kv = gguf.arch_int("attention.head_count"), gguf.arch_int("attention.head_count_kv")
    if n_head is None:
        raise QuantError(f"GGUF file {gguf.path.name} has no {gguf.architecture}.attention.head_count")
    n_kv = n_kv or n_head
    shards: dict[str, dict[int, QuantWeight]] = {}
    out: dict[str, QuantWeight] = {}
    counts: dict[str, int] = {}
    for tensor in gguf.tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight" or parts[2] not in _LAYER_LINEARS:
            continue
        module, shard = _LAYER_LINEARS[parts[2]]
        w = convert_tensor(tensor, mode, group_size, q8_blocks=q8_blocks)
        if unpermute_qk and parts[2] in ("attn_q", "attn_k"):
            rows = unpermute_rows(tensor.torch_shape()[0], n_head if parts[2] == "attn_q" else n_kv)
            w = _take_rows(w, torch.from_numpy(rows))
        _count(counts, tensor, w)
        full = f"layers.{parts[1]}.{module}"
        if module in _SHARDS:
            shards.setdefault(full, {})[shard] = w
        else:
            out[full] = w
    for full, got in shards.items():
        need = _SHARDS[full.split(".", 2)[2]]
        if sorted(got) != list(range(need)):
            raise QuantError(f"GGUF file {gguf.path.name} lacks parts of {full}: has shards {sorted(got)}")
        out[full] = _stack_rows([got[i] for i in range(need)])
    head = gguf.by_name.get("output.weight") or gguf.by_name.get("token_embd.weight")
    if head is not None:
        hw = head_weight(head, int4_rows=int4_head_rows if mode != "int8" else None, q8_blocks=q8_blocks)
        _count(counts, head, hw)
        out["lm_head"] = hw
    return out, counts


def _count(counts: dict[str, int], tensor: GGUFTensor, w: QuantWeight) -> None:
    if isinstance(w, Int8Weight):
        layout = "int8 g32" if w.per_block else "int8"
    else:
        layout = f"int4 g{w[0].group_size}" + ("" if len(w) == 1 else f" x{len(w)}")
    key = f"{tensor.type_name}->{layout}"
    counts[key] = counts.get(key, 0) + 1


def install_quant_weights(
    model: nn.Module, weights: dict[str, QuantWeight], kernels: QuantKernels = "cpu"
) -> int:
    """Replace the named `nn.Linear` modules of `model` (and set `lm_head` for a tied head) by quantized layers for
    `kernels` holding `weights`; biases stay (as they are: meta ones are materialized later). Returns the layers
    replaced."""
    done = 0
    for name, w in weights.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child, None)
        if old is not None and not isinstance(old, nn.Linear):
            raise QuantError(f"{name} is a {type(old).__name__}, not a linear layer")
        bias = old.bias if isinstance(old, nn.Linear) else None
        layer = quant_linear(w, None, kernels)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=False)  # the same (possibly meta) tensor
        setattr(parent, child, layer)
        done += 1
    return done


def tie_embedding_to_head(model: nn.Module) -> bool:
    """Give a model whose `lm_head` is a per-channel int8 quantized layer an embedding that reads the same int8 codes
    (`QuantEmbedding.shared_with`): one copy of the table instead of two. Returns whether it did."""
    head = getattr(model, "lm_head", None)
    embed = getattr(model, "embed_tokens", None)
    if not isinstance(head, QuantLinearBase):
        return False
    if not isinstance(embed, nn.Embedding | QuantEmbedding | Int4HeadEmbedding | QGemvEmbedding):
        return False
    if (embed.num_embeddings, embed.embedding_dim) != (head.out_features, head.in_features):
        return False
    dtype = embed.weight.dtype if isinstance(embed, nn.Embedding) else embed.dtype
    if isinstance(head, QuantLinear) and head.qgemv is not None:
        model.embed_tokens = QGemvEmbedding(head, dtype)
        return True
    int8 = head.int8_weight()
    if int8 is not None:
        model.embed_tokens = QuantEmbedding.shared_with(int8, dtype)
        return True
    if isinstance(head, QuantLinear) and head.mode == "int4" and head.layout is not None:
        model.embed_tokens = Int4HeadEmbedding(head, dtype)
        return True
    return False


def _float_tensors(
    gguf: GGUFFile, wanted: set[str], unpermute_qk: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """The file's tensors that stay float, by Hugging Face name (norms, biases, a float embedding)."""
    n_head = gguf.arch_int("attention.head_count") or 1
    n_kv = gguf.arch_int("attention.head_count_kv") or n_head
    for tensor in gguf.tensors:
        name = hf_name(tensor.name)
        if name is None or name.removeprefix("model.") not in wanted:
            continue
        w = (
            _float_matrix(tensor)
            if tensor.type_name not in ("F32", "F16")
            else torch.from_numpy(np.array(tensor.data, dtype=np.float32))
        )
        proj = name.split(".")[-2]
        if unpermute_qk and proj in ("q_proj", "k_proj"):
            w = w[torch.from_numpy(unpermute_rows(w.shape[0], n_head if proj == "q_proj" else n_kv))]
        yield name, w


def build_quantized_model(
    gguf: GGUFFile, config: ModelConfig, mode: GGUFMode, group_size: int, kernels: QuantKernels = "cpu"
) -> tuple[CausalLM, QuantReport]:
    """Our model for `config` (CPU, `config.dtype` for what stays float) with the file's linears quantized as
    `mode` says into layers for `kernels` (Triton's: move the model to the GPU after), and the report of weight
    bytes: `bytes_before` is what the float model would hold."""
    from inference.models import build_model

    with torch.device("meta"):
        model = build_model(config).to(config.dtype)
    model.requires_grad_(False)
    float_bytes = sum(
        p.numel() * p.element_size() for p in model.parameters()
    )  # a tied head is the embedding
    unpermute_qk = gguf.architecture == "llama"
    # a tied 4-bit table stays int4 as the head only where the lookup can read the head's packed rows (CPU kernels
    # in a known layout); else the head is int8, and the lookup shares its codes
    # (our own kernel: any row count, and Q8_0 kept as its blocks)
    ours = kernels == "cpu" and qgemv.qgemv_kernel() is not None
    layout = int4_layout() if kernels == "cpu" else None
    weights, counts = gguf_linear_weights(
        gguf,
        mode,
        group_size,
        unpermute_qk=unpermute_qk,
        int4_head_rows=1 if ours else layout.block if layout else None,
        q8_blocks=ours,
    )
    install_quant_weights(model, weights, kernels)
    embd = gguf.by_name.get("token_embd.weight")
    if embd is not None and embd.type_name not in FLOAT_TYPES:
        # a Q8_0 table keeps its own exact blocks (shared with a tied head that holds them too); any other type
        # shares the tied head's codes where it can
        head = getattr(model, "lm_head", None)
        exact_head = (
            "output.weight" not in gguf.by_name and isinstance(head, QuantLinear) and head.qgemv is not None
        )
        if (embd.type_name == "Q8_0" and not exact_head) or not (
            config.tie_word_embeddings and tie_embedding_to_head(model)
        ):
            model.embed_tokens = own_embedding(embd, config.dtype)
    # materialize what is left on the meta device (norms, biases, a float embedding) and load it from the file
    wanted: set[str] = set()
    for module_name, module in model.named_modules():
        for pname, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            empty = torch.empty(param.shape, dtype=param.dtype)
            setattr(module, pname, nn.Parameter(empty, requires_grad=False))
            full = f"{module_name}.{pname}" if module_name else pname
            wanted.add(full)
            for fused, parts in _UNFUSED.items():
                if f".{fused}." in f".{full}":
                    wanted.update(full.replace(fused, p) for p in parts)
    try:
        model.load_weights(_float_tensors(gguf, wanted, unpermute_qk))
    except KeyError as exc:
        raise QuantError(
            f"GGUF file {gguf.path.name}: {exc.args[0]}", hint="the file does not match its architecture"
        ) from exc
    layers = sum(1 for m in model.modules() if isinstance(m, QuantLinearBase))
    report = QuantReport(
        mode="gguf" if mode == "auto" else mode,
        group_size=group_size if mode == "int4" else 32,
        layers=layers,
        bytes_before=float_bytes,
        bytes_after=model_weight_bytes(model),
        fallback_layers=sum(1 for m in model.modules() if isinstance(m, QuantLinearBase) and m.fallback),
        source="gguf " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())),
    )
    return model.eval(), report
