"""A light GGUF reader: the header's scalar metadata and the tensors, memory-mapped, checked against the file's size.

`gguf.GGUFReader` turns every metadata value into numpy parts, which takes about 5 s for SmolLM2's 49k-token
vocabulary; loading weights needs only a few scalars and the tensor table, so this reader skips arrays (reading only
their lengths) and keeps scalars and strings. Tensors look like the reader's (`name`, `tensor_type`, `shape` in
GGUF order, fastest dimension first, and `data`: a read-only memory-mapped numpy array, typed for float and integer
types, uint8 `[rows, bytes per row]` for block-quantized ones), so `gguf.quants.dequantize` and
`inference.quant`'s converters take them as they are.

A file cut short, a bad magic number or version, or a tensor of an unknown type raises `GGUFFormatError` (a
`ModelLoadError`) with a hint, never a numpy error later.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inference.errors import GGUFFormatError

_MAGIC = b"GGUF"
_DEFAULT_ALIGNMENT = 32
# GGUF metadata value types: struct format of the scalars; 8 = string, 9 = array
_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9
_TYPED = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I8": np.int8, "I16": np.int16}
_TYPED |= {"I32": np.int32, "I64": np.int64}


@dataclass(slots=True)
class GGUFTensor:
    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: fastest dimension first
    n_bytes: int
    data: np.ndarray[Any, Any]

    @property
    def type_name(self) -> str:
        return str(self.tensor_type.name)

    def torch_shape(self) -> tuple[int, ...]:
        """The shape in torch order (rows first)."""
        return tuple(reversed(self.shape))


class _Cursor:
    def __init__(self, buf: memoryview, path: Path) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> memoryview:
        end = self.pos + n
        if n < 0 or end > len(self.buf):
            raise _truncated(self.path, f"the header needs {end} bytes, the file has {len(self.buf)}")
        out = self.buf[self.pos : end]
        self.pos = end
        return out

    def scalar(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return bytes(self.take(self.scalar("<Q"))).decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            item, count = self.scalar("<I"), self.scalar("<Q")
            if item in _SCALARS:
                self.take(count * struct.calcsize(_SCALARS[item]))
            else:
                for _ in range(count):
                    self.value(item)
            return None  # arrays (the vocabulary) are not kept
        raise GGUFFormatError(f"GGUF file {self.path} has a metadata value of unknown type {vtype}", _HINT)


_HINT = "is it a complete GGUF model file? re-download it if it was cut short"


def _truncated(path: Path, detail: str) -> GGUFFormatError:
    return GGUFFormatError(f"GGUF file {path} is truncated: {detail}", _HINT)


class GGUFFile:
    """The metadata scalars (`metadata`: key -> int, float, bool or str; arrays skipped) and tensors of a GGUF file."""

    def __init__(self, path: str | Path) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = Path(path)
        try:
            mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        except (OSError, ValueError) as exc:  # ValueError: an empty file cannot be mapped
            raise GGUFFormatError(f"cannot read GGUF file {self.path}: {exc}", _HINT) from exc
        cur = _Cursor(memoryview(mapped), self.path)  # type: ignore[arg-type]  # numpy arrays export buffers
        if bytes(cur.take(4)) != _MAGIC:
            raise GGUFFormatError(
                f"{self.path} is not a GGUF file (bad magic number)", "pass a .gguf model file"
            )
        version = cur.scalar("<I")
        if version not in (2, 3):
            raise GGUFFormatError(
                f"GGUF file {self.path} has version {version}",
                "versions 2 and 3 (little-endian) are supported",
            )
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = tuple(int(cur.scalar("<Q")) for _ in range(cur.scalar("<I")))
            raw_type, offset = cur.scalar("<I"), cur.scalar("<Q")
            infos.append((name, dims, raw_type, offset))
        alignment = int(self.metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
        start = -(-cur.pos // alignment) * alignment
        self.tensors: list[GGUFTensor] = []
        for name, dims, raw_type, offset in infos:
            try:
                qtype = GGMLQuantizationType(raw_type)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise GGUFFormatError(
                    f"GGUF tensor {name} of {self.path.name} has unknown type {raw_type}",
                    "a newer GGUF type than this gguf package knows; load another quantization of the model",
                ) from None
            n_elems = int(np.prod(dims)) if dims else 1
            n_bytes = n_elems // block * type_size
            begin = start + offset
            if begin + n_bytes > len(mapped):
                raise _truncated(
                    self.path, f"tensor {name} ends at byte {begin + n_bytes}, the file has {len(mapped)}"
                )
            raw = mapped[begin : begin + n_bytes]
            torch_dims = tuple(reversed(dims))
            typed = _TYPED.get(qtype.name)
            if typed is not None:
                data = raw.view(typed).reshape(torch_dims)
            else:  # block-quantized (and BF16): bytes per row, as gguf.GGUFReader gives them
                data = raw.reshape(*torch_dims[:-1], dims[0] // block * type_size)
            self.tensors.append(GGUFTensor(name, qtype, dims, n_bytes, data))
        self.by_name = {t.name: t for t in self.tensors}

    @property
    def architecture(self) -> str:
        arch = self.metadata.get("general.architecture")
        return arch if isinstance(arch, str) else "unknown"

    def arch_int(self, key: str) -> int | None:
        """`{architecture}.{key}` as an int, None when absent."""
        value = self.metadata.get(f"{self.architecture}.{key}")
        return None if value is None else int(value)


# ---- GGUF tensor names -> Hugging Face names ------------------------------------------------------------------

LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def hf_name(name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`),
    None for tensors our models do not use (rope frequencies and the like)."""
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in LAYER_NAMES:
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in TOP_NAMES:
        return f"{TOP_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_rows(n_rows: int, n_head: int) -> np.ndarray[Any, np.dtype[np.int64]]:
    """The row order that undoes llama.cpp's interleaving of q/k rows (convert_hf_to_gguf permutes them for its
    RoPE layout, for the `llama` architecture): `w[unpermute_rows(...)]` is the Hugging Face weight (or bias)."""
    dim = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, dim, 2).swapaxes(1, 2).reshape(n_rows)
