"""The synchronous engine core: validates and tokenizes requests, then each `step()` schedules, runs the
model, samples, applies stop rules and returns the requests' new output."""

from __future__ import annotations

import itertools
import time
from collections.abc import Mapping
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import structlog
import torch

from inference.attention_backends import get_attention_backend
from inference.block_manager import BlockManager
from inference.config import EngineConfig
from inference.cuda_graphs import largest_graph_batch
from inference.errors import RequestError
from inference.lora import AdapterInfo, LoRAAdapter, LoRAManager
from inference.memory_profile import StepLimits, plan_cuda_kv_blocks
from inference.metrics import EngineMetrics, MetricsCollector
from inference.model_runner import ModelRunner, make_current, plan_num_blocks
from inference.params import OutputKind, SamplingParams
from inference.sampler import Sampler
from inference.scheduler import Scheduler
from inference.sequence import Sequence
from inference.xlora import XLoRAAdapter, read_any_adapter

if TYPE_CHECKING:
    from inference.loader import LoadedModel

log = structlog.get_logger(__name__)

Prompt = str | list[int] | list[dict[str, Any]]


@dataclass(slots=True)
class RequestOutput:
    """What a request produced since its previous output (`delta_*`) and in total (`text`, `token_ids`,
    `logprobs`).

    The deltas of a request's outputs concatenate to its totals. The totals are on every output when the
    request's `SamplingParams.output_kind` is CUMULATIVE (the default), and only on the final output
    (`finished=True`) for DELTA and FINAL_ONLY, where non-final outputs have `text=""`, `token_ids=[]` and
    `logprobs=None`; FINAL_ONLY sends the final output alone. `completion_tokens` is always the total so far.
    """

    request_id: str
    delta_text: str
    delta_token_ids: list[int]
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[Any] | None = None
    delta_logprobs: list[Any] | None = None  # None unless the request asked for logprobs
    cached_tokens: int = 0  # prompt tokens served from the prefix cache (on the latest admission)


