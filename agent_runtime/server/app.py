"""The OpenAI-compatible ASGI app (Starlette): models, chat and text completions (streamed or not), liveness,
readiness and Prometheus metrics, behind the security middleware. One app serves one engine and the configured
agents; every request gets an id (`X-Request-Id`, the client's or a new one) that its log lines, its response
headers and its error bodies carry."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import structlog
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from agent_runtime.server import chat
from agent_runtime.server.agents import ServedAgents
from agent_runtime.server.errors import (
    APIError,
    bad_request,
    internal,
    model_not_found,
    not_ready,
    over_capacity,
    request_id_from,
)
from agent_runtime.server.metrics import ServerMetrics, StreamTimer
from agent_runtime.server.schemas import (
    SSE_DONE,
    AdapterLoadRequest,
    ChatCompletionRequest,
    CompletionRequest,
    ContentChunks,
    chat_chunk,
    chat_response,
    completion_chunk,
    completion_response,
    model_card,
    new_id,
    now,
    sse,
    tool_call_json,
    usage,
)
from agent_runtime.server.security import SecurityMiddleware, SecuritySettings
from agent_runtime.server.service import EngineService
from agent_runtime.server.sse import EventStreamResponse, wait_disconnect
from inference.errors import AdapterError, RequestError
from inference.params import OutputKind, SamplingParams

log = structlog.get_logger(__name__)

B = TypeVar("B", bound=BaseModel)

ROUTES = (
    "/health",
    "/ready",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/adapters",
)
CLIENT_CLOSED = 499  # nginx's status for "client closed the request", recorded in metrics only


@dataclass(slots=True)
class ServerSettings:
    security: SecuritySettings = field(default_factory=SecuritySettings)
    max_concurrent_requests: int = 256  # generations in flight (queued in the engine included); then 429
    served_model_name: str | None = None  # the id clients use for the engine's model


@dataclass(slots=True)
class Readiness:
    """What `/ready` answers: ready once the model is loaded and the MCP servers are started, until the server
    drains (SIGTERM). `/health` (liveness) only says the process serves HTTP."""

    model_loaded: bool = True
    servers_started: bool = True
    draining: bool = False

    def waiting_for(self) -> list[str]:
        return [
            what
            for what, done in (("model", self.model_loaded), ("mcp_servers", self.servers_started))
            if not done
        ]

    @property
    def ready(self) -> bool:
        return not self.draining and self.model_loaded and self.servers_started

    @property
    def status(self) -> str:
        return "draining" if self.draining else "ready" if self.ready else "starting"


class _Capacity:
    """Counts generations in flight; refuses (429) instead of queueing without bound."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise over_capacity(self.limit)
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


