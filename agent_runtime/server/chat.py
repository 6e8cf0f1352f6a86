"""Translate OpenAI chat requests into engine inputs (messages, sampling, grammar) and model output back into
OpenAI messages: client-side tools use our JSON action protocol under a grammar, so `tool_calls` always parse."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from agent_runtime.server.errors import APIError, bad_request
from agent_runtime.server.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, call_id
from inference.grammar import GrammarSpec, ToolSchema, json_action_schema, json_schema_spec

MAX_PARALLEL_CALLS = 8

_TOOL_PROMPT = """You can call these functions:
{functions}

Reply with only one JSON object. To call a function: {{"tool": "<function name>", "arguments": {{<arguments>}}}}.
{answer_rule}"""


@dataclass(slots=True)
class ChatPlan:
    """Everything the engine needs for one chat request, decided before any token is generated."""

    messages: list[dict[str, Any]]
    grammar: GrammarSpec | None = None
    tool_mode: bool = False  # output is our JSON action protocol, parsed into tool_calls / content
    tool_names: tuple[str, ...] = ()
    json_mode: bool = False  # output is a JSON document (response_format)
    sampling: dict[str, Any] = field(default_factory=dict)


def sampling_args(req: ChatCompletionRequest | CompletionRequest, max_tokens: int | None) -> dict[str, Any]:
    """SamplingParams keyword arguments for a request (OpenAI defaults: temperature 1, top_p 1)."""
    args: dict[str, Any] = {
        "temperature": 1.0 if req.temperature is None else float(req.temperature),
        "top_p": 1.0 if req.top_p is None else float(req.top_p),
        "stop": req.stop_list(),
        "seed": req.seed,
        "ignore_eos": req.ignore_eos,
    }
    if max_tokens is not None:
        args["max_tokens"] = max_tokens
    for name in ("presence_penalty", "frequency_penalty", "min_p", "repetition_penalty"):
        value = getattr(req, name)
        if value is not None:
            args[name] = float(value)
    if req.top_k is not None:
        args["top_k"] = -1 if req.top_k <= 0 else int(req.top_k)
    if req.logit_bias:
        args["logit_bias"] = {int(k): float(v) for k, v in req.logit_bias.items()}
    return args


def _tool_choice(req: ChatCompletionRequest) -> str:
    choice = req.tool_choice
    if choice is None:
        return "auto" if req.tools else "none"
    if isinstance(choice, str):
        return choice
    names = {t.function.name for t in req.tools or []}
    if choice.function.name not in names:
        raise bad_request(
            f"tool_choice names {choice.function.name!r}, which is not in `tools`", param="tool_choice"
        )
    return choice.function.name


def _args_json(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments  # keep what the client sent; the model sees it verbatim


def _action_text(calls: list[dict[str, Any]]) -> str:
    actions = [{"tool": c["name"], "arguments": _args_json(c["arguments"])} for c in calls]
    return json.dumps(actions[0] if len(actions) == 1 else actions, ensure_ascii=False)


def build_chat(req: ChatCompletionRequest, *, tool_role_ok: bool, is_agent: bool = False) -> ChatPlan:
    """Messages for the chat template plus the grammar that constrains the answer.

    `tool_role_ok` says whether the model's chat template renders `tool` messages; otherwise tool results
    are given back as user turns naming the function.
    """
    choice = _tool_choice(req) if req.tools else "none"
    tool_mode = bool(req.tools) and choice != "none" and not is_agent
    call_names: dict[str, str] = {}
    messages: list[dict[str, Any]] = []
    for i, m in enumerate(req.messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise bad_request(str(exc), param=f"messages[{i}].content") from None
        messages.append(_render(m, text, tool_mode, tool_role_ok, call_names))

    plan = ChatPlan(messages=messages, tool_mode=tool_mode)
    if tool_mode:
        tools = [ToolSchema(t.function.name, t.function.parameters or {}) for t in req.tools or []]
        plan.tool_names = tuple(t.name for t in tools)
        parallel = (
            MAX_PARALLEL_CALLS
            if "parallel_tool_calls" in req.model_fields_set and req.parallel_tool_calls
            else 1
        )
        try:
            schema = json_action_schema(tools, choice, max_parallel=parallel)
        except ValueError as exc:
            raise bad_request(str(exc), param="tool_choice") from None
        plan.grammar = json_schema_spec(schema)
        _add_system(messages, _tool_prompt(req, choice))
    elif req.response_format is not None and req.response_format.type != "text":
        rf = req.response_format
        schema = {"type": "object"} if rf.type == "json_object" else dict(rf.json_schema.schema_ or {})  # type: ignore[union-attr]  # set for json_schema (validated)
        plan.grammar = json_schema_spec(schema)
        plan.json_mode = True
    return plan


def _render(
    m: ChatMessage, text: str, tool_mode: bool, tool_role_ok: bool, call_names: dict[str, str]
) -> dict[str, Any]:
    if m.role == "developer":
        return {"role": "system", "content": text}
    if m.role == "assistant":
        calls = [
            {"id": c.id or call_id(), "name": c.function.name, "arguments": c.function.arguments}
            for c in m.tool_calls or []
        ]
        for c in calls:
            call_names[c["id"]] = c["name"]
        if calls:
            return {"role": "assistant", "content": _action_text(calls)}
        if tool_mode:
            return {"role": "assistant", "content": json.dumps({"answer": text}, ensure_ascii=False)}
        return {"role": "assistant", "content": text}
    if m.role == "tool":
        # OpenAI requires tool_call_id; local servers commonly accept results without one, and so do we.
        name = m.name or call_names.get(m.tool_call_id or "", "the function")
        if tool_role_ok:
            return {"role": "tool", "content": text}
        return {"role": "user", "content": f"Result of {name}: {text}"}
    return {"role": m.role, "content": text}


def _tool_prompt(req: ChatCompletionRequest, choice: str) -> str:
    lines = []
    for t in req.tools or []:
        fn = t.function
        params = json.dumps(fn.parameters or {"type": "object", "properties": {}}, separators=(",", ":"))
        lines.append(f"- {fn.name}: {fn.description or 'no description'} Parameters: {params}")
    if choice == "required":
        rule = "You must call a function."
    elif choice not in ("auto", "none"):
        rule = f"You must call {choice}."
    else:
        rule = 'To answer the user directly instead: {"answer": "<text>"}.'
    return _TOOL_PROMPT.format(functions="\n".join(lines), answer_rule=rule)


def _add_system(messages: list[dict[str, Any]], text: str) -> None:
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": f"{messages[0]['content']}\n\n{text}".strip()}
    else:
        messages.insert(0, {"role": "system", "content": text})


def parse_actions(text: str, finish_reason: str) -> tuple[str | None, list[dict[str, Any]] | None, str]:
    """(content, tool_calls, finish_reason) from a tool-mode answer. The grammar makes the JSON valid; only
    a generation cut short (length, abort) can leave it unparsable, and then the raw text is returned."""
    try:
        action = json.loads(text)
    except json.JSONDecodeError:
        return text, None, finish_reason if finish_reason != "stop" else "length"
    actions = action if isinstance(action, list) else [action]
    calls = [
        {
            "id": call_id(),
            "name": a["tool"],
            "arguments": json.dumps(a.get("arguments", {}), ensure_ascii=False),
        }
        for a in actions
        if isinstance(a, dict) and "tool" in a
    ]
    if calls:
        return None, calls, "tool_calls"
    if isinstance(action, dict) and isinstance(action.get("answer"), str):
        return action["answer"], None, finish_reason
    raise APIError(500, "the model's answer did not follow the tool protocol", code="bad_model_output")


def token_text(tokenizer: Any, token_id: int) -> str:
    return str(tokenizer.decode([token_id], skip_special_tokens=False))


def chat_logprobs(tokenizer: Any, entries: list[dict[str, Any]], top_n: int) -> list[dict[str, Any]]:
    """OpenAI chat `logprobs.content` items from the engine's `{token_id, logprob, top}` entries."""
    out = []
    for e in entries:
        tok = token_text(tokenizer, e["token_id"])
        top = [
            {"token": (t := token_text(tokenizer, tid)), "logprob": lp, "bytes": list(t.encode())}
            for tid, lp in (e.get("top") or [])[:top_n]
        ]
        out.append({"token": tok, "logprob": e["logprob"], "bytes": list(tok.encode()), "top_logprobs": top})
    return out


def completion_logprobs(tokenizer: Any, entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    """OpenAI legacy completions `logprobs` (tokens, token_logprobs, top_logprobs, text_offset)."""
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for e in entries:
        tok = token_text(tokenizer, e["token_id"])
        tokens.append(tok)
        lps.append(e["logprob"])
        tops.append({token_text(tokenizer, tid): lp for tid, lp in (e.get("top") or [])})
        offsets.append(pos)
        pos += len(tok)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}