class LLMEngine:
    """Single-threaded: call `add_request`, `abort` and `step` from one thread (AsyncEngine's step thread)."""

    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig | None = None,
        *,
        adapters: Mapping[str, str | Path] | None = None,
    ) -> None:
        """Start an engine on a loaded model (inference.loader.load_model) with `config`'s settings (the
        defaults when None; inference/config.py). Without `num_blocks` or `kv_cache_memory`, CUDA sizes the KV
        cache from a profiling step (inference/memory_profile.py) and the CPU takes a capped share of free RAM
        (inference/model_runner.py). `adapters` (name -> PEFT LoRA folder) are loaded at start (inference/lora.py);
        AdapterError if one is bad."""
        config = config if config is not None else EngineConfig()
        self.config = config
        self.loaded = loaded
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        cfg = self.model_config
        self.max_model_len = config.max_model_len_for(cfg)
        device = next(loaded.model.parameters()).device
        make_current(device)  # profiling, the runner and graph capture all run in this thread
        planned = None
        if device.type == "cuda" and config.num_blocks is None and config.kv_cache_memory is None:
            graph_rows = largest_graph_batch(
                device,
                get_attention_backend(device, config.attention_backend).name,
                cfg,
                max_num_seqs=config.max_num_seqs,
                enforce_eager=config.enforce_eager,
            )
            limits = StepLimits(config, self.max_model_len, decode_graph_rows=graph_rows)
            planned = plan_cuda_kv_blocks(loaded.model, cfg, limits)
        blocks = plan_num_blocks(cfg, config, device, planned=planned)
        self.runner = ModelRunner(loaded.model, cfg, config, num_blocks=blocks)
        self.lora = LoRAManager(
            loaded.model,
            cfg,
            self.runner.device,
            config.max_loras,
            block_size=config.block_size,
            kernels=config.lora_kernels,
            max_rank=config.max_lora_rank,
        )
        self.runner.lora = self.lora
        for name, path in (adapters or {}).items():
            self.lora.add(read_any_adapter(name, path, cfg))
        self.block_manager = BlockManager(
            blocks, config.block_size, enable_prefix_caching=config.enable_prefix_caching
        )
        self.scheduler = Scheduler(self.block_manager, config)
        self.sampler = Sampler()
        self.stats = MetricsCollector()
        self._seqs: dict[str, Sequence] = {}
        self._pending: list[RequestOutput] = []
        self._ids = itertools.count()
        self._eos = frozenset(cfg.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        log.info(
            "engine ready",
            kv_blocks=blocks,
            kv_mib=round(self.runner.kv_cache_bytes / 2**20, 1),
            max_model_len=self.max_model_len,
            decode=self.runner.decode_path,
        )

    # ---- requests ------------------------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids of a text prompt, a token-id list, or chat messages (template + generation prompt)."""
        if isinstance(prompt, str):
            if not prompt:
                raise RequestError("empty prompt", "send at least one character or token")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list | tuple) and prompt and all(isinstance(m, dict) for m in prompt):
            try:
                messages = cast(SequenceT[dict[str, Any]], prompt)  # all dicts, checked above
                return self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
            except Exception as exc:  # a template error is the caller's malformed messages
                raise RequestError(
                    f"chat template failed: {exc}", "check the messages' roles and content"
                ) from exc
        if isinstance(prompt, list | tuple) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in prompt
        ):
            return list(cast(SequenceT[int], prompt))  # all ints, checked above
        raise RequestError(
            "prompt must be text, token ids or chat messages", "pass str, list[int] or list[dict]"
        )

    def validate_request(self, prompt: Prompt, params: SamplingParams) -> list[int]:
        """Check params and prompt and return the prompt's token ids; raises RequestError (UnknownAdapterError
        for an adapter that is not loaded; a RequestError for an X-LoRA request whose two KV caches could not fit
        the pool). Thread-safe."""
        params.validate()
        if params.adapter is not None:
            self.lora.check(params.adapter)
        ids = self.tokenize(prompt)
        if not ids:
            raise RequestError("empty prompt", "send at least one token")
        vocab = self.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestError("prompt has token ids outside the vocabulary", f"ids must be in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise RequestError(
                "logit_bias has token ids outside the vocabulary", f"ids must be in [0, {vocab})"
            )
        if len(ids) >= self.max_model_len:
            raise RequestError(
                f"prompt of {len(ids)} tokens does not fit the {self.max_model_len}-token context",
                "shorten the prompt (one position is needed for the answer)",
            )
        if params.adapter is not None and self.lora.pass_key(params.adapter) is not None:
            # an X-LoRA request holds two blocks per block of context (its scaling pass has a KV cache too); one
            # that cannot fit alone would wait for blocks forever
            tokens = min(len(ids) + params.max_tokens, self.max_model_len)
            bm = self.block_manager
            if 2 * bm.blocks_needed(tokens) > bm.num_usable_blocks:
                raise RequestError(
                    f"an X-LoRA request of up to {tokens} tokens needs {2 * bm.blocks_needed(tokens)} KV blocks "
                    f"(two caches), the KV cache has {bm.num_usable_blocks}",
                    "raise num_blocks or kv_cache_memory, or lower max_tokens",
                )
        return ids

    def add_request(
        self,
        request_id: str | None,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        arrival_time: float | None = None,
        validated_ids: list[int] | None = None,
    ) -> str:
        """Queue a request; raises RequestError (and changes nothing) when it is invalid."""
        params = params if params is not None else SamplingParams()
        ids = validated_ids if validated_ids is not None else self.validate_request(prompt, params)
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._seqs:
            raise RequestError(f"duplicate request id {request_id!r}", "use a unique request_id")
        seq = Sequence(request_id, ids, params)
        if params.adapter is not None:  # KV computed under an adapter is cached under it alone
            seq.cache_extra_key = self.lora.acquire(params.adapter)
            seq.pass_cache_key = self.lora.pass_key(params.adapter)  # X-LoRA: a second, scaling-pass cache
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        if not params.greedy and params.seed is not None:
            # a seeded request owns its generator, on the model's device, so its draws never depend on the batch;
            # unseeded ones share the sampler's (seeded from the OS)
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq.detokenizer = self.tokenizer.detokenizer()
        self._seqs[request_id] = seq
        self.scheduler.add(seq)
        return request_id

    def abort(self, request_id: str, reason: str = "abort") -> bool:
        """Stop a request now and free its blocks; its final output comes from the next `step()`."""
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return False
        self.scheduler.finish(seq, reason)
        if seq.params.adapter is not None:
            self.lora.release(seq.params.adapter)
        self.stats.record_finished()
        self._pending.append(self._output(seq, finished=True))
        return True

    def abort_all(self, reason: str = "error") -> list[RequestOutput]:
        for rid in list(self._seqs):
            self.abort(rid, reason)
        out, self._pending = self._pending, []
        return out

    def has_unfinished(self) -> bool:
        return bool(self._seqs) or bool(self._pending)

    @property
    def num_unfinished(self) -> int:
        return len(self._seqs)

    # ---- the step ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Run one batch; returns the outputs of requests that advanced or ended (aborts included)."""
        outputs, self._pending = self._pending, []
        batch = self.scheduler.schedule()
        if not batch:
            return outputs
        t0 = time.monotonic()
        for seq in batch.admitted:
            if not seq.admitted:
                seq.admitted = True
                self.stats.record_admitted(t0 - seq.arrival_time, seq.num_prompt_tokens)
            elif seq.preempted_time is not None:  # back after a preemption: it waited for KV blocks
                self.stats.record_readmitted(t0 - seq.preempted_time)
                seq.preempted_time = None
        logits, sampling = self.runner.run(batch.items)
        kv_used = self.block_manager.num_used_blocks  # before finished requests give their blocks back
        commit = self.block_manager.commit
        for seq, n in batch.items:
            seq.num_computed_tokens += n
            commit(seq)
        if logits is not None:
            result = self.sampler(logits, sampling)
            now = time.monotonic()
            self.stats.record_tokens(
                len(sampling),
                [now - s.arrival_time for s in sampling if s.first_token_time is None],
                [now - s.last_token_time for s in sampling if s.last_token_time is not None],
            )
            append = self._append_token
            for seq, token, logprob in zip(sampling, result.token_ids, result.logprobs, strict=True):
                out = append(seq, token, logprob, now)
                if out is not None:
                    outputs.append(out)
        self.stats.record_step(
            len(batch.items),
            batch.num_tokens,
            time.monotonic() - t0,
            kv_used,
            len(self.scheduler.running),
        )
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: Any, now: float) -> RequestOutput | None:
        p = seq.params
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.last_token_time = now
        ids = seq.token_ids
        ids.append(token)
        if logprob is not None and seq.logprobs is not None:
            seq.logprobs.append(logprob)
        reason: str | None = None
        stopped_by_text = False
        if (token in self._eos and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        else:
            delta = seq.detokenizer.add(token)
            if delta:
                seq.text += delta
                if p.stop and self._cut_at_stop(seq, len(delta)):
                    reason, stopped_by_text = "stop", True
        if reason is None and (
            len(ids) - len(seq.prompt_token_ids) >= p.max_tokens or len(ids) >= self.max_model_len
        ):
            reason = "length"
        if reason is not None:
            self._finish(seq, reason, flush=not stopped_by_text)
            return self._output(seq, finished=True)
        if p.output_kind is OutputKind.FINAL_ONLY:
            return None
        # a new token id is always news, even when its text is held back (stop strings, incomplete characters)
        return self._output(seq, finished=False)

    @staticmethod
    def _cut_at_stop(seq: Sequence, delta_len: int) -> bool:
        """Truncate `seq.text` before the earliest stop string that the latest delta completed."""
        text, stops = seq.text, seq.params.stop
        # a stop string completed by the delta starts at most len(stop) - 1 characters before it
        start = max(0, len(text) - delta_len - max(map(len, stops)) + 1)
        cut = -1
        for stop in stops:
            i = text.find(stop, start)
            if i >= 0 and (cut < 0 or i < cut):
                cut = i
        if cut < 0:
            return False
        seq.text = text[:cut]
        return True

    def _finish(self, seq: Sequence, reason: str, *, flush: bool) -> None:
        if flush:
            tail = seq.detokenizer.flush()
            if tail:
                seq.text += tail
                if seq.params.stop:
                    self._cut_at_stop(seq, len(tail))
        self._seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq, reason)
        if seq.params.adapter is not None:
            self.lora.release(seq.params.adapter)
        self.stats.record_finished()

    def _output(self, seq: Sequence, *, finished: bool) -> RequestOutput:
        """The request's output since its previous one; O(delta) unless the totals are asked for."""
        text = seq.text
        stops = seq.params.stop
        if finished or not stops:
            safe = len(text)
        else:  # hold back text that might turn out to be the start of a stop string
            safe = max(seq.emitted_text_len, len(text) - max(map(len, stops)) + 1)
        delta_text = text[seq.emitted_text_len : safe]
        seq.emitted_text_len = safe
        num_prompt = len(seq.prompt_token_ids)
        emitted = seq.emitted_token_count
        delta_ids = seq.token_ids[num_prompt + emitted :]
        num_out = emitted + len(delta_ids)
        seq.emitted_token_count = num_out
        lps = seq.logprobs
        delta_lps = lps[emitted:] if lps is not None else None
        if finished or seq.params.output_kind is OutputKind.CUMULATIVE:
            total_text = text[:safe]
            total_ids = seq.token_ids[num_prompt:]
            total_lps = list(lps) if lps is not None else None
        else:
            total_text, total_ids, total_lps = "", [], None
        return RequestOutput(  # positional: this runs for every sequence at every step
            seq.request_id,
            delta_text,
            delta_ids,
            total_text,
            total_ids,
            finished,
            seq.finish_reason if finished else None,
            num_prompt,
            num_out,
            total_lps,
            delta_lps,
            seq.num_cached_tokens,
        )

    # ---- adapters ------------------------------------------------------------------------------------
    def load_adapter(self, name: str, path: str | Path | LoRAAdapter | XLoRAAdapter) -> AdapterInfo:
        """Load a PEFT LoRA or X-LoRA adapter under `name` (or register one read with
        `inference.xlora.read_any_adapter`, the slow part, which may run on any thread); AdapterError if it is bad
        or the name is taken."""
        if isinstance(path, (LoRAAdapter, XLoRAAdapter)):
            self.lora.add(path)
        else:
            self.lora.add(read_any_adapter(name, path, self.model_config))
        return next(a for a in self.lora.describe() if a.name == name)

    def unload_adapter(self, name: str) -> bool:
        """Unload an adapter: new requests on it are refused at once; requests in flight on it finish first.
        True if it is gone now, False if it goes with its last request; UnknownAdapterError if not loaded."""
        return self.lora.unload(name)

    def adapters(self) -> list[AdapterInfo]:
        return self.lora.describe()

    # ---- conveniences --------------------------------------------------------------------------------
    def generate(
        self,
        prompts: SequenceT[Prompt] | Prompt,
        params: SamplingParams | SequenceT[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run prompts to completion (for tests and benchmarks); final outputs in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and not isinstance(prompts[0], str | list | tuple)
        ):
            prompts = [prompts]
        plist = list(prompts)
        if params is None or isinstance(params, SamplingParams):
            param_list = [params or SamplingParams()] * len(plist)
        else:
            param_list = list(params)
        # only the final outputs are returned, and those carry the totals whatever the output kind
        param_list = [replace(pa, output_kind=OutputKind.FINAL_ONLY) for pa in param_list]
        ids = [self.add_request(None, pr, pa) for pr, pa in zip(plist, param_list, strict=True)]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def metrics(self) -> EngineMetrics:
        bm = self.block_manager
        return self.stats.snapshot(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            kv_total=bm.num_usable_blocks,
            kv_used=bm.num_used_blocks,
            prefix_query=bm.prefix_query_tokens,
            prefix_hit=bm.prefix_hit_tokens,
            preemptions=self.scheduler.num_preemptions,
        )