class OpenAIServer:
    """Request handlers; `app` is the full ASGI stack (metrics -> security -> Starlette routes)."""

    def __init__(
        self,
        engine: Any | None,
        *,
        settings: ServerSettings | None = None,
        agents: ServedAgents | None = None,
        metrics: ServerMetrics | None = None,
        model_id: str | None = None,
        starting: bool = False,
    ) -> None:
        """With `starting`, the server answers /health at once and 503 to the API (and /ready) until `attach`
        gives it the engine and the agents; otherwise it is ready from the start."""
        self.settings = settings or ServerSettings()
        problem = self.settings.security.problem()
        if problem:
            raise ValueError(problem)
        self.service: EngineService | None = None
        self.agents: ServedAgents | None = None
        self.metrics = metrics or ServerMetrics()
        self.capacity = _Capacity(self.settings.max_concurrent_requests)
        self.created = now()
        self.readiness = Readiness(model_loaded=False, servers_started=False)
        if not starting:
            self.attach(engine, agents, model_id)
        routes = [
            Route("/health", self.health, methods=["GET"]),
            Route("/ready", self.ready, methods=["GET"]),
            Route("/metrics", self.prometheus, methods=["GET"]),
            Route("/v1/models", self.list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.get_model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/adapters", self.load_adapter, methods=["POST"]),
            Route("/v1/adapters/{name}", self.unload_adapter, methods=["DELETE"]),
        ]
        starlette = Starlette(
            routes=routes,
            lifespan=self._lifespan,
            exception_handlers={HTTPException: _http_exception, APIError: _api_error},
        )
        secured = SecurityMiddleware(starlette, self.settings.security)
        self.app: ASGIApp = _MetricsMiddleware(secured, self.metrics)

    def attach(self, engine: Any | None, agents: ServedAgents | None, model_id: str | None = None) -> None:
        """The loaded engine (None: agents only) and the started agents; the server is ready from now on."""
        if engine is not None:
            name = self.settings.served_model_name or model_id or "local"
            self.service = EngineService(engine, name)
            self.metrics.attach_engine(name, self.service.metrics)
        self.agents = agents
        self.readiness.model_loaded = self.readiness.servers_started = True

    @asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.metrics.watch_event_loop)
            yield
            tg.cancel_scope.cancel()

    # -- model names ---------------------------------------------------------------------------------------

    def model_ids(self) -> list[str]:
        """The engine's model, then `model:adapter` for each LoRA adapter it serves, then the agents."""
        ids = [self.service.model_id] if self.service is not None else []
        if self.service is not None:
            ids += [f"{self.service.model_id}:{a}" for a in self.service.adapter_names()]
        ids += [a for a in (self.agents.names() if self.agents else []) if a not in ids]
        return ids

    def _card(self, model_id: str) -> dict[str, Any]:
        if self.service is not None and model_id == self.service.model_id:
            return model_card(
                model_id,
                owned_by="agent-runtime",
                created=self.created,
                kind="model",
                max_model_len=self.service.max_model_len,
            )
        if self.service is not None and model_id.startswith(f"{self.service.model_id}:"):
            return model_card(
                model_id,
                owned_by="agent-runtime",
                created=self.created,
                kind="adapter",
                parent=self.service.model_id,
                max_model_len=self.service.max_model_len,
            )
        assert self.agents is not None
        return model_card(
            model_id,
            owned_by="agent-runtime",
            created=self.created,
            kind="agent",
            description=self.agents.describe(model_id),
        )

    # -- plain routes --------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        """Liveness: the process answers HTTP (while it starts and drains too)."""
        body: dict[str, Any] = {
            "status": "ok",
            "ready": self.readiness.ready,
            "models": self.model_ids(),
            "in_flight": self.capacity.in_flight,
        }
        return JSONResponse(body)

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 once the model is loaded and the MCP servers started, 503 while starting or draining."""
        r = self.readiness
        body = {"status": r.status, "waiting_for": r.waiting_for(), "in_flight": self.capacity.in_flight}
        return JSONResponse(body, status_code=200 if r.ready else 503, headers={"Cache-Control": "no-store"})

    def _require_ready(self) -> None:
        r = self.readiness
        if not r.ready:
            if r.draining:
                raise not_ready("the server is shutting down; retry on another instance")
            raise not_ready(
                f"the server is starting (waiting for: {', '.join(r.waiting_for())}); retry shortly"
            )

    async def prometheus(self, request: Request) -> Response:
        data, content_type = self.metrics.render()
        return Response(data, media_type=content_type)

    async def list_models(self, request: Request) -> Response:
        self._require_ready()
        return JSONResponse({"object": "list", "data": [self._card(m) for m in self.model_ids()]})

    async def get_model(self, request: Request) -> Response:
        self._require_ready()
        model_id = request.path_params["model_id"]
        if model_id not in self.model_ids():
            raise model_not_found(model_id, self.model_ids())
        return JSONResponse(self._card(model_id))

    # -- chat completions ----------------------------------------------------------------------------------

    async def chat_completions(self, request: Request) -> Response | EventStreamResponse:
        arrival = time.perf_counter()
        self._require_ready()
        req = await _parse(request, ChatCompletionRequest)
        if self.agents is not None and req.model in self.agents.names():
            return await self._agent_chat(request, req)
        svc, adapter = self._engine_for(req.model)
        plan = chat.build_chat(req, tool_role_ok=svc.tool_role_ok)
        args = chat.sampling_args(req, req.output_limit or svc.max_model_len)
        top_n = (req.top_logprobs or 0) if req.logprobs else None
        params = await self._params(args, top_n, plan.grammar)
        params.adapter = adapter
        rid = new_id("chatcmpl")
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        outputs = await self._start(request, svc, plan.messages, params, rid, arrival)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED)
        if req.stream:
            body = self._chat_stream(svc, req, plan, outputs, rid, include_usage, top_n)
            return EventStreamResponse(_guarded(body), on_close=lambda _: self.capacity.release())
        try:
            got = await _until_disconnect(request, _collect(outputs))
        finally:
            self.capacity.release()
        if got is None:
            return Response(status_code=CLIENT_CLOSED)
        final, lps = got
        _raise_engine_failure(final)
        content: str | None = final.text
        calls = None
        reason = final.finish_reason
        if plan.tool_mode:
            content, calls, reason = chat.parse_actions(final.text, reason)
        return JSONResponse(
            chat_response(
                rid=rid,
                model=req.model,
                created=now(),
                content=content,
                tool_calls=calls,
                finish_reason=reason,
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                logprobs=chat.chat_logprobs(svc.tokenizer, lps, top_n or 0) if top_n is not None else None,
            )
        )

    async def _chat_stream(
        self,
        svc: EngineService,
        req: ChatCompletionRequest,
        plan: chat.ChatPlan,
        outputs: AsyncGenerator[Any, None],
        rid: str,
        include_usage: bool,
        top_n: int | None,
    ) -> AsyncGenerator[bytes, None]:
        created = now()
        chunk = _chunk_encoder(req.model, rid, created, include_usage)

        fast = ContentChunks(
            rid=rid, model=req.model, created=created, kind="chat", with_usage_field=include_usage
        )
        yield chunk({"role": "assistant", "content": ""})
        final = None
        async with aclosing(outputs) as stream:
            async for out in stream:
                final = out
                if out.finish_reason == "error":
                    break
                if plan.tool_mode:
                    continue  # the action is parsed once complete; its JSON is never streamed half-made
                lp = None
                if top_n is not None and out.delta_logprobs is not None:
                    lp = chat.chat_logprobs(svc.tokenizer, out.delta_logprobs, top_n)
                if lp:
                    yield chunk({"content": out.delta_text}, logprobs=lp)
                elif out.delta_text:
                    yield fast.text(out.delta_text)
        if final is None or final.finish_reason == "error":
            yield sse({"error": _engine_error_body(final)})
            yield SSE_DONE
            return
        reason = final.finish_reason
        if plan.tool_mode:
            try:
                content, calls, reason = chat.parse_actions(final.text, reason)
            except APIError as exc:
                yield sse(exc.body())
                yield SSE_DONE
                return
            if calls:
                yield chunk({"tool_calls": [tool_call_json(c, i) for i, c in enumerate(calls)]})
            elif content:
                yield chunk({"content": content})
        yield chunk({}, finish_reason=reason)
        if include_usage:
            yield chunk(None, usage_=usage(final.prompt_tokens, final.completion_tokens))
        yield SSE_DONE

    # -- text completions ------------------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response | EventStreamResponse:
        arrival = time.perf_counter()
        self._require_ready()
        req = await _parse(request, CompletionRequest)
        if self.agents is not None and req.model in self.agents.names():
            raise bad_request(f"{req.model!r} is an agent: use /v1/chat/completions", param="model")
        svc, adapter = self._engine_for(req.model)
        prompt = req.prompt_value()
        params = await self._params(chat.sampling_args(req, req.max_tokens), req.logprobs, None)
        params.adapter = adapter
        rid = new_id("cmpl")
        echo = ""
        if req.echo:
            echo = prompt if isinstance(prompt, str) else svc.tokenizer.decode(prompt)
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        outputs = await self._start(request, svc, prompt, params, rid, arrival)
        if outputs is None:
            return Response(status_code=CLIENT_CLOSED)
        if req.stream:
            body = self._completion_stream(svc, req, outputs, rid, echo, include_usage)
            return EventStreamResponse(_guarded(body), on_close=lambda _: self.capacity.release())
        try:
            got = await _until_disconnect(request, _collect(outputs))
        finally:
            self.capacity.release()
        if got is None:
            return Response(status_code=CLIENT_CLOSED)
        final, lps = got
        _raise_engine_failure(final)
        logprobs = (
            chat.completion_logprobs(svc.tokenizer, lps, len(echo)) if req.logprobs is not None else None
        )
        return JSONResponse(
            completion_response(
                rid=rid,
                model=req.model,
                created=now(),
                text=echo + final.text,
                finish_reason=final.finish_reason,
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                logprobs=logprobs,
            )
        )

    async def _completion_stream(
        self,
        svc: EngineService,
        req: CompletionRequest,
        outputs: AsyncGenerator[Any, None],
        rid: str,
        echo: str,
        include_usage: bool,
    ) -> AsyncGenerator[bytes, None]:
        created = now()

        def chunk(text: str | None, **kw: Any) -> bytes:
            return sse(
                completion_chunk(
                    rid=rid, model=req.model, created=created, text=text, with_usage_field=include_usage, **kw
                )
            )

        ContentChunks(rid=rid, model=req.model, created=created, kind="text", with_usage_field=include_usage)
        if echo:
            yield chunk(echo)
        final = None
        offset = len(echo)
        async with aclosing(outputs) as stream:
            async for out in stream:
                final = out
                if out.finish_reason == "error":
                    break
                lp = None
                if req.logprobs is not None and out.delta_logprobs is not None:
                    lp = chat.completion_logprobs(svc.tokenizer, out.delta_logprobs, offset)
                offset += len(out.delta_text)
                if out.delta_text or lp or out.finished:
                    yield chunk(
                        out.delta_text, logprobs=lp, finish_reason=out.finish_reason if out.finished else None
                    )
        if final is None or final.finish_reason == "error":
            yield sse({"error": _engine_error_body(final)})
        elif include_usage:
            yield chunk(None, usage_=usage(final.prompt_tokens, final.completion_tokens))
        yield SSE_DONE

    # -- agents as models ------------------------------------------------------------------------------------

    async def _agent_chat(
        self, request: Request, req: ChatCompletionRequest
    ) -> Response | EventStreamResponse:
        assert self.agents is not None
        if req.tools:
            raise bad_request(
                "an agent uses its own MCP tools; client-side `tools` are not accepted", param="tools"
            )
        messages = [{"role": m.role, "content": _text_or_400(m, i)} for i, m in enumerate(req.messages)]
        rid = new_id("chatcmpl")
        include_usage = bool(req.stream and req.stream_options and req.stream_options.include_usage)
        self.capacity.acquire()
        if req.stream:
            body = self._agent_stream(req, messages, rid, include_usage)
            return EventStreamResponse(_guarded(body), on_close=lambda _: self.capacity.release())
        try:
            final = await _until_disconnect(request, _agent_final(self.agents.stream(req.model, messages)))
        finally:
            self.capacity.release()
        if final is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(
            chat_response(
                rid=rid,
                model=req.model,
                created=now(),
                content=final.text,
                tool_calls=None,
                finish_reason=str(final.data.get("finish_reason", "stop")),
                prompt_tokens=final.prompt_tokens,
                completion_tokens=final.completion_tokens,
                logprobs=None,
            )
        )

    async def _agent_stream(
        self, req: ChatCompletionRequest, messages: list[dict[str, Any]], rid: str, include_usage: bool
    ) -> AsyncGenerator[bytes, None]:
        assert self.agents is not None
        created = now()
        chunk = _chunk_encoder(req.model, rid, created, include_usage)

        yield chunk({"role": "assistant", "content": ""})
        streamed = ""
        final = None
        async with aclosing(self.agents.stream(req.model, messages)) as run:
            async for item in run:
                if item.kind == "text" and item.text:
                    streamed += item.text
                    yield chunk({"content": item.text})
                elif item.kind == "final":
                    final = item
        if final is None:
            yield sse({"error": {"message": "the agent run ended without an answer", "type": "server_error"}})
            yield SSE_DONE
            return
        if final.text.startswith(streamed) and len(final.text) > len(streamed):
            yield chunk({"content": final.text[len(streamed) :]})
        yield chunk({}, finish_reason=str(final.data.get("finish_reason", "stop")))
        if include_usage:
            yield chunk(None, usage_=usage(final.prompt_tokens, final.completion_tokens))
        yield SSE_DONE

    # -- shared ------------------------------------------------------------------------------------------

    def _engine_for(self, model: str) -> tuple[EngineService, str | None]:
        """The engine and LoRA adapter of a model id: the served name, or `name:adapter`."""
        svc = self.service
        if svc is not None:
            if model == svc.model_id:
                return svc, None
            base, _, adapter = model.partition(":")
            if base == svc.model_id and adapter in svc.adapter_names():
                return svc, adapter
        raise model_not_found(model, self.model_ids())

    # -- adapters ------------------------------------------------------------------------------------------

    async def load_adapter(self, request: Request) -> Response:
        """`POST /v1/adapters {"name", "path"}`: load a PEFT LoRA folder from the server's disk while serving."""
        req = await _parse(request, AdapterLoadRequest)
        engine = self._adapter_engine()
        try:
            info = await engine.load_adapter(req.name, req.path)
        except AdapterError as exc:
            conflict = req.name in (self.service.adapter_names() if self.service else [])
            raise APIError(
                409 if conflict else 400, exc.reason, param="name" if conflict else "path"
            ) from None
        model_id = f"{self.service.model_id if self.service else ''}:{info.name}"
        return JSONResponse({"id": model_id, "object": "adapter", **_adapter_json(info)})

    async def unload_adapter(self, request: Request) -> Response:
        """`DELETE /v1/adapters/NAME`: refuse new requests on it now; requests in flight finish first."""
        name = request.path_params["name"]
        engine = self._adapter_engine()
        try:
            gone = await engine.unload_adapter(name)
        except RequestError as exc:
            raise APIError(404, exc.reason, param="name", code="adapter_not_found") from None
        return JSONResponse({"name": name, "object": "adapter", "deleted": True, "draining": not gone})

    def _adapter_engine(self) -> Any:
        engine = self.service.engine if self.service is not None else None
        if engine is None or not hasattr(engine, "load_adapter"):
            raise APIError(404, "this server runs no local engine to load adapters into", code="not_found")
        return engine

    async def _params(self, args: dict[str, Any], logprobs: int | None, grammar: Any) -> Any:
        # deltas on every output, totals on the final one: what streaming, metrics and final bodies need
        params = SamplingParams(**args, logprobs=logprobs, output_kind=OutputKind.DELTA)
        try:
            params.validate()
        except RequestError as exc:
            raise bad_request(exc.reason) from None
        if grammar is not None:
            assert self.service is not None
            params.logits_processor = await self.service.grammar_processor(grammar)
        return params

    async def _start(
        self, request: Request, svc: EngineService, prompt: Any, params: Any, rid: str, arrival: float
    ) -> AsyncGenerator[Any, None] | None:
        """Take a capacity slot and submit; returns the output stream once the engine accepted the request
        (so a bad request is still a 400), or None when the client left first. On success the caller owns
        the slot and must release it when the stream ends."""
        self.capacity.acquire()
        outputs = self._outputs(svc, prompt, params, rid, StreamTimer(self.metrics, svc.model_id, arrival))
        try:
            first = await _until_disconnect(request, _first(outputs))
        except BaseException:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()
            self.capacity.release()
            raise
        if first is None:
            with anyio.CancelScope(shield=True):
                await outputs.aclose()
            self.capacity.release()
            return None
        return _prepend(first[0], outputs)

    async def _outputs(
        self, svc: EngineService, prompt: Any, params: Any, rid: str, timer: StreamTimer
    ) -> AsyncGenerator[Any, None]:
        """Engine outputs with metrics observed; invalid requests become 400s before the first output."""

        timer.submitted()
        last = None
        try:
            async with aclosing(svc.stream(prompt, params, rid)) as stream:
                async for out in stream:
                    timer.tokens(len(out.delta_token_ids))
                    last = out
                    yield out
        except RequestError as exc:
            raise bad_request(exc.reason) from None
        if last is not None and last.finished:
            timer.finished(last.finish_reason or "stop", last.prompt_tokens, last.completion_tokens)


