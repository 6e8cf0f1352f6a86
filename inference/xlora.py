"""X-LoRA adapters (a mixture of LoRA experts gated per token by a learned classifier) in PEFT's format: reading
them for one model, and the gate that turns a scaling pass's last hidden states into per-token expert scalings.

An X-LoRA folder holds `adapter_config.json` (`peft_type` `XLORA`: the experts by name and path, the gate's options)
and `adapter_model.safetensors` with the classifier (`[base_model.]internal_xlora_classifier.layers.N.weight/bias`,
the keys of PEFT's model state dict). The experts are PEFT LoRA folders: the config's path (relative paths from the
X-LoRA folder), else `<folder>/<expert name>`.

As in PEFT, every adapted projection of the base model (the union over experts, in module order: layer by layer,
q, k, v, o, gate, up, down) is one "X-LoRA layer"; the classifier gives each token one weight per expert, the same
for every X-LoRA layer, or one per X-LoRA layer and expert with `layerwise_scalings`. A projection's update for a
token is `sum_e s_e * (x @ A_e) @ B_e`. Our fused modules stack the experts' shards: `A` is every (expert, shard)
`A` side by side and `B` their block-diagonal `B` (LoRA scaling and `global_scaling_weight` folded in); which flat
`[X-LoRA layer, expert]` scaling multiplies each rank column is one index for all modules end to end (`gather`,
each module's slice of it at `spans`), so a step gathers every column's scaling `C = S[:, gather]` once and a
module's update is `((x @ A) * C[:, span]) @ B`: one pair of matmuls for all experts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from inference.errors import AdapterError
from inference.lora import (
    CONFIG_FILE,
    TARGETS,
    WEIGHTS_FILE,
    LoRAAdapter,
    LoRAWeights,
    check_adapter_name,
    read_adapter,
)
from inference.model_config import ModelConfig

_CLASSIFIER_KEY = re.compile(r"^(?:base_model\.)?internal_xlora_classifier\.layers\.(\d+)\.(weight|bias)$")
# our (module, shard) -> the Hugging Face projection, to order X-LoRA layers as PEFT does
_PROJ = {v: k for k, v in TARGETS.items()}
_ORDER = list(TARGETS)


@dataclass(frozen=True, slots=True)
class XLoRAOptions:
    """The gate's options from XLoraConfig (what PEFT's classifier and X-LoRA layers do with its logits)."""

    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    layerwise_scalings: bool = False
    top_k: int | None = None
    enable_softmax_topk: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0


@dataclass(frozen=True, slots=True)
class XLoRAAdapter:
    """An X-LoRA adapter read for one model: the experts' weights stacked per (layer, our module), which scaling
    multiplies each rank column, and the classifier."""

    name: str
    path: Path
    base_model: str | None
    options: XLoRAOptions
    experts: tuple[str, ...]
    n_layers: int  # X-LoRA layers: adapted Hugging Face projections, all experts together
    modules: dict[tuple[int, str], LoRAWeights]  # experts side by side, global_scaling_weight folded into B
    classifier: tuple[tuple[torch.Tensor, torch.Tensor], ...]  # (weight [out, in], bias [out]); ReLU between
    # for every module's every rank column, end to end in module order, its index into the flat
    # [n_layers * experts] scalings, and where each module's columns are in it: one gather per step gives every
    # rank column its scaling (`per_column`), and each module takes a slice of that
    gather: torch.Tensor  # [sum of all modules' ranks] int64
    spans: dict[tuple[int, str], tuple[int, int]]
    rank: int  # the largest expert rank (for describe)
    target_modules: tuple[str, ...]
    uid: int = 0  # part of the prefix cache's block keys, unique per load
    alpha: float = field(default=0.0)  # no single alpha: each expert has its own (kept for AdapterInfo)

    @property
    def n_experts(self) -> int:
        return len(self.experts)

    def to(self, device: torch.device, dtype: torch.dtype) -> XLoRAAdapter:
        moved = {
            k: LoRAWeights(
                w.a_t.to(device, dtype).contiguous(), w.b_t.to(device, dtype).contiguous(), w.shards
            )
            for k, w in self.modules.items()
        }
        return replace(
            self,
            modules=moved,
            gather=self.gather.to(device),
            classifier=tuple((w.to(device, dtype), b.to(device, dtype)) for w, b in self.classifier),
        )

    def with_uid(self, uid: int) -> XLoRAAdapter:
        return replace(self, uid=uid)

    @property
    def nbytes(self) -> int:
        lora = sum(w.a_t.nbytes + w.b_t.nbytes for w in self.modules.values())
        return lora + sum(w.nbytes + b.nbytes for w, b in self.classifier)

    # ---- the gate ----------------------------------------------------------------------------------------------
    def pass_scalings(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        """The scaling pass's flat `[rows, n_layers * experts]` scalings: `scaling_pass_value` everywhere, through
        top-k as PEFT's layers apply it to its dummy scalings."""
        full = like.new_full((rows, self.n_layers, self.n_experts), self.options.scaling_pass_value)
        return self._maybe_topk(full).reshape(rows, -1)

    def scalings(self, hidden: torch.Tensor) -> torch.Tensor:
        """The classifier over the scaling pass's last hidden states `[rows, hidden]` -> flat per-token scalings
        `[rows, n_layers * experts]` (softmax with temperature, then top-k, as configured)."""
        h = hidden.to(self.classifier[0][0].dtype)
        for i, (w, b) in enumerate(self.classifier):
            h = torch.nn.functional.linear(h, w, b)
            if i < len(self.classifier) - 1:
                h = torch.relu(h)  # dropout is the identity at inference
        rows, opts = h.shape[0], self.options
        if opts.layerwise_scalings:
            logits = h.reshape(rows, self.n_layers, self.n_experts)
        else:
            logits = h.unsqueeze(1).expand(rows, self.n_layers, self.n_experts)
        if opts.enable_softmax:
            logits = torch.softmax(logits / opts.softmax_temperature, dim=-1)
        return self._maybe_topk(logits).reshape(rows, -1)

    def per_column(self, flat: torch.Tensor) -> torch.Tensor:
        """Flat scalings `[rows, n_layers * experts]` -> the scaling of every module's every rank column,
        `[rows, sum of ranks]` (module `k`'s at `spans[k]`)."""
        return flat.index_select(1, self.gather)

    def _maybe_topk(self, s: torch.Tensor) -> torch.Tensor:
        opts = self.options
        if opts.top_k is not None:
            index = torch.topk(s, k=opts.top_k, dim=-1).indices
            mask = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, index, True)
            s = s * mask.to(s.dtype)
        if opts.enable_softmax_topk:
            nonzero = s != 0
            s = torch.softmax(s.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        return s


def peft_type(folder: Path) -> str | None:
    """The `peft_type` in a folder's adapter_config.json (None if it cannot be read: the readers say why)."""
    try:
        raw = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    kind = raw.get("peft_type") if isinstance(raw, dict) else None
    return str(kind) if kind is not None else None


def read_any_adapter(name: str, path: str | Path, config: ModelConfig) -> LoRAAdapter | XLoRAAdapter:
    """Read a PEFT LoRA or X-LoRA folder, whichever its adapter_config.json says it is."""
    folder = Path(path).expanduser()
    if peft_type(folder) == "XLORA":
        return read_xlora_adapter(name, folder, config)
    return read_adapter(name, folder, config)


def _options(name: str, raw: dict[str, Any], n_experts: int) -> XLoRAOptions:
    def bad(key: str, why: str) -> AdapterError:
        return AdapterError(
            f"X-LoRA adapter {name!r}: {key}={raw.get(key)!r} {why}", "fix adapter_config.json"
        )

    top_k = raw.get("top_k_lora")
    if top_k is not None and (not isinstance(top_k, int) or not 1 <= top_k <= n_experts):
        raise bad("top_k_lora", f"is not a number of experts between 1 and {n_experts}")
    temperature = float(raw.get("softmax_temperature", 1.0))
    if temperature <= 0:
        raise bad("softmax_temperature", "is not positive")
    depth = raw.get("xlora_depth", 1)
    if not isinstance(depth, int) or depth < 1:
        raise bad("xlora_depth", "is not a positive number of classifier layers")
    return XLoRAOptions(
        enable_softmax=bool(raw.get("enable_softmax", True)),
        softmax_temperature=temperature,
        layerwise_scalings=bool(raw.get("layerwise_scalings", False)),
        top_k=top_k,
        enable_softmax_topk=bool(raw.get("enable_softmax_topk", False)),
        scaling_pass_value=float(raw.get("scaling_pass_value", 0.0)),
        global_scaling_weight=float(raw.get("global_scaling_weight", 1.0)),
    )


def _expert_folder(name: str, folder: Path, expert: str, given: object) -> Path:
    candidates = []
    if isinstance(given, str) and given:
        p = Path(given).expanduser()
        candidates.append(p if p.is_absolute() else folder / p)
    candidates.append(folder / expert)
    for c in candidates:
        if (c / CONFIG_FILE).is_file():
            return c
    raise AdapterError(
        f"X-LoRA adapter {name!r}: expert {expert!r} is missing (looked in {', '.join(map(str, candidates))})",
        "put each expert's PEFT LoRA folder at the path adapter_config.json gives, or in <folder>/<expert name>",
    )


def read_xlora_adapter(name: str, path: str | Path, config: ModelConfig) -> XLoRAAdapter:
    """Read a PEFT X-LoRA adapter and its experts for a model of `config`, in float32 on the CPU. AdapterError
    names what is wrong: a missing file or expert, an expert that does not fit the model, a classifier whose sizes
    do not fit the model and the experts, an option we do not support."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_adapter_name(name)
    folder = Path(path).expanduser()
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(
            f"X-LoRA adapter {name!r}: {config_path} is missing",
            "pass the folder PEFT saved (save_pretrained)",
        )
    try:
        raw: dict[str, Any] = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise AdapterError(
            f"adapter {name!r}: cannot read {config_path}: {exc}", "check the adapter files"
        ) from exc
    if raw.get("peft_type") != "XLORA":
        raise AdapterError(
            f"adapter {name!r} is not an X-LoRA adapter", "read it with inference.lora.read_adapter"
        )
    base = raw.get("base_model_name_or_path")
    trained_on = f" (it was made for {base})" if base else ""
    experts_cfg = raw.get("adapters")
    if not isinstance(experts_cfg, dict) or not experts_cfg:
        raise AdapterError(
            f"X-LoRA adapter {name!r} names no experts", "adapter_config.json needs 'adapters'"
        )
    opts = _options(name, raw, len(experts_cfg))
    hidden = raw.get("hidden_size")
    if hidden is not None and hidden != config.hidden_size:
        raise AdapterError(
            f"X-LoRA adapter {name!r} has hidden_size {hidden}, this model {config.hidden_size}{trained_on}",
            "load an X-LoRA adapter trained on this base model",
        )
    experts: list[LoRAAdapter] = []
    for i, (expert, given) in enumerate(experts_cfg.items()):
        expert_path = _expert_folder(name, folder, str(expert), given)
        try:
            experts.append(read_adapter(f"{name}.{i}", expert_path, config))
        except AdapterError as exc:
            raise AdapterError(f"X-LoRA adapter {name!r}, expert {expert!r}: {exc.reason}", exc.hint) from exc

    # X-LoRA layers: every adapted (layer, projection), in the base model's module order
    adapted = {
        (layer, _PROJ[(module, shard)])
        for e in experts
        for (layer, module), w in e.modules.items()
        for shard, _ in w.shards
    }
    order = sorted(adapted, key=lambda lp: (lp[0], _ORDER.index(lp[1])))
    layer_number = {lp: i for i, lp in enumerate(order)}
    n_layers, n_experts = len(order), len(experts)
    gsw = opts.global_scaling_weight
    modules: dict[tuple[int, str], LoRAWeights] = {}
    columns: dict[tuple[int, str], torch.Tensor] = {}
    for key in sorted({k for e in experts for k in e.modules}):
        a_parts, b_parts, cols, shards = [], [], [], []
        for e_index, e in enumerate(experts):
            w = e.modules.get(key)
            if w is None:
                continue
            a_parts.append(w.a_t)
            b_parts.append(w.b_t * gsw)
            for shard, r in w.shards:
                flat = layer_number[(key[0], _PROJ[(key[1], shard)])] * n_experts + e_index
                cols += [flat] * r
                shards.append((shard, r))
        modules[key] = LoRAWeights(
            torch.cat(a_parts, 1).contiguous(), torch.cat(b_parts, 0).contiguous(), tuple(shards)
        )
        columns[key] = torch.tensor(cols, dtype=torch.int64)

    weights_path = folder / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterError(
            f"X-LoRA adapter {name!r}: {weights_path} is missing",
            "save the classifier with safe_serialization",
        )
    try:
        tensors = load_file(str(weights_path))
    except (OSError, SafetensorError) as exc:
        raise AdapterError(
            f"X-LoRA adapter {name!r}: cannot read {weights_path}: {exc}", "check the files"
        ) from exc
    classifier = _classifier(name, weights_path, tensors, raw, config.hidden_size, n_layers, n_experts, opts)
    targets = tuple(sorted({p for _, p in adapted}, key=_ORDER.index))
    return XLoRAAdapter(
        name=name,
        path=folder,
        base_model=base,
        options=opts,
        experts=tuple(str(e) for e in experts_cfg),
        n_layers=n_layers,
        modules=modules,
        gather=torch.cat([columns[k] for k in sorted(columns)]),
        spans=_spans({k: len(c) for k, c in columns.items()}),
        classifier=classifier,
        rank=max(e.rank for e in experts),
        target_modules=targets,
    )


def _spans(ranks: dict[tuple[int, str], int]) -> dict[tuple[int, str], tuple[int, int]]:
    """Each module's `(start, end)` in its columns laid end to end in key order."""
    spans, at = {}, 0
    for key in sorted(ranks):
        spans[key] = (at, at + ranks[key])
        at += ranks[key]
    return spans


def _classifier(
    name: str,
    path: Path,
    tensors: dict[str, torch.Tensor],
    raw: dict[str, Any],
    hidden: int,
    n_layers: int,
    n_experts: int,
    opts: XLoRAOptions,
) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """The classifier's linear layers in order, checked against PEFT's layout: `xlora_depth` linears (index 0,
    then every 3 with dropout, 2 without: Linear, ReLU[, Dropout]), hidden -> xlora_size ... -> the scalings."""
    found: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _CLASSIFIER_KEY.match(key)
        if m is None:
            raise AdapterError(
                f"X-LoRA adapter {name!r}: {path} holds {key!r}, which is not an X-LoRA classifier weight",
                "the classifier's file holds internal_xlora_classifier.layers.N.weight/bias only",
            )
        found.setdefault(int(m.group(1)), {})[m.group(2)] = t.float()
    depth = int(raw.get("xlora_depth", 1))
    stride = 3 if float(raw.get("xlora_dropout_p", 0.2)) > 0 else 2
    indices = [i * stride for i in range(depth)]
    missing = [i for i in indices if set(found.get(i, {})) != {"weight", "bias"}]
    if missing or set(found) != set(indices):
        raise AdapterError(
            f"X-LoRA adapter {name!r}: {path} holds classifier layers {sorted(found)}, xlora_depth={depth} needs "
            f"{indices} (weight and bias each)",
            "PEFT 0.21's save_pretrained drops classifier layers named like an expert index; save the classifier "
            "from the model's state_dict (keys with 'internal_xlora_classifier') with safetensors",
        )
    size = int(raw.get("xlora_size", 2048))
    out = n_experts * n_layers if opts.layerwise_scalings else n_experts
    layers = []
    for j, i in enumerate(indices):
        w, b = found[i]["weight"], found[i]["bias"]
        want_in = hidden if j == 0 else size
        want_out = out if j == depth - 1 else size
        if w.dim() != 2 or tuple(w.shape) != (want_out, want_in) or tuple(b.shape) != (want_out,):
            raise AdapterError(
                f"X-LoRA adapter {name!r}: classifier layer {i} is {tuple(w.shape)}, expected {(want_out, want_in)} "
                f"(hidden {hidden}, {n_experts} experts, {n_layers} adapted projections"
                f"{', layerwise' if opts.layerwise_scalings else ''})",
                "load an X-LoRA adapter trained on this base model with these experts",
            )
        layers.append((w, b))
    return tuple(layers)
