"""OpenAI request bodies (pydantic, validated at the edge) and the JSON shapes of responses and stream chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# -- requests ---------------------------------------------------------------------------------------------


class _Body(BaseModel):
    # Clients send fields we do not model (user, metadata, store, ...): accept and ignore them, as vLLM does.
    model_config = ConfigDict(extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ContentPart(_Body):
    """Any content part; only text parts can be served by a text model (others are refused with 400)."""

    type: str
    text: str | None = None


class FunctionCall(_Body):
    name: str
    arguments: str = "{}"


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported by a text model")
            out.append(part.text)
        return "".join(out)


class FunctionDef(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(_Body):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoiceFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class JsonSchemaFormat(_Body):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_present(self) -> ResponseFormat:
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format json_schema needs json_schema.schema")
        return self


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    model: Annotated[str, Field(min_length=1)]
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    # token id (a string, as JSON keys are) -> bias added to its logit; the engine checks the ids
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # Extensions most local servers accept (vLLM, llama.cpp, mistral.rs).
    top_k: int | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0)] | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _only_one(cls, v: int) -> int:
        if v != 1:
            raise ValueError("only n=1 is supported")
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _bias_ids(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is not None:
            bad = [k for k in v if not k.isdecimal()]
            if bad:
                raise ValueError(f"logit_bias keys must be token ids, got {bad[0][:20]!r}")
        return v

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: Annotated[int, Field(ge=1)] = 16
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v: str | list[str] | list[int]) -> str | list[str] | list[int]:
        if isinstance(v, list) and v and isinstance(v[0], str):
            if len(v) != 1:
                raise ValueError("only one prompt per request is supported")
        if not v:
            raise ValueError("prompt must not be empty")
        return v

    def prompt_value(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            return str(p[0])
        return p  # type: ignore[return-value]  # not list[str]: _one_prompt keeps it non-empty, handled above


# -- responses ---------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class AdapterLoadRequest(BaseModel):
    """`POST /v1/adapters`: a PEFT LoRA folder on the server's disk, served as `model:name`."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    path: str = Field(min_length=1)


def model_card(model_id: str, *, owned_by: str, created: int, kind: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": model_id,
        "object": "model",
        "created": created,
        "owned_by": owned_by,
        "kind": kind,
        **extra,
    }


def tool_call_json(call: dict[str, Any], index: int | None = None) -> dict[str, Any]:
    """An OpenAI tool call from `{"id", "name", "arguments"}` (arguments already a JSON string)."""
    out: dict[str, Any] = {
        "id": call["id"],
        "type": "function",
        "function": {"name": call["name"], "arguments": call["arguments"]},
    }
    if index is not None:
        out["index"] = index
    return out


def chat_response(
    *,
    rid: str,
    model: str,
    created: int,
    content: str | None,
    tool_calls: list[dict[str, Any]] | None,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [tool_call_json(c) for c in tool_calls]
    choice: dict[str, Any] = {
        "index": 0,
        "message": message,
        "finish_reason": finish_reason,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
    }
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def chat_chunk(
    *,
    rid: str,
    model: str,
    created: int,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    logprobs: list[dict[str, Any]] | None = None,
    usage_: dict[str, int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    """One `chat.completion.chunk`; `delta=None` makes the usage-only final chunk (empty choices)."""
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if delta is None
        else [
            {
                "index": 0,
                "delta": delta,
                "finish_reason": finish_reason,
                "logprobs": {"content": logprobs} if logprobs is not None else None,
            }
        ],
    }
    if with_usage_field:
        chunk["usage"] = usage_
    return chunk


def completion_response(
    *,
    rid: str,
    model: str,
    created: int,
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    logprobs: dict[str, Any] | None,
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
        "usage": usage(prompt_tokens, completion_tokens),
        "system_fingerprint": None,
    }


def completion_chunk(
    *,
    rid: str,
    model: str,
    created: int,
    text: str | None,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    usage_: dict[str, int] | None = None,
    with_usage_field: bool = False,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": None,
        "choices": []
        if text is None
        else [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}],
    }
    if with_usage_field:
        chunk["usage"] = usage_
    return chunk


class ContentChunks:
    """Pre-serialised frames for the hot path: a streamed text delta costs one `json.dumps` of the text,
    not of the whole chunk. Byte-for-byte the JSON `chat_chunk`/`completion_chunk` would produce."""

    __slots__ = ("_post", "_pre")

    def __init__(self, *, rid: str, model: str, created: int, kind: str, with_usage_field: bool) -> None:
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = json.dumps(
            {"id": rid, "object": obj, "created": created, "model": model, "system_fingerprint": None},
            separators=(",", ":"),
            ensure_ascii=False,
        )[:-1]
        usage_field = ',"usage":null' if with_usage_field else ""
        if kind == "chat":
            self._pre = f'data: {head},"choices":[{{"index":0,"delta":{{"content":'.encode()
            self._post = f'}},"finish_reason":null,"logprobs":null}}]{usage_field}}}\n\n'.encode()
        else:
            self._pre = f'data: {head},"choices":[{{"index":0,"text":'.encode()
            self._post = f',"finish_reason":null,"logprobs":null}}]{usage_field}}}\n\n'.encode()

    def text(self, text: str) -> bytes:
        return self._pre + json.dumps(text, ensure_ascii=False).encode() + self._post


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event; `data` objects are compact JSON (one line, as the SSE framing requires)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"
