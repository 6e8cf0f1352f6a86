"""Async front of the engine: one step thread drives `LLMEngine`, callers on any event loop stream their
request's deltas through a thread-safe mailbox, and a cancelled consumer aborts its request."""

from __future__ import annotations

import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path
from typing import Any, TypeVar

import anyio
import structlog

from inference.config import DEFAULT_QUANTIZE_GROUP_SIZE, EngineConfig
from inference.engine import LLMEngine, Prompt, RequestOutput
from inference.errors import EngineError, EngineStoppedError, RequestError
from inference.lora import AdapterInfo
from inference.metrics import EngineMetrics
from inference.model_runner import make_current
from inference.params import SamplingParams
from inference.xlora import read_any_adapter

log = structlog.get_logger(__name__)

# consumers re-check engine health at least this often while waiting for output
_POLL_S = 1.0
_JOIN_S = 10.0
T = TypeVar("T")


class _Mailbox:
    """Outputs for one request, filled by the step thread and drained by the consumer's event loop."""

    __slots__ = ("_items", "_lock", "ready")

    def __init__(self) -> None:
        self._items: deque[RequestOutput] = deque()
        self._lock = threading.Lock()
        self.ready = threading.Event()

    def put(self, out: RequestOutput) -> None:
        with self._lock:
            self._items.append(out)
            # `ready` is set exactly while items wait (both change under the lock): skip the Event's own
            # lock and notify when the consumer has not drained the previous output yet
            if not self.ready.is_set():
                self.ready.set()

    def drain(self) -> list[RequestOutput]:
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self.ready.clear()
            return items


