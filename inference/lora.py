"""LoRA adapters in PEFT's format, served batched and unmerged: requests with different adapters (and none) share
one step, and each adapter's low-rank update is added to its own rows only.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` as PEFT saves them. Our decoder fuses
q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; an adapter's per-projection matrices are stacked to match:
for a fused layer `A` is the shards' `A` matrices side by side (`[in, sum of ranks]`) and `B` is block-diagonal
(`[sum of ranks, out]`, each shard's `B` in its own output columns, zero elsewhere), with the scaling (`alpha / r`,
or `alpha / sqrt(r)` with rsLoRA) folded into `B`. Then one layer's update for rows `x` is `(x @ A) @ B`.

`LoRAManager` owns the adapters of one model. It registers adapters (host copies), keeps at most `max_loras` of
them resident on the model's device (least recently used evicted first), and hooks the four projections of every
layer: before a step the model runner orders the batch so that each adapter's rows are contiguous (`begin_step`),
and each hooked projection adds `(x[a:b] @ A) @ B` to its output rows `a:b`, one pair of small matmuls per adapter
in the step (a segmented gather-matmul). Rows without an adapter cost nothing. An X-LoRA adapter (inference/xlora.py)
is served by the same manager: `begin_step` first runs its scaling pass (the step's new tokens, against the request's
own scaling-pass KV blocks) and classifier for its rows (`_gate`), and its segment scales each expert's rank columns
per row. On CUDA (`kernels`) a step without X-LoRA rows applies every adapter with two Triton kernel launches per
hooked projection instead (inference/triton_lora.py), over per-slot weight buffers that residency fills.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import structlog
import torch
from torch import nn

from inference import envs
from inference.errors import AdapterError, UnknownAdapterError
from inference.lora_shapes import lora_buffer_shapes, module_shapes
from inference.metadata import AttentionMetadata
from inference.model_config import ModelConfig

if TYPE_CHECKING:
    from typing import TypeAlias

    from torch.utils.hooks import RemovableHandle

    from inference.sequence import Sequence
    from inference.triton_lora import LoRASegments, LoRASlots
    from inference.xlora import XLoRAAdapter

    AnyAdapter: TypeAlias = "LoRAAdapter | XLoRAAdapter"

log = structlog.get_logger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# Hugging Face projection name -> (our module under the layer, shard index in that module)
TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
MODULES = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?:model\.)?layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
_NOT_MODULE = {"weight", "bias", "base_layer", "default"}
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_adapter_name(name: str) -> str:
    """`name` if it can name an adapter (letters, digits, `.`, `_`, `-`; no `:`, which separates base and adapter
    in an OpenAI model id), else AdapterError."""
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise AdapterError(
            f"invalid adapter name {name!r}",
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return name


def uses_lora_kernels(kernels: str, device: torch.device) -> bool:
    """Whether adapters run on the Triton kernels for this `lora_kernels` choice on `device`: "triton", or "auto"
    on CUDA with triton installed (found without importing it)."""
    return kernels == "triton" or (
        kernels == "auto" and device.type == "cuda" and importlib.util.find_spec("triton") is not None
    )


@dataclass(slots=True)
class LoRAWeights:
    """One adapted module of one layer, fused shards stacked: its update for rows `x` is `(x @ a_t) @ b_t`."""

    a_t: torch.Tensor  # [in, R], R the sum of the adapted shards' ranks
    b_t: torch.Tensor  # [R, out], block-diagonal over shards, scaling folded in
    # (shard, rank) of each column group of a_t, in order: which projection a rank column belongs to (X-LoRA)
    shards: tuple[tuple[int, int], ...] = ()

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense `[out, in]` weight (for merging)."""
        return (self.a_t.float() @ self.b_t.float()).t()


