"""The remote LLM backend: chat completions from any OpenAI-compatible server (vLLM, SGLang, llama.cpp, Ollama,
mistral.rs, another agent-runtime) with streaming, tool calls, timeouts and retries with backoff on 429/5xx."""

from __future__ import annotations

import json
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import httpx
import structlog
from pydantic import BaseModel, ConfigDict, Field, HttpUrl, ValidationError

from agent_runtime.agents.llm import BackendStats, GenerationChunk, GenerationRequest
from agent_runtime.config import section_error
from agent_runtime.errors import AgentRuntimeError, ConfigError
from inference.formats import ToolCall

log = structlog.get_logger(__name__)

RETRY_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class OpenAIBackendSettings(BaseModel):
    """`model: {backend: "openai", base_url, api_key, model, ...}` in the config file."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["openai"] = "openai"
    base_url: HttpUrl  # up to and including /v1, e.g. http://127.0.0.1:8000/v1
    model: str = Field(min_length=1)
    api_key: str | None = None
    timeout: float = Field(default=120.0, gt=0)  # seconds without a byte from the server (read timeout)
    connect_timeout: float = Field(default=10.0, gt=0)
    max_retries: int = Field(default=3, ge=0, le=10)
    backoff_initial: float = Field(default=0.5, ge=0)
    backoff_max: float = Field(default=8.0, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)

    @classmethod
    def from_section(
        cls, section: Mapping[str, Any], config: Any = None, json_path: str = "model"
    ) -> OpenAIBackendSettings:
        """Validate a raw config section; errors point into the config file when `config` is given."""
        try:
            return cls.model_validate(dict(section))
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            reason = f"{where}: {first['msg']}" if where else first["msg"]
            hint = 'e.g. {"backend": "openai", "base_url": "http://127.0.0.1:8000/v1", "model": "NAME"}'
            if config is not None:
                raise section_error(
                    config, f"{json_path}.{where}" if where else json_path, reason, hint
                ) from None
            raise ConfigError(reason, hint) from None


class RemoteLLMError(AgentRuntimeError):
    """The remote model server refused or failed a request (after retries where they were safe)."""

    def __init__(self, reason: str, hint: str | None = None, *, status: int | None = None) -> None:
        super().__init__(reason, hint)
        self.status = status


def _tool_call(call_id: str, name: str, arguments: str) -> ToolCall:
    """A tool call from the wire, its JSON-text arguments parsed (a remote model's bad JSON is its error)."""
    try:
        parsed = json.loads(arguments or "{}")
    except json.JSONDecodeError as exc:
        raise RemoteLLMError(f"tool call {name!r} has arguments that are not JSON: {exc.msg}") from None
    if not isinstance(parsed, dict):
        raise RemoteLLMError(f"tool call {name!r} has arguments that are not a JSON object")
    return ToolCall(call_id, name, parsed)


@dataclass(slots=True)
class ChatDelta:
    """One streamed piece: text and/or tool calls completed so far (sent once, on the final delta)."""

    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class ChatResult:
    text: str
    finish_reason: str
    tool_calls: list[ToolCall]
    prompt_tokens: int
    completion_tokens: int
    ttft: float | None = None  # seconds to the first streamed byte of output (streaming only)


class OpenAIBackend:
    """A client of one remote model. Safe to share between agents; `aclose()` (or `async with`) at the end."""

    def __init__(
        self, settings: OpenAIBackendSettings, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.settings = settings
        headers = {"Accept": "application/json", **settings.headers}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        self._client = httpx.AsyncClient(
            base_url=str(settings.base_url).rstrip("/") + "/",
            headers=headers,
            timeout=httpx.Timeout(settings.timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            transport=transport,
        )
        self._rng = random.Random()

    @property
    def model(self) -> str:
        return self.settings.model

    async def __aenter__(self) -> OpenAIBackend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True):
            await self._client.aclose()

    # -- requests -------------------------------------------------------------------------------------------

    def body(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: str | Mapping[str, Any] | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        response_format: Mapping[str, Any] | None = None,
        stream: bool = False,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The chat completions request body (OpenAI field names; None fields are left out)."""
        body: dict[str, Any] = {"model": self.settings.model, "messages": [dict(m) for m in messages]}
        optional = {
            "tools": [dict(t) for t in tools] if tools else None,
            "tool_choice": tool_choice if tools else None,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "stop": list(stop) if stop else None,
            "seed": seed,
            "response_format": dict(response_format) if response_format else None,
        }
        body.update({k: v for k, v in optional.items() if v is not None})
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if extra:
            body.update(extra)
        return body

    async def chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> ChatResult:
        """One chat completion (not streamed)."""
        body = self.body(messages, **kwargs)
        data = await self._post_json("chat/completions", body)
        try:
            choice = data["choices"][0]
            message = choice.get("message") or {}
            calls = [
                _tool_call(
                    c.get("id") or f"call_{i}", c["function"]["name"], c["function"].get("arguments") or "{}"
                )
                for i, c in enumerate(message.get("tool_calls") or [])
            ]
            usage = data.get("usage") or {}
            return ChatResult(
                text=message.get("content") or "",
                finish_reason=choice.get("finish_reason") or "stop",
                tool_calls=calls,
                prompt_tokens=int(usage.get("prompt_tokens") or 0),
                completion_tokens=int(usage.get("completion_tokens") or 0),
            )
        except (KeyError, IndexError, TypeError) as exc:
            raise RemoteLLMError(f"malformed chat completion from {self._where()}: missing {exc}") from None

    async def stream_chat(
        self, messages: Sequence[Mapping[str, Any]], **kwargs: Any
    ) -> AsyncIterator[ChatDelta]:
        """Stream a chat completion. Text arrives as it is generated; tool calls (assembled from their
        fragments) and usage come with the final delta, which carries `finish_reason`."""
        body = self.body(messages, stream=True, **kwargs)
        calls: dict[int, dict[str, str]] = {}
        finish: str | None = None
        prompt_tokens = completion_tokens = 0
        async for event in self._sse("chat/completions", body):
            usage = event.get("usage")
            if usage:
                prompt_tokens = int(usage.get("prompt_tokens") or 0)
                completion_tokens = int(usage.get("completion_tokens") or 0)
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                for frag in delta.get("tool_calls") or []:
                    slot = calls.setdefault(
                        int(frag.get("index", len(calls))), {"id": "", "name": "", "arguments": ""}
                    )
                    fn = frag.get("function") or {}
                    slot["id"] = frag.get("id") or slot["id"]
                    slot["name"] += fn.get("name") or ""
                    slot["arguments"] += fn.get("arguments") or ""
                if choice.get("finish_reason"):
                    finish = choice["finish_reason"]
                text = delta.get("content") or ""
                if text:
                    yield ChatDelta(text=text)
        yield ChatDelta(
            finish_reason=finish or "stop",
            tool_calls=[
                _tool_call(c["id"] or f"call_{i}", c["name"], c["arguments"] or "{}")
                for i, c in sorted(calls.items())
            ],
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
        )

    async def collect(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> ChatResult:
        """Stream a chat completion and assemble the result (TTFT measured)."""
        start = time.perf_counter()
        ttft = None
        parts: list[str] = []
        last = ChatDelta()
        async for delta in self.stream_chat(messages, **kwargs):
            if delta.text:
                if ttft is None:
                    ttft = time.perf_counter() - start
                parts.append(delta.text)
            last = delta
        return ChatResult(
            "".join(parts),
            last.finish_reason or "stop",
            last.tool_calls,
            last.prompt_tokens,
            last.completion_tokens,
            ttft,
        )

    async def models(self) -> list[str]:
        data = await self._get_json("models")
        return [str(m.get("id")) for m in data.get("data") or []]

    # -- transport with retries -----------------------------------------------------------------------------

    def _where(self) -> str:
        return str(self.settings.base_url)

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        if retry_after:
            try:
                return min(float(retry_after), max(self.settings.backoff_max, 1.0) * 4)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        base = min(self.settings.backoff_max, self.settings.backoff_initial * (2**attempt))
        return base * (0.8 + 0.4 * self._rng.random())

    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None, *, stream: bool
    ) -> httpx.Response:
        """Send with retries on connection errors, timeouts before a response, 429 and 5xx. Streams are
        only retried before the response starts, so no output is ever produced twice."""
        attempt = 0
        while True:
            retry_after = None
            try:
                request = self._client.build_request(method, path, json=body)
                response = await self._client.send(request, stream=stream)
            except (
                httpx.ConnectError,
                httpx.ConnectTimeout,
                httpx.ReadTimeout,
                httpx.RemoteProtocolError,
            ) as exc:
                problem, status = f"{type(exc).__name__}: {exc}".rstrip(": "), None
            else:
                if response.status_code < 400:
                    return response
                await response.aread()
                status = response.status_code
                problem = _error_message(response)
                retry_after = response.headers.get("retry-after")
                await response.aclose()
                if status not in RETRY_STATUSES:
                    raise RemoteLLMError(
                        f"{self._where()} answered {status}: {problem}", _hint_for(status), status=status
                    )
            if attempt >= self.settings.max_retries:
                raise RemoteLLMError(
                    f"{self._where()} failed after {attempt + 1} attempts: {problem}",
                    "check that the model server is running and not overloaded",
                    status=status,
                )
            delay = self._delay(attempt, retry_after)
            log.info("retrying remote LLM request", status=status, attempt=attempt + 1, delay=round(delay, 2))
            await anyio.sleep(delay)
            attempt += 1

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._send("POST", path, body, stream=False)
        return _json_of(response, self._where())

    async def _get_json(self, path: str) -> dict[str, Any]:
        response = await self._send("GET", path, None, stream=False)
        return _json_of(response, self._where())

    async def _sse(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        response = await self._send("POST", path, body, stream=True)
        try:
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # comments, event names and blank separators
                payload = line[5:].strip()
                if payload == "[DONE]":
                    return
                try:
                    event = json.loads(payload)
                except json.JSONDecodeError:
                    raise RemoteLLMError(
                        f"malformed stream event from {self._where()}: {payload[:200]}"
                    ) from None
                if isinstance(event, dict) and "error" in event:
                    err = event["error"]
                    msg = err.get("message") if isinstance(err, dict) else str(err)
                    raise RemoteLLMError(f"{self._where()} failed mid-stream: {msg}")
                yield event
        except httpx.ReadTimeout:
            raise RemoteLLMError(
                f"{self._where()} sent nothing for {self.settings.timeout:g} s mid-stream",
                "raise model.timeout, or check the server",
            ) from None
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
            raise RemoteLLMError(f"{self._where()} dropped the stream: {exc}") from None
        finally:
            with anyio.CancelScope(shield=True):
                await response.aclose()


def _json_of(response: httpx.Response, where: str) -> dict[str, Any]:
    try:
        data = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RemoteLLMError(f"{where} answered with something other than JSON") from None
    if not isinstance(data, dict):
        raise RemoteLLMError(f"{where} answered with a JSON {type(data).__name__}, not an object")
    return data


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        err = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(err, dict):
            return str(err.get("message") or err)[:500]
        return str(err)[:500]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return response.text[:500] or response.reason_phrase


def _hint_for(status: int) -> str:
    return {
        400: "the server rejected the request: check model.model and the sampling settings",
        401: "set model.api_key (e.g. ${OPENAI_API_KEY})",
        403: "the API key lacks access to this model",
        404: "check model.base_url (it ends in /v1) and model.model",
        413: "the conversation is too large for the server",
    }.get(status, "see the server's log")


# -- the agent loop's backend (agent_runtime.agents.llm.LLMBackend) on a remote server ---------------------------------

_CHARS_PER_TOKEN = (
    4  # pseudo-tokens for budgets when the remote tokenizer is not at hand (BPE averages ~4 chars)
)


class OpenAIChatBackend:
    """`LLMBackend` for the agent loop on a remote OpenAI-compatible server.

    The loop's JSON action protocol goes over plain chat messages; its grammar (a JSON schema) is sent as
    `response_format: json_schema`, which vLLM, SGLang, llama.cpp and agent-runtime enforce by constrained
    decoding (set `grammar=False` for servers that do not). Token counts for observation budgets use
    reversible pseudo-tokens of four characters, as the remote tokenizer is not available here.
    """

    name = "openai"

    def __init__(
        self,
        settings: OpenAIBackendSettings,
        *,
        grammar: bool = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.client = OpenAIBackend(settings, transport=transport)
        self.stats = BackendStats()
        self._grammar = grammar

    def tool_format(self) -> str:
        return "json"

    @property
    def supports_grammar(self) -> bool:
        return self._grammar

    @property
    def supports_prefix(self) -> bool:
        return False  # chat completions cannot continue a partial assistant turn on every server

    async def score(self, request: GenerationRequest, continuations: list[str]) -> list[float]:
        raise RemoteLLMError(
            "a remote model cannot score continuations", "the loop only asks supports_prefix backends"
        )

    def encode(self, text: str) -> list[int]:
        """Four characters per id, packed so `decode` restores the exact text."""
        out = []
        for i in range(0, len(text), _CHARS_PER_TOKEN):
            packed = 0
            for ch in text[i : i + _CHARS_PER_TOKEN]:
                packed = (packed << 21) | ord(ch)
            out.append((packed << 3) | len(text[i : i + _CHARS_PER_TOKEN]))
        return out

    def decode(self, ids: list[int]) -> str:
        parts = []
        for token in ids:
            n, packed = token & 0b111, token >> 3
            chars = [chr((packed >> (21 * k)) & 0x1FFFFF) for k in range(n)]
            parts.append("".join(reversed(chars)))
        return "".join(parts)

    @staticmethod
    def _wire_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Chat messages as OpenAI servers accept them: tool results carry a `tool_call_id`."""
        out: list[dict[str, Any]] = []
        for i, m in enumerate(messages):
            msg: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
            if m["role"] == "tool":
                msg["tool_call_id"] = str(m.get("tool_call_id") or f"call_{i}")
            out.append(msg)
        return out

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        response_format = None
        if request.grammar is not None and self._grammar and request.grammar.kind == "json_schema":
            schema = json.loads(request.grammar.payload)
            response_format = {"type": "json_schema", "json_schema": {"name": "action", "schema": schema}}
            self.stats.constrained_requests += 1
        self.stats.requests += 1
        text = ""
        async for delta in self.client.stream_chat(
            self._wire_messages(request.messages),
            max_tokens=request.max_tokens,
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            response_format=response_format,
            # an agent's LoRA adapter on a remote server of ours (or vLLM-style): the `model:adapter` model id
            extra={"model": f"{self.settings.model}:{request.adapter}"} if request.adapter else None,
        ):
            if delta.finish_reason is None:
                text += delta.text
                yield GenerationChunk(delta.text, text, False)
            else:
                text += delta.text
                yield GenerationChunk(
                    delta.text, text, True, delta.finish_reason, delta.prompt_tokens, delta.completion_tokens
                )

    async def aclose(self) -> None:
        await self.client.aclose()