class AsyncEngine:
    """Many async callers share one engine; model compute never runs on an event loop."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._mailboxes: dict[str, _Mailbox] = {}
        self._lock = threading.Lock()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="engine-step", daemon=True)
        self._thread.start()

    @classmethod
    def from_model(
        cls,
        source: str = "smollm2-135m-instruct",
        config: EngineConfig | None = None,
        *,
        dtype: str = "auto",
        device: str = "cpu",
        load_format: str = "auto",
        progress: bool = False,
        quantize: str = "auto",
        quantize_group_size: int = DEFAULT_QUANTIZE_GROUP_SIZE,
        adapters: Mapping[str, str | Path] | None = None,
    ) -> AsyncEngine:
        """Load a model (see inference.loader.load_model: `quantize` is "auto", "none", "int8" or "int4") and
        start an engine on it with `config`'s settings (the defaults when None) and the LoRA `adapters` (name ->
        PEFT adapter folder)."""
        from inference.loader import load_model

        loaded = load_model(
            source,
            dtype=dtype,
            device=device,
            load_format=load_format,
            progress=progress,
            quantize=quantize,
            quantize_group_size=quantize_group_size,
        )
        return cls(LLMEngine(loaded, config, adapters=adapters))

    # ---- adapters (inference/lora.py) ----------------------------------------------------------------
    async def load_adapter(self, name: str, path: str | Path) -> AdapterInfo:
        """Load a LoRA or X-LoRA adapter while serving: the files are read on a worker thread, then the step thread
        registers it between two steps. AdapterError if it is bad or the name is taken."""
        self._check_running()
        adapter = await anyio.to_thread.run_sync(read_any_adapter, name, path, self.model_config)
        return await self._call(lambda: self.engine.load_adapter(name, adapter))

    async def unload_adapter(self, name: str) -> bool:
        """Unload an adapter: new requests on it are refused at once, requests in flight on it finish first
        (True if it is gone now, False if it goes with its last request). UnknownAdapterError if not loaded."""
        return await self._call(lambda: self.engine.unload_adapter(name))

    def adapters(self) -> list[AdapterInfo]:
        """The loaded adapters (a snapshot; any thread)."""
        return self.engine.adapters()

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the step thread between two steps and return its result (or raise its error)."""
        self._check_running()
        fut: Future[T] = Future()
        self._send(("call", fn, fut))

        def wait() -> T:
            while True:
                try:
                    return fut.result(_POLL_S)
                except FutureTimeout:
                    if not self._thread.is_alive():
                        raise EngineStoppedError(
                            "the inference engine stopped", "create a new engine"
                        ) from None

        return await anyio.to_thread.run_sync(wait, abandon_on_cancel=True)

    # ---- the async side ------------------------------------------------------------------------------
    async def generate(
        self,
        prompt: Prompt,
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the request's outputs; the last one has `finished=True`. Leaving early aborts the request.

        What each output carries follows `params.output_kind` (inference.params.OutputKind): streaming callers
        should ask for DELTA, which keeps the step thread's work per output independent of the text's length."""
        self._check_running()
        params = params if params is not None else SamplingParams()
        ids = self.engine.validate_request(prompt, params)  # a bad request fails here, alone
        rid = request_id if request_id is not None else uuid.uuid4().hex
        box = _Mailbox()
        with self._lock:
            if rid in self._mailboxes:
                raise RequestError(f"duplicate request id {rid!r}", "use a unique request_id")
            self._mailboxes[rid] = box
        self._send(("add", rid, ids, params, time.monotonic()))
        limiter = anyio.CapacityLimiter(1)
        finished = False
        try:
            while not finished:
                items = box.drain()
                if not items:
                    self._check_running()
                    await anyio.to_thread.run_sync(
                        box.ready.wait, _POLL_S, abandon_on_cancel=True, limiter=limiter
                    )
                    continue
                for out in items:
                    finished = out.finished
                    yield out
                    if finished:
                        break
        finally:
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its blocks are freed by the step thread right away."""
        with self._lock:
            self._mailboxes.pop(request_id, None)
        self._send(("abort", request_id))

    def metrics(self) -> EngineMetrics:
        return self.engine.metrics()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._closing

    def close(self) -> None:
        """Stop the step thread (unfinished requests end with finish_reason "abort")."""
        self._closing = True
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(_JOIN_S)

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            self._closing = True
            self._wake.set()
            await anyio.to_thread.run_sync(self._thread.join, _JOIN_S)

    async def __aenter__(self) -> AsyncEngine:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _send(self, command: tuple[Any, ...]) -> None:
        self._commands.put(command)
        self._wake.set()

    def _check_running(self) -> None:
        if not self.is_running:
            raise EngineStoppedError("the inference engine is not running", "create a new engine")

    # ---- the step thread -----------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        make_current(
            engine.runner.device
        )  # this thread steps the engine: it needs the model's GPU as current
        try:
            while not self._closing:
                self._apply_commands()
                if not engine.has_unfinished():
                    if self._wake.wait(_POLL_S):
                        self._wake.clear()
                    continue
                try:
                    outputs = engine.step()
                except Exception:
                    log.exception("engine step failed; failing the requests in flight")
                    outputs = engine.abort_all("error")
                self._deliver(outputs)
        finally:
            self._apply_commands()
            self._deliver(engine.abort_all("abort"))
            with self._lock:
                boxes = list(self._mailboxes.values())
            for box in boxes:  # wake consumers so they notice the engine stopped
                box.ready.set()

    def _apply_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add":
                _, rid, ids, params, arrival = cmd
                with self._lock:
                    if rid not in self._mailboxes:  # aborted before it reached the engine
                        continue
                # the hand-off to this thread: it takes commands between steps, so a submission waits for
                # the step in progress (the async front's only wait on the engine before its queue)
                self.engine.stats.record_step_wait(time.monotonic() - arrival)
                try:
                    self.engine.add_request(rid, ids, params, arrival_time=arrival, validated_ids=ids)
                except EngineError as exc:
                    log.warning("request rejected", request_id=rid, reason=str(exc))
                    self._deliver([_failed(rid, len(ids))])
            elif cmd[0] == "abort":
                self.engine.abort(cmd[1])
            elif cmd[0] == "call":
                _, fn, fut = cmd
                if fut.set_running_or_notify_cancel():
                    try:
                        fut.set_result(fn())
                    except Exception as exc:  # the caller's error (AdapterError, ...), raised in its task
                        fut.set_exception(exc)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        if not outputs:
            return
        with self._lock:
            for out in outputs:
                box = self._mailboxes.get(out.request_id)
                if box is None:
                    continue
                if out.finished:
                    del self._mailboxes[out.request_id]
                box.put(out)


def _failed(request_id: str, prompt_tokens: int) -> RequestOutput:
    return RequestOutput(request_id, "", [], "", [], True, "error", prompt_tokens, 0, None, None)