@dataclass(slots=True)
class LoRAAdapter:
    """A LoRA adapter read for one model: stacked weights per (layer, our module)."""

    name: str
    path: Path
    rank: int
    alpha: float
    use_rslora: bool
    base_model: str | None
    target_modules: tuple[str, ...]  # Hugging Face projection names present in the file
    modules: dict[tuple[int, str], LoRAWeights]
    uid: int = 0  # unique per load: part of the prefix cache's block keys, so a reloaded name never reuses KV

    def to(self, device: torch.device, dtype: torch.dtype) -> LoRAAdapter:
        moved = {
            k: LoRAWeights(
                w.a_t.to(device, dtype).contiguous(), w.b_t.to(device, dtype).contiguous(), w.shards
            )
            for k, w in self.modules.items()
        }
        return LoRAAdapter(
            self.name,
            self.path,
            self.rank,
            self.alpha,
            self.use_rslora,
            self.base_model,
            self.target_modules,
            moved,
            self.uid,
        )

    @property
    def nbytes(self) -> int:
        return sum(w.a_t.nbytes + w.b_t.nbytes for w in self.modules.values())

    def merge_into(self, model: nn.Module) -> None:
        """Add this adapter's update to `model`'s plain (unpacked) linear weights in place: one adapter served
        alone at base-model speed. Unmerging is reloading the model (subtracting would drift in low precision)."""
        layers = _layers(model)
        with torch.no_grad():
            for (layer, module), w in self.modules.items():
                linear = layers[layer].get_submodule(module)
                if not isinstance(linear, nn.Linear) or linear.weight.is_mkldnn:
                    raise AdapterError(
                        f"cannot merge adapter {self.name!r} into layer {layer} {module}: not a plain linear weight",
                        "merge before the engine packs the weights (before LLMEngine is built), into a model loaded "
                        "with quantize 'none' (quantized layers take no merge; serve the adapter unmerged)",
                    )
                delta = w.delta_weight().to(linear.weight.device)
                linear.weight.copy_((linear.weight.float() + delta).to(linear.weight.dtype))


def _layers(model: nn.Module) -> nn.ModuleList:
    layers = model.get_submodule("layers")
    if not isinstance(layers, nn.ModuleList):
        raise AdapterError(
            f"{type(model).__name__} has no decoder layer list", "LoRA needs our Llama-family decoder"
        )
    return layers