# -- helpers ------------------------------------------------------------------------------------------------


async def _parse(request: Request, model: type[B]) -> B:
    try:
        raw = await request.body()
    except ClientDisconnect:
        raise APIError(400, "client disconnected while sending the body") from None
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise bad_request(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise bad_request("request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        msg = first["msg"].removeprefix("Value error, ")
        raise bad_request(f"{param}: {msg}" if param else msg, param=param) from None


def _text_or_400(m: Any, index: int) -> str:
    try:
        return str(m.text())
    except ValueError as exc:
        raise bad_request(str(exc), param=f"messages[{index}].content") from None


async def _collect(outputs: AsyncGenerator[Any, None]) -> tuple[Any, list[dict[str, Any]]]:
    final = None
    async with aclosing(outputs) as stream:
        async for out in stream:
            final = out
    lps = list(final.logprobs or []) if final is not None else []
    return final, lps


async def _agent_final(chunks: AsyncGenerator[Any, None]) -> Any:
    final = None
    async with aclosing(chunks) as stream:
        async for item in stream:
            if item.kind == "final":
                final = item
    if final is None:
        raise APIError(500, "the agent run ended without an answer", code="agent_failed")
    return final


T = TypeVar("T")


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work` in this task, or cancel it and return None when the client disconnects first.

    The work runs in the calling task (not a child) so an engine stream opened here may be continued or
    closed by this task later; its exceptions come out unwrapped.
    """
    result: list[T] = []
    error: Exception | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            await wait_disconnect(request.receive)
            log.info("client disconnected; request cancelled")
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result.append(await work)
        except Exception as exc:  # re-raised below, outside the task group (no ExceptionGroup wrapping)
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    return result[0] if result else None


async def _guarded(chunks: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
    """A stream that fails after its 200 header ends with an OpenAI error event and `[DONE]` (clients raise
    on it) instead of a cut connection; the cause is logged, not sent."""
    try:
        async with aclosing(chunks) as stream:
            async for chunk in stream:
                yield chunk
    except Exception as exc:
        if isinstance(exc, APIError):
            yield sse(exc.body())
        else:
            log.exception("stream failed")  # the request id is in the log context
            yield sse(internal().body())
        yield SSE_DONE


async def _first(outputs: AsyncGenerator[Any, None]) -> tuple[Any]:
    """The first engine output: an invalid request fails here, before any response header is sent."""
    try:
        return (await outputs.__anext__(),)
    except StopAsyncIteration:
        return (None,)


async def _prepend(first: Any, rest: AsyncGenerator[Any, None]) -> AsyncGenerator[Any, None]:
    async with aclosing(rest) as stream:
        if first is not None:
            yield first
        async for out in stream:
            yield out


def _engine_error_body(final: Any) -> dict[str, Any]:
    return APIError(500, "generation failed in the engine", code="engine_error").body()["error"]


def _raise_engine_failure(final: Any) -> None:
    if final.finish_reason == "error":
        raise APIError(500, "generation failed in the engine", code="engine_error")


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return APIError(404, f"no route {request.method} {request.url.path}", code="not_found").response()
    if exc.status_code == 405:
        return APIError(
            405, f"method {request.method} not allowed on {request.url.path}", code="method_not_allowed"
        ).response()
    return APIError(exc.status_code, str(exc.detail)).response()


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


class _MetricsMiddleware:
    """The outermost layer. Gives the request its id (the client's `X-Request-Id` when plain, else a new one),
    bound to structlog's context for every log line of the request and echoed in the response header; counts
    every request (refused ones included) by route template and status, timed to the last byte; unexpected
    exceptions become OpenAI-shaped 500s here, after logging."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = _route_of(path)
        start = time.perf_counter()
        status = 500
        started = False
        rid = request_id_from(next((v for k, v in scope["headers"] if k == b"x-request-id"), None))
        header = (b"x-request-id", rid.encode())

        async def send_wrapper(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = message["status"]
                started = True
                message = {**message, "headers": [*message.get("headers", ()), header]}
            await send(message)

        gauge = self.metrics.http_in_flight.labels(route)
        gauge.inc()
        bound = structlog.contextvars.bind_contextvars(request_id=rid)
        try:
            await self.app(scope, receive, send_wrapper)
        except Exception:
            log.exception("unhandled error", route=route)
            if not started:
                await internal(rid).response()(scope, receive, send_wrapper)
        finally:
            gauge.dec()
            seconds = time.perf_counter() - start
            if status in (401, 413, 421, 429, 403):
                self.metrics.rejected.labels(str(status)).inc()
            self.metrics.observe_http(route, scope["method"], status, seconds)
            log.info("request", method=scope["method"], path=path, status=status, ms=round(seconds * 1000, 2))
            structlog.contextvars.reset_contextvars(**bound)


def _route_of(path: str) -> str:
    """The metrics label of a request path: a route, a route template, or "other"."""
    if path in ROUTES:
        return path
    for prefix, template in (("/v1/models/", "/v1/models/{id}"), ("/v1/adapters/", "/v1/adapters/{name}")):
        if path.startswith(prefix):
            return template
    return "other"


def _adapter_json(info: Any) -> dict[str, Any]:
    """An `inference.lora.AdapterInfo` as the adapter endpoints answer it."""
    return {
        "name": info.name,
        "path": info.path,
        "format": info.kind,  # "lora" or "xlora" (whose alpha is 0: its experts each have their own)
        "rank": info.rank,
        "alpha": info.alpha,
        "target_modules": list(info.target_modules),
    }


def create_app(
    engine: Any | None,
    *,
    settings: ServerSettings | None = None,
    agents: ServedAgents | None = None,
    metrics: ServerMetrics | None = None,
    model_id: str | None = None,
    starting: bool = False,
) -> OpenAIServer:
    """The server for `engine` (an inference AsyncEngine, or None to serve agents only); `.app` is ASGI. With
    `starting`, it serves /health at once and the rest once `attach` gives it the engine and agents."""
    return OpenAIServer(
        engine, settings=settings, agents=agents, metrics=metrics, model_id=model_id, starting=starting
    )


Handler = Callable[[Request], Awaitable[Response]]


def _chunk_encoder(model: str, rid: str, created: int, include_usage: bool) -> Callable[..., bytes]:
    """One stream's SSE encoder of `chat.completion.chunk` events (same id, model and creation time)."""

    def chunk(delta: dict[str, Any] | None, **kw: Any) -> bytes:
        return sse(
            chat_chunk(
                rid=rid, model=model, created=created, delta=delta, with_usage_field=include_usage, **kw
            )
        )

    return chunk
