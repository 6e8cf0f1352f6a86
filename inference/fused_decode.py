"""Decode steps of our Llama-style decoder in one C++ call (inference/csrc/decode_step.cpp) on the CPU, when every
projection runs our qgemv kernel: the eager model's values without its ~60 dispatched ops a layer. The eager model
stays the reference and runs every other step (prefill, mixed steps, adapters, other kernels).

The weights are handed over once, as the layers hold them; a model whose buffers are replaced afterwards must
build a new `FusedDecode`. At start the op runs one padding row beside the eager model and must agree with it
(`FusedDecode.check`), else decode stays eager (logged), as it does after any failure mid-serving."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import structlog
import torch

from inference import qgemv
from inference.metadata import AttentionMetadata, HostBatch
from inference.models.llama import DecoderLayer, LlamaForCausalLM
from inference.quant import QuantLinear

if TYPE_CHECKING:
    from inference.models.layers import CausalLM

log = structlog.get_logger(__name__)

DecodeStepOp = Callable[..., torch.Tensor]

# Relative error of the hidden states, fused against eager, on the start-up check. The two differ only in the
# order of a few float32 sums (about 1e-3 after a bf16 model's layers); a wrong layout or build gives ~100%.
CHECK_TOLERANCE = 0.05


def _layers(model: LlamaForCausalLM) -> list[DecoderLayer]:
    return [cast(DecoderLayer, layer) for layer in model.layers]


def _projections(model: LlamaForCausalLM) -> list[QuantLinear] | str:
    """Every layer's four projections, or why they cannot run fused."""
    found: list[QuantLinear] = []
    for i, layer in enumerate(_layers(model)):
        for name, module in (
            ("qkv_proj", layer.self_attn.qkv_proj),
            ("o_proj", layer.self_attn.o_proj),
            ("gate_up_proj", layer.mlp.gate_up_proj),
            ("down_proj", layer.mlp.down_proj),
        ):
            if not isinstance(module, QuantLinear) or module.qgemv is None:
                return f"layer {i}'s {name} does not run our qgemv kernel (quantize the model: int8, int4 or GGUF)"
            if name in ("gate_up_proj", "down_proj") and module.bias is not None:
                return f"layer {i}'s {name} has a bias"
            found.append(module)
    return found


def failure_line(exc: BaseException) -> str:
    """What the op raised, in one log-sized line (its TORCH_CHECK message)."""
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def fused_unsupported(model: CausalLM, kv_cache: torch.Tensor, attention_name: str) -> str | None:
    """Why decode steps of `model` cannot run in one call, or None when they can."""
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not our Llama-style decoder"
    if kv_cache.device.type != "cpu":
        return f"the fused decode step is for the CPU (the cache is on {kv_cache.device.type})"
    if attention_name != "reference":
        return f"the fused decode step replaces the reference attention, not {attention_name}"
    dtype = model.norm.weight.dtype
    if dtype not in (torch.float32, torch.bfloat16) or kv_cache.dtype != dtype:
        return f"the model and its cache must be float32 or bfloat16 alike (model {dtype}, cache {kv_cache.dtype})"
    projections = _projections(model)
    if isinstance(projections, str):
        return projections
    libraries = {qgemv.library_of(p.qgemv) for p in projections}
    if len(libraries) != 1 or None in libraries:
        return "the projections run different builds of our kernel"
    return None


class FusedDecode:
    """`run` computes a decode step's final hidden states in one C++ call (`fits` says which steps), or returns
    None once the op failed, after which the caller runs every step eagerly."""

    def __init__(self, model: LlamaForCausalLM, kv_cache: torch.Tensor) -> None:
        """Raises ValueError where `fused_unsupported` names a reason (the runner asks it first)."""
        projections = _projections(model)
        if isinstance(projections, str):
            raise ValueError(projections)
        self.op: DecodeStepOp = qgemv.sibling_op(projections[0].qgemv, "decode_step")
        self.model = model
        self.kv_cache = kv_cache
        self.failed: str | None = None  # why fused steps stopped, once they did
        self.steps = 0  # decode steps served fused
        config = model.config
        self.heads, self.kv_heads, self.eps = config.num_heads, config.num_kv_heads, config.rms_norm_eps
        self.scale = config.head_dim**-0.5
        none = torch.empty(0, dtype=model.norm.weight.dtype)
        self.weights: list[torch.Tensor] = []
        self.ints: list[int] = []
        for i, layer in enumerate(_layers(model)):
            attn = layer.self_attn
            qkv, o, gate_up, down = projections[4 * i : 4 * i + 4]
            self.weights += [
                layer.input_layernorm.weight.detach(),
                *(qkv.qcodes, qkv.qscales, qkv.qmins, qkv.qsupers),
                none if qkv.bias is None else qkv.bias.detach(),
                none if attn.q_norm is None else attn.q_norm.weight.detach(),
                none if attn.k_norm is None else attn.k_norm.weight.detach(),
                *(o.qcodes, o.qscales, o.qmins, o.qsupers),
                none if o.bias is None else o.bias.detach(),
                layer.post_attention_layernorm.weight.detach(),
                *(gate_up.qcodes, gate_up.qscales, gate_up.qmins, gate_up.qsupers),
                *(down.qcodes, down.qscales, down.qmins, down.qsupers),
            ]
            for p in (qkv, o, gate_up, down):
                self.ints += [p.qgemv_bits, p.dense_rows]
        self.final_norm = model.norm.weight.detach()

    def fits(self, host: HostBatch) -> bool:
        """Whether this step runs fused: decode only (one new token a row), before any failure."""
        return self.failed is None and host.is_decode_only and host.num_tokens == host.num_seqs

    def _call(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        model = self.model
        x = model.embed_tokens(input_ids)
        cos, sin = model.rotary.cos_sin(positions, x.dtype)
        rows = x.shape[0]
        return self.op(
            x.contiguous(),
            cos.reshape(rows, -1).contiguous(),
            sin.reshape(rows, -1).contiguous(),
            self.weights,
            self.ints,
            self.final_norm,
            self.kv_cache,
            meta.slot_mapping.long().contiguous(),
            meta.block_tables.int().contiguous(),
            meta.context_lens.int().contiguous(),
            self.heads,
            self.kv_heads,
            self.eps,
            self.scale,
        )

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor | None:
        """Hidden states `[rows, hidden]` of a decode step that `fits`, or None if the op failed (logged once; the
        step's KV writes are idempotent, so the caller reruns it eagerly)."""
        try:
            hidden = self._call(input_ids, positions, meta)
        except RuntimeError as exc:
            self.failed = failure_line(exc)
            log.warning("fused_decode_failed", reason=self.failed, fallback="eager")
            return None
        self.steps += 1
        return hidden

    @torch.inference_mode()
    def check(self) -> float:
        """The relative error of one padding row's hidden states (token 0 at position 0, written to the null block),
        fused against the eager model: `CHECK_TOLERANCE` or more means the op computes something else."""
        ids = torch.zeros(1, dtype=torch.int64)
        meta = AttentionMetadata(
            slot_mapping=torch.zeros(1, dtype=torch.int64),
            query_start_loc=torch.arange(2, dtype=torch.int32),
            context_lens=torch.ones(1, dtype=torch.int32),
            block_tables=torch.zeros(1, 1, dtype=torch.int32),
            max_query_len=1,
            max_context_len=1,
            block_size=self.kv_cache.shape[3],
        )
        eager = self.model(ids, ids, meta, self.kv_cache).float()
        fused = self._call(ids, ids, meta).float()
        return float((fused - eager).norm() / eager.norm().clamp_min(1e-30))