def _pattern_value(patterns: Mapping[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key that matches the end of the module's name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def _read_config(name: str, folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterError(
            f"adapter {name!r}: {folder} is not a folder", "pass the folder PEFT saved (save_pretrained)"
        )
    if not path.is_file():
        raise AdapterError(
            f"adapter {name!r}: {path} is missing", "pass the folder PEFT saved (save_pretrained)"
        )
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(f"adapter {name!r}: cannot read {path}: {exc}", "check the adapter files") from exc
    kind = raw.get("peft_type", "LORA")
    if kind != "LORA":
        raise AdapterError(
            f"adapter {name!r} is a {kind} adapter", "only LoRA adapters (peft_type LORA) are served"
        )
    unsupported = [
        ("use_dora", bool(raw.get("use_dora"))),
        ("bias", raw.get("bias", "none") not in (None, "none")),
        ("modules_to_save", bool(raw.get("modules_to_save"))),
    ]
    for key, bad in unsupported:
        if bad:
            raise AdapterError(
                f"adapter {name!r} uses {key}={raw.get(key)!r}, which is not supported",
                "use a plain LoRA adapter (no DoRA, bias 'none', no modules_to_save)",
            )
    return raw


def read_adapter(name: str, path: str | Path, config: ModelConfig) -> LoRAAdapter:
    """Read a PEFT LoRA adapter for a model of `config`, in float32 on the CPU; AdapterError names what is wrong
    (a missing file, a module we do not adapt, a rank or shape mismatch, an adapter for another base model)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_adapter_name(name)
    folder = Path(path).expanduser()
    raw = _read_config(name, folder)
    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(
            f"adapter {name!r}: {weights_path} is missing",
            "save the adapter with safe_serialization (PEFT's default writes adapter_model.safetensors)",
        )
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise AdapterError(
            f"adapter {name!r}: cannot read {weights_path}: {exc}", "check the adapter files"
        ) from exc
    base = raw.get("base_model_name_or_path")
    trained_on = f" (it was made for {base})" if base else ""
    r_default, alpha_default = int(raw.get("r", 8)), float(raw.get("lora_alpha", 8))
    rank_pattern, alpha_pattern = raw.get("rank_pattern") or {}, raw.get("alpha_pattern") or {}
    rslora = bool(raw.get("use_rslora", False))
    targets_config = raw.get("target_modules")
    if isinstance(targets_config, list):
        other = [t for t in targets_config if str(t).rsplit(".", 1)[-1] not in TARGETS]
        if other:
            raise AdapterError(
                f"adapter {name!r} adapts {other[0]!r}, a module this runtime does not adapt",
                f"LoRA is served on {', '.join(TARGETS)}; retrain without the other target modules",
            )
    # (layer, hf projection) -> {"A": tensor, "B": tensor}
    found: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None or m.group(2) not in TARGETS:
            target = [p for p in key.split(".") if p not in _NOT_MODULE and not p.startswith("lora_")][-1]
            raise AdapterError(
                f"adapter {name!r} adapts {target!r} ({key}), a module this runtime does not adapt",
                f"LoRA is served on {', '.join(TARGETS)}; retrain without the other target modules",
            )
        layer, proj, ab = int(m.group(1)), m.group(2), m.group(3)
        if layer >= config.num_layers:
            raise AdapterError(
                f"adapter {name!r} adapts layer {layer}, but this model has {config.num_layers} layers{trained_on}",
                "load an adapter trained on this base model",
            )
        found.setdefault((layer, proj), {})[ab] = tensor
    if not found:
        raise AdapterError(
            f"adapter {name!r}: {weights_path} holds no LoRA weights", "check the adapter files"
        )
    shapes = module_shapes(config)
    # (layer, our module) -> [(shard, A [r, in], B [out, r], scaling)]
    parts: dict[tuple[int, str], list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    max_rank = 0
    for (layer, proj), ab in sorted(found.items()):
        where = f"layer {layer} {proj}"
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(
                f"adapter {name!r}: {where} has no {missing} weight", "check the adapter files"
            )
        a, b = ab["A"], ab["B"]
        module, shard = TARGETS[proj]
        in_dim, outs = shapes[module]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_dim or b.shape[0] != outs[shard]:
            raise AdapterError(
                f"adapter {name!r}: {where} maps {tuple(a.shape[1:2])} -> {tuple(b.shape[:1])} features, this model's "
                f"{proj} maps ({in_dim},) -> ({outs[shard]},){trained_on}",
                "load an adapter trained on this base model (same hidden and intermediate sizes)",
            )
        module_name = f"model.layers.{layer}.{module.split('.')[0]}.{proj}"
        r = int(_pattern_value(rank_pattern, module_name, r_default))
        if a.shape[0] != r or b.shape[1] != r:
            raise AdapterError(
                f"adapter {name!r}: {where} has rank {a.shape[0]} (lora_A) / {b.shape[1]} (lora_B), "
                f"but adapter_config.json says r={r}",
                "the config and the weights must come from the same save_pretrained",
            )
        alpha = float(_pattern_value(alpha_pattern, module_name, alpha_default))
        scaling = alpha / math.sqrt(r) if rslora else alpha / r
        parts.setdefault((layer, module), []).append((shard, a.float(), b.float(), scaling))
        max_rank = max(max_rank, r)
    modules: dict[tuple[int, str], LoRAWeights] = {}
    for (layer, module), shard_parts in parts.items():
        _in_dim, outs = shapes[module]
        offsets = [sum(outs[:i]) for i in range(len(outs))]
        total_rank = sum(a.shape[0] for _, a, _, _ in shard_parts)
        a_t = torch.cat([a.t() for _, a, _, _ in shard_parts], dim=1)
        b_t = torch.zeros(total_rank, sum(outs))
        row = 0
        for shard, a, b, scaling in shard_parts:
            r = a.shape[0]
            b_t[row : row + r, offsets[shard] : offsets[shard] + outs[shard]] = b.t() * scaling
            row += r
        shards = tuple((shard, a.shape[0]) for shard, a, _, _ in shard_parts)
        modules[(layer, module)] = LoRAWeights(a_t.contiguous(), b_t, shards)
    targets = tuple(sorted({proj for _, proj in found}, key=list(TARGETS).index))
    return LoRAAdapter(name, folder, max_rank, alpha_default, rslora, base, targets, modules)


@dataclass(slots=True)
class _Registered:
    adapter: AnyAdapter  # host copy in the model dtype
    users: int = 0  # live requests on it
    draining: bool = False  # unload asked: no new requests, removed when `users` reaches 0


@dataclass(slots=True)
class AdapterInfo:
    """What `LoRAManager.describe` reports for one adapter."""

    name: str
    path: str
    rank: int
    alpha: float  # 0 for X-LoRA, whose experts each have their own
    target_modules: tuple[str, ...]
    resident: bool
    active_requests: int
    draining: bool
    kind: str = "lora"  # or "xlora"


@dataclass(slots=True)
class _Segment:
    adapter: AnyAdapter
    start: int
    end: int
    # X-LoRA: the scaling of every module's every rank column for the rows, `[end - start, sum of ranks]`, and
    # where each module's columns are in it (XLoRAAdapter.per_column); None for a LoRA adapter
    scales: torch.Tensor | None = None
    spans: Mapping[tuple[int, str], tuple[int, int]] | None = None


@dataclass(slots=True)
class _Padded:
    """A step's adapter rows laid out as `[k, width]` (a short group padded by repeating its last row), so that one
    pair of batched matmuls serves every adapter of the step instead of a pair per adapter."""

    rows: torch.Tensor  # [k * width] rows of the module input
    valid: torch.Tensor  # positions of the real rows in the padded layout
    dest: torch.Tensor  # their rows in the module output
    k: int
    width: int
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]  # per module: [k, in, R], [k, R, out]


@dataclass(slots=True)
class _StepPlan:
    """What the hooks apply in the current step (shared by the manager and every hook; empty between steps)."""

    segments: list[_Segment] = field(default_factory=list)
    padded: _Padded | None = None
    kernel: LoRASlots | None = None  # the Triton kernels apply the step (CUDA), from these buffers
    row_slots: np.ndarray | None = None  # with `kernel`: each row's slot, -1 for none
    # with `kernel`: the rows grouped by slot on the device; made at the first hook that needs them (a decode graph
    # stages its own and sets them here while it runs, so a graph step copies nothing else)
    kernel_segments: LoRASegments | None = None

    def clear(self) -> None:
        self.segments.clear()
        self.padded = None
        self.kernel = None
        self.row_slots = None
        self.kernel_segments = None


@dataclass(slots=True)
class LoRAManager:
    """The adapters of one model: registration, residency (at most `max_loras` on the device, LRU), per-step
    row segments and the forward hooks that apply them. Mutated only from the engine's step thread."""

    model: nn.Module
    config: ModelConfig
    device: torch.device
    max_loras: int = 4
    # Several adapters in a step share one padded batched matmul while the padded rows are at most `pad_limit` times
    # the real ones (decode steps, balanced chunks); else a matmul pair per adapter. 0: always per adapter.
    pad_limit: float = 2.0
    block_size: int = 16  # the KV cache's (the runner's): X-LoRA's scaling pass addresses its blocks
    # How LoRA rows are applied: "auto" (the Triton kernels on CUDA when triton is installed, else torch), "torch",
    # or "triton" (CUDA, or the CPU under TRITON_INTERPRET=1, which tests use). X-LoRA rows always take torch.
    kernels: str = "auto"
    # Rank capacity of each projection in the Triton path's fixed buffers (a fused qkv gets 3x, gate_up 2x): an
    # adapter above it runs on the torch path, eagerly.
    max_rank: int = 16
    _registered: dict[str, _Registered] = field(default_factory=dict)
    _resident: OrderedDict[str, AnyAdapter] = field(default_factory=OrderedDict)
    _plan: _StepPlan = field(default_factory=_StepPlan)
    _stacks: OrderedDict[tuple[int, ...], dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]] = field(
        default_factory=OrderedDict
    )
    _hooks: list[RemovableHandle] = field(default_factory=list)
    _uids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    loads: int = 0  # adapters moved to the device (residency misses), for metrics and tests
    _slots: LoRASlots | None = None  # the Triton kernels' weight buffers, one slot per resident LoRA adapter

    def __post_init__(self) -> None:
        if self.kernels not in ("auto", "torch", "triton"):
            raise AdapterError(f"unknown LoRA kernels {self.kernels!r}", "use 'auto', 'torch' or 'triton'")
        if self.kernels == "triton" and self.device.type != "cuda" and not envs.flag(envs.TRITON_INTERPRET):
            raise AdapterError(
                f"the Triton LoRA kernels cannot run on {self.device.type}",
                "use lora_kernels 'auto' or 'torch' (or set TRITON_INTERPRET=1, as the tests do)",
            )
        if uses_lora_kernels(self.kernels, self.device):
            # imported here: the CPU path never loads triton
            from inference.triton_lora import LoRASlots

            self._slots = LoRASlots(self.max_loras, self.device, self.config.dtype)

    def _reserve_slots(self, slots: LoRASlots) -> None:
        """Allocate the Triton path's buffers for every layer and projection at `max_rank` (once, when the first
        adapter is registered): fixed addresses, which decode graphs capture."""
        slots.reserve(lora_buffer_shapes(self.config, self.max_rank))

    # ---- registration ---------------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> AnyAdapter:
        """Read and register a LoRA adapter under `name` (AdapterError if it is bad or the name is taken); an
        X-LoRA one is read with `inference.xlora.read_any_adapter` and registered with `add`."""
        return self.add(read_adapter(name, path, self.config))

    def add(self, adapter: AnyAdapter) -> AnyAdapter:
        """Register an adapter read with `read_adapter` or `read_any_adapter` (the slow part, which any thread may
        do)."""
        name = adapter.name
        if name in self._registered:
            raise AdapterError(f"adapter {name!r} is already loaded", "unload it first, or use another name")
        host: AnyAdapter
        if isinstance(adapter, LoRAAdapter):
            host = adapter.to(torch.device("cpu"), self.config.dtype)
            host.uid = next(self._uids)
        else:
            host = adapter.to(torch.device("cpu"), self.config.dtype).with_uid(next(self._uids))
        self._registered[name] = _Registered(host)
        if self._slots is not None:
            if not self._slots.fixed:
                self._reserve_slots(self._slots)
            why = self._slots.misfit(host) if isinstance(host, LoRAAdapter) else None
            if why is not None:
                log.warning("adapter_on_torch_path", adapter=name, reason=why, max_lora_rank=self.max_rank)
        if not self._hooks:
            self._install_hooks()
        log.info("adapter_loaded", adapter=name, rank=adapter.rank, modules=list(adapter.target_modules))
        return host

    def unload(self, name: str) -> bool:
        """Stop accepting requests for `name`; it is removed now if no request uses it (True), else when its
        last request ends (False). UnknownAdapterError if it is not loaded."""
        reg = self._get(name)
        reg.draining = True
        if reg.users == 0:
            self._remove(name)
            return True
        log.info("adapter_draining", adapter=name, requests=reg.users)
        return False

    def _remove(self, name: str) -> None:
        del self._registered[name]
        self._resident.pop(name, None)
        if self._slots is not None:
            self._slots.evict(name)
        log.info("adapter_unloaded", adapter=name)
        if not self._registered:
            for handle in self._hooks:
                handle.remove()
            self._hooks.clear()

    def _get(self, name: str) -> _Registered:
        reg = self._registered.get(name)
        if reg is None:
            known = ", ".join(sorted(self._registered)) or "none"
            raise UnknownAdapterError(f"adapter {name!r} is not loaded", f"loaded adapters: {known}")
        return reg

    def check(self, name: str) -> None:
        """UnknownAdapterError unless `name` is loaded and accepting requests (any thread)."""
        reg = self._get(name)
        if reg.draining:
            raise UnknownAdapterError(f"adapter {name!r} is being unloaded", "send the request without it")

    def acquire(self, name: str) -> tuple[Any, ...]:
        """A new request on `name`: count it and return its prefix-cache key."""
        self.check(name)
        reg = self._registered[name]
        reg.users += 1
        return ("lora", reg.adapter.uid)

    def pass_key(self, name: str) -> tuple[Any, ...] | None:
        """The prefix-cache key of the scaling-pass KV cache of a request on `name` (None: a LoRA adapter, which
        has no scaling pass). With `scaling_pass_value` 0 the scaling pass is the base model, so its blocks are
        the base model's (key `()`): either one's cached prefix serves the other."""
        adapter = self._get(name).adapter
        if isinstance(adapter, LoRAAdapter):
            return None
        return () if adapter.options.scaling_pass_value == 0.0 else ("xlora-pass", adapter.uid)

    def release(self, name: str) -> None:
        """A request on `name` ended; a draining adapter goes with its last request."""
        reg = self._registered.get(name)
        if reg is None:
            return
        reg.users -= 1
        if reg.draining and reg.users <= 0:
            self._remove(name)

    def names(self) -> list[str]:
        """Adapters accepting requests."""
        return [n for n, r in list(self._registered.items()) if not r.draining]  # copied: any thread may ask

    def describe(self) -> list[AdapterInfo]:
        return [
            AdapterInfo(
                n,
                str(r.adapter.path),
                r.adapter.rank,
                r.adapter.alpha,
                r.adapter.target_modules,
                n in self._resident,
                r.users,
                r.draining,
                "lora" if isinstance(r.adapter, LoRAAdapter) else "xlora",
            )
            for n, r in list(self._registered.items())  # copied: any thread may ask
        ]

    # ---- residency and steps ---------------------------------------------------------------------------------
    def _resident_adapter(self, name: str, pinned: set[str]) -> AnyAdapter:
        adapter: AnyAdapter | None = self._resident.get(name)
        if adapter is not None:
            self._resident.move_to_end(name)
            return adapter
        while len(self._resident) >= self.max_loras:
            victim = next((n for n in self._resident if n not in pinned), None)
            if victim is None:  # the scheduler keeps a step's adapters within max_loras
                raise AdapterError(
                    f"a step needs more than max_loras={self.max_loras} adapters", "raise max_loras"
                )
            del self._resident[victim]
            if self._slots is not None:
                self._slots.evict(victim)
        host = self._registered[name].adapter
        slots = self._slots
        if slots is not None and isinstance(host, LoRAAdapter) and slots.misfit(host) is None:
            slots.put(host)  # straight from the host copy: the slot is the adapter's only device copy
            adapter = slots.weights(host)
        else:  # the torch path's own copy: X-LoRA, an adapter above the buffers' capacity, or no buffers
            adapter = host if self.device.type == "cpu" else host.to(self.device, self.config.dtype)
        self._resident[name] = adapter
        self.loads += 1
        return adapter

    def begin_step(
        self, items: SequenceT[tuple[Sequence, int]], kv_cache: torch.Tensor | None = None
    ) -> SequenceT[tuple[Sequence, int]]:
        """Order a step's `(sequence, new tokens)` pairs so that each adapter's rows are contiguous (base rows
        first, the rest by adapter, stable), make those adapters resident and remember their row ranges for the
        hooks; run the scaling pass of X-LoRA rows, against `kv_cache` (the runner's paged cache, where each X-LoRA
        sequence's `pass_block_table` lives) or, when None, over each such sequence's whole context into a scratch
        cache. Returns the items in their new order (unchanged when no row has an adapter)."""
        self._plan.clear()
        if not self._registered:
            return items
        key: Callable[[tuple[Sequence, int]], str] = lambda item: item[0].params.adapter or ""  # noqa: E731
        names = {key(item) for item in items}
        names.discard("")
        if not names:
            return items
        ordered = sorted(items, key=key)  # stable: each group keeps the scheduler's order
        row = 0
        segments = self._plan.segments
        gated: list[tuple[_Segment, list[tuple[Sequence, int]]]] = []
        for name, group_iter in itertools.groupby(ordered, key=key):
            group = list(group_iter)
            n = sum(k for _, k in group)
            if name:  # never evict an adapter this step needs
                adapter = self._resident_adapter(name, names)
                segments.append(_Segment(adapter, row, row + n))
                if not isinstance(adapter, LoRAAdapter):
                    gated.append((segments[-1], group))
            row += n
        if gated:
            self._gate(gated, kv_cache)
            return ordered  # X-LoRA rows take the per-adapter path (their columns are scaled per row)
        slots = self._slots
        if slots is not None and all(slots.slot_of(seg.adapter.name) is not None for seg in segments):
            row_slots = np.full(row, -1, dtype=np.int64)
            for seg in segments:
                row_slots[seg.start : seg.end] = slots.slot(seg.adapter.name)
            slots.check_slots(row_slots)
            self._plan.kernel = slots
            self._plan.row_slots = row_slots
            return ordered
        width = max(s.end - s.start for s in segments)
        real = sum(s.end - s.start for s in segments)
        if len(segments) > 1 and len(segments) * width <= self.pad_limit * real:
            self._plan.padded = self._padded(segments, width)
        return ordered

    def _padded(self, segments: list[_Segment], width: int) -> _Padded:
        rows: list[int] = []
        valid: list[int] = []
        dest: list[int] = []
        for i, seg in enumerate(segments):
            n = seg.end - seg.start
            rows += [seg.start + min(j, n - 1) for j in range(width)]
            valid += range(i * width, i * width + n)
            dest += range(seg.start, seg.end)
        index = torch.tensor(rows + valid + dest, dtype=torch.int64).to(self.device)
        r, v = len(rows), len(valid)
        stack = self._stack(tuple(s.adapter for s in segments if isinstance(s.adapter, LoRAAdapter)))
        return _Padded(index[:r], index[r : r + v], index[r + v :], len(segments), width, stack)

    def _gate(
        self, gated: list[tuple[_Segment, list[tuple[Sequence, int]]]], kv_cache: torch.Tensor | None
    ) -> None:
        """X-LoRA's first pass for this step's X-LoRA rows: the model with every expert scaled by
        `scaling_pass_value`, then each adapter's classifier over the last hidden states of the step's new tokens
        gives their scalings for the real pass. Each token's scalings depend only on the tokens up to it, so those
        of tokens already in the KV cache never change, and neither does the scaling pass's own KV: with
        `kv_cache`, the pass runs the step's new tokens only, attending to (and writing) the sequence's
        scaling-pass blocks (`pass_block_table`, in the same paged cache); without, it reruns each sequence's
        whole context into a scratch cache. Either matches PEFT's generate, which reruns both passes over the
        whole sequence at every token."""
        c, bs = self.config, self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts, lens = [0], []
        wanted: list[int] = []  # rows of the pass's hidden states that are the step's new tokens
        tables: list[list[int]] = []
        pass_segments: list[_Segment] = []
        nxt = 1  # scratch blocks (block 0 is the null block)
        for seg, group in gated:
            first = len(ids)
            for seq, n in group:
                end = seq.num_computed_tokens + n
                if kv_cache is not None:
                    begin, table = end - n, seq.pass_block_table
                    if len(table) * bs < end:
                        raise AdapterError(
                            f"request {seq.request_id!r} on X-LoRA adapter {seg.adapter.name!r} has no scaling-pass "
                            "KV blocks for its tokens",
                            "add X-LoRA requests through LLMEngine, which allocates them",
                        )
                else:
                    begin, table = 0, list(range(nxt, nxt + -(-end // bs)))
                    nxt += len(table)
                tables.append(table)
                wanted += range(len(ids) + end - n - begin, len(ids) + end - begin)
                ids += seq.token_ids[begin:end]
                positions += range(begin, end)
                slots += [table[p // bs] * bs + p % bs for p in range(begin, end)]
                starts.append(len(ids))
                lens.append(end)
            adapter = seg.adapter
            assert not isinstance(adapter, LoRAAdapter)
            if adapter.options.scaling_pass_value != 0.0:  # 0 scales every expert's output to exactly 0
                scales = adapter.per_column(adapter.pass_scalings(len(ids) - first, adapter.classifier[0][0]))
                pass_segments.append(_Segment(adapter, first, len(ids), scales, adapter.spans))
        dev = self.device
        width = max(map(len, tables))
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
            context_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(
                [t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=dev
            ),
            max_query_len=max(b - a for a, b in itertools.pairwise(starts)),
            max_context_len=max(lens),
            block_size=bs,
        )
        if kv_cache is None:
            kv_cache = torch.zeros(
                2, c.num_layers, nxt, bs, c.num_kv_heads, c.head_dim, dtype=c.dtype, device=dev
            )
        real = list(self._plan.segments)
        self._plan.segments[:] = pass_segments
        try:
            hidden = self.model(
                torch.tensor(ids, dtype=torch.int64, device=dev),
                torch.tensor(positions, dtype=torch.int64, device=dev),
                meta,
                kv_cache,
            )
        finally:
            self._plan.segments[:] = real
        if len(wanted) != len(ids):
            hidden = hidden.index_select(0, torch.tensor(wanted, dtype=torch.int64, device=dev))
        row = 0
        for seg, _ in gated:
            adapter = seg.adapter
            assert not isinstance(adapter, LoRAAdapter)
            n = seg.end - seg.start
            seg.scales = adapter.per_column(adapter.scalings(hidden[row : row + n]).to(hidden.dtype))
            seg.spans = adapter.spans
            row += n

    def _stack(
        self, adapters: tuple[LoRAAdapter, ...]
    ) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
        """Per module, the adapters' A and B stacked (`[k, in, R]`, `[k, R, out]`, ranks zero-padded to the
        largest, zeros for an adapter without the module); kept for the last few adapter combinations."""
        key = tuple(a.uid for a in adapters)
        stack = self._stacks.get(key)
        if stack is not None:
            self._stacks.move_to_end(key)
            return stack
        stack = {}
        for module in {m for a in adapters for m in a.modules}:
            ws = [a.modules.get(module) for a in adapters]
            present = [w for w in ws if w is not None]
            rank = max(w.a_t.shape[1] for w in present)
            a_stack = present[0].a_t.new_zeros(len(ws), present[0].a_t.shape[0], rank)
            b_stack = present[0].b_t.new_zeros(len(ws), rank, present[0].b_t.shape[1])
            for i, w in enumerate(ws):
                if w is not None:
                    a_stack[i, :, : w.a_t.shape[1]] = w.a_t
                    b_stack[i, : w.b_t.shape[0]] = w.b_t
            stack[module] = (a_stack, b_stack)
        self._stacks[key] = stack
        while len(self._stacks) > 4:
            self._stacks.popitem(last=False)
        return stack

    def end_step(self) -> None:
        self._plan.clear()

    @property
    def hooked(self) -> bool:
        """Whether the forward hooks that apply adapters are installed (from the first adapter registered on)."""
        return bool(self._hooks)

    @property
    def active(self) -> bool:
        """Whether the current step has rows with an adapter."""
        return bool(self._plan.segments)

    @property
    def device_bytes(self) -> int:
        """Bytes the adapters hold on the model's device, each storage once: the Triton path's buffers, the resident
        adapters' weights that are not views of them, and the padded update's cached stacks."""
        tensors = [t for pair in (self._slots.buffers.values() if self._slots else ()) for t in pair]
        for adapter in self._resident.values():
            tensors += [t for w in adapter.modules.values() for t in (w.a_t, w.b_t)]
            if not isinstance(adapter, LoRAAdapter):
                tensors += [t for pair in adapter.classifier for t in pair] + [adapter.gather]
        tensors += [t for stack in self._stacks.values() for pair in stack.values() for t in pair]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())

    @property
    def kernel_step(self) -> bool:
        """Whether the current step applies its adapters with the Triton kernels."""
        return self._plan.kernel is not None

    @property
    def slots(self) -> LoRASlots | None:
        """The Triton path's weight buffers (None on the torch path)."""
        return self._slots

    @property
    def step_row_slots(self) -> np.ndarray | None:
        """Each row's LoRA slot in the current step (-1: none), when the Triton kernels apply it."""
        return self._plan.row_slots

    @contextlib.contextmanager
    def kernel_plan(self, segments: LoRASegments) -> Iterator[None]:
        """Within the block, the hooks apply the Triton kernels over `segments` (a decode graph's static ones, so a
        capture records launches that read them); the step's own plan is restored after."""
        assert self._slots is not None, "kernel_plan needs the Triton path"
        plan = self._plan
        saved = plan.kernel, plan.kernel_segments
        plan.kernel, plan.kernel_segments = self._slots, segments
        try:
            yield
        finally:
            plan.kernel, plan.kernel_segments = saved

    @property
    def padded_step(self) -> bool:
        """Whether the current step applies its adapters with the padded batched matmul."""
        return self._plan.padded is not None

    def _install_hooks(self) -> None:
        for i, layer in enumerate(_layers(self.model)):
            for module in MODULES:
                hook = _LoRAHook(self._plan, (i, module))
                self._hooks.append(layer.get_submodule(module).register_forward_hook(hook))


@dataclass(slots=True)
class _LoRAHook:
    """Adds each segment's low-rank update to one module's output rows, in place."""

    plan: _StepPlan
    key: tuple[int, str]

    def __call__(self, module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> None:
        plan = self.plan
        x = args[0]
        slots = plan.kernel
        if slots is not None:  # set without `segments` while a decode graph is captured
            segments = plan.kernel_segments
            if segments is None:
                assert plan.row_slots is not None, "a kernel step has its rows' slots"
                segments = plan.kernel_segments = slots.segments(plan.row_slots)
            slots.apply(self.key, x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1]), segments)
            return
        if not plan.segments:
            return
        padded = plan.padded
        if padded is not None:
            stacked = padded.weights.get(self.key)
            if stacked is not None:
                a_stack, b_stack = stacked
                xp = x.index_select(0, padded.rows).view(padded.k, padded.width, x.shape[-1])
                delta = torch.bmm(torch.bmm(xp, a_stack), b_stack).view(padded.k * padded.width, -1)
                out.index_add_(0, padded.dest, delta.index_select(0, padded.valid))
            return
        for seg in plan.segments:
            w = seg.adapter.modules.get(self.key)
            if w is None:
                continue
            h = x[seg.start : seg.end] @ w.a_t
            scales, spans = seg.scales, seg.spans
            if scales is not None and spans is not None:  # X-LoRA: each rank column by its expert's gate
                a, b = spans[self.key]
                h.mul_(scales[:, a:b])
            out[seg.start : seg.end].addmm_(h, w.b_t)
