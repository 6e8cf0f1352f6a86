"""How tools are shown to a model and how its replies become actions: our JSON protocol (with worked
examples as chat turns) and the chat-template formats Hermes/Qwen `<tool_call>`, Llama 3 JSON, Mistral `[TOOL_CALLS]`.

Parsing is tolerant of the model (code fences, key aliases, prose around JSON) and strict for the runtime
(anything that is not a well-formed call or answer comes back as an error the loop shows the model).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from inference.grammar import (
    GrammarSpec,
    ToolSchema,
    json_action_schema,
    json_schema_spec,
    structural_tag_spec,
)


@dataclass(frozen=True, slots=True)
class ToolSpec:
    """A tool as an agent offers it to the model."""

    name: str  # namespaced
    description: str
    parameters: Mapping[str, Any]
    server: str | None = None  # None for local (Python) tools
    read_only: bool | None = None  # the server's readOnlyHint (None: not stated)

    def schema(self) -> ToolSchema:
        return ToolSchema(self.name, self.parameters)

    def openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, Any]


@dataclass(slots=True)
class ParsedAction:
    """One model turn read as an action: tool calls, or a final answer, or an error saying what was wrong."""

    calls: list[ToolCall] = field(default_factory=list)
    answer: str | None = None
    thought: str | None = None
    error: str | None = None


# Neutral transcript messages: {"role": "system"|"user", "content"}, {"role": "assistant", "content",
# "tool_calls": [ToolCall] | absent}, {"role": "tool", "tool_call_id", "name", "content"}.
Message = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ExampleCall:
    tool: str
    arguments: Mapping[str, Any]
    result: str


@dataclass(frozen=True, slots=True)
class WorkedExample:
    """One few-shot example shown to the model as real chat turns: task, tool call(s), result(s), answer."""

    task: str
    calls: tuple[ExampleCall, ...]
    answer: str


DEFAULT_EXAMPLES: tuple[WorkedExample, ...] = (
    WorkedExample(
        "How many yen is one euro?",
        (
            ExampleCall(
                "fx__get_rate",
                {"from_currency": "EUR", "to_currency": "JPY"},
                '{"from": "EUR", "to": "JPY", "rate": 162.4}',
            ),
        ),
        "One euro is 162.4 yen.",
    ),
    WorkedExample(
        "What is the weather in Rome?",
        (
            ExampleCall(
                "weather__get_weather",
                {"location": "Rome, Italy"},
                '{"location": "Rome, Italy", "temperature_c": 18, "conditions": "cloudy"}',
            ),
        ),
        "It is 18°C and cloudy in Rome.",
    ),
)


class ToolFormat(Protocol):
    name: str

    def messages(
        self,
        system_prompt: str,
        tools: Sequence[ToolSpec],
        examples: Sequence[WorkedExample],
        history: Sequence[Message],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]: ...

    def grammar(
        self, tools: Sequence[ToolSpec], tool_choice: str, *, thoughts: bool, max_parallel: int
    ) -> GrammarSpec | None: ...

    def parse(self, text: str) -> ParsedAction: ...


# -- tolerant JSON extraction ------------------------------------------------------------------------------

_FENCE = re.compile(r"```(?:json|JSON)?\s*(.*?)```", re.S)
_CALL_NAME_KEYS = ("tool", "name", "tool_name", "function")
_CALL_ARGS_KEYS = ("arguments", "args", "parameters", "input")
_ANSWER_KEYS = ("answer", "final_answer", "response", "final")


def _json_values(text: str) -> list[Any]:
    """Every top-level JSON value embedded in `text`, in order (fenced blocks first when present)."""
    fenced = _FENCE.findall(text)
    sources = fenced or [text]
    decoder = json.JSONDecoder()
    out: list[Any] = []
    for src in sources:
        i = 0
        while i < len(src):
            j = min((k for k in (src.find("{", i), src.find("[", i)) if k >= 0), default=-1)
            if j < 0:
                break
            try:
                value, end = decoder.raw_decode(src, j)
            except json.JSONDecodeError:
                i = j + 1
                continue
            out.append(value)
            i = end
    return out


def _call_from(obj: Mapping[str, Any]) -> tuple[str, Any] | None:
    fn = obj.get("function")
    if isinstance(fn, Mapping):  # OpenAI shape {"function": {"name", "arguments"}}
        obj = fn
    name = next((obj[k] for k in _CALL_NAME_KEYS if isinstance(obj.get(k), str)), None)
    if name is None:
        return None
    args: Any = next((obj[k] for k in _CALL_ARGS_KEYS if k in obj), {})
    if isinstance(args, str):  # some models JSON-encode the arguments a second time
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    return name, args


def _calls_from(values: Sequence[Any]) -> tuple[list[ToolCall], str | None]:
    calls: list[ToolCall] = []
    for value in values:
        items = value if isinstance(value, list) else [value]
        for item in items:
            if not isinstance(item, Mapping):
                return calls, "a tool call must be a JSON object"
            found = _call_from(item)
            if found is None:
                continue
            name, args = found
            if not isinstance(args, Mapping):
                return calls, f"the arguments of {name!r} must be a JSON object"
            calls.append(ToolCall("", name, dict(args)))
    return calls, None


def parse_json_protocol(text: str) -> ParsedAction:
    """Our protocol: `{"tool": ..., "arguments": {...}}`, a list of those, or `{"answer": "..."}`."""
    stripped = text.strip()
    if not stripped:
        return ParsedAction(error="the reply was empty")
    values = _json_values(stripped)
    thought = None
    for value in values:
        if isinstance(value, Mapping):
            if isinstance(value.get("thought"), str):
                thought = value["thought"]
            for key in _ANSWER_KEYS:
                if key in value and not any(k in value for k in _CALL_NAME_KEYS):
                    answer = value[key]
                    if not isinstance(answer, str):
                        answer = json.dumps(answer, ensure_ascii=False)
                    return ParsedAction(answer=answer, thought=thought)
    calls, error = _calls_from(values)
    if error is not None:
        return ParsedAction(error=error, thought=thought)
    if calls:
        return ParsedAction(calls=calls, thought=thought)
    if values or stripped[0] in "{[":
        return ParsedAction(
            error='expected {"tool": "<name>", "arguments": {...}} or {"answer": "..."}', thought=thought
        )
    # Prose with no JSON at all: a model that ignores the protocol is answering.
    return ParsedAction(answer=stripped)


# -- our JSON protocol ----------------------------------------------------------------------------------------


def _describe_param(name: str, schema: Mapping[str, Any], required: bool) -> str:
    desc = str(schema.get("description", "")).strip()
    kind = schema.get("type")
    bits: list[str] = []
    if isinstance(kind, str) and kind != "string":
        bits.append(kind)
    if "enum" in schema:
        bits.append("one of " + ", ".join(json.dumps(v) for v in schema["enum"]))
    if "minimum" in schema or "maximum" in schema:
        bits.append(f"from {schema.get('minimum', '-inf')} to {schema.get('maximum', 'inf')}")
    if not required:
        bits.append("optional")
    text = desc or name
    if bits:
        text = f"{text} ({', '.join(bits)})"
    return f"{json.dumps(name)}: {json.dumps(text, ensure_ascii=False)}"


def describe_tool(tool: ToolSpec) -> str:
    props = tool.parameters.get("properties") or {}
    required = set(tool.parameters.get("required") or ())
    args = ", ".join(
        _describe_param(n, s if isinstance(s, Mapping) else {}, n in required) for n, s in props.items()
    )
    desc = tool.description.strip().splitlines()[0] if tool.description.strip() else tool.name
    return f"- {tool.name}: {desc}. Arguments: {{{args}}}"


PROTOCOL = (
    'To call a tool, reply with only a JSON object: {"tool": "<tool name>", "arguments": {<arguments>}}\n'
    'When you have the answer, reply with only: {"answer": "<your answer>"}'
)
PROTOCOL_PARALLEL = "To call several tools at once, reply with a JSON list of tool calls."
PROTOCOL_THOUGHT = 'You may start any reply object with a short "thought" field.'


def _call_json(call: ToolCall | Mapping[str, Any]) -> str:
    if isinstance(call, ToolCall):
        name, args = call.name, call.arguments
    else:
        name, args = call["tool"], call.get("arguments", {})
    return json.dumps({"tool": name, "arguments": args}, ensure_ascii=False)


class JsonProtocol:
    """Tools and the protocol in the system prompt, worked examples as real turns, results as `tool` turns."""

    name = "json"

    def system_text(
        self,
        system_prompt: str,
        tools: Sequence[ToolSpec],
        examples: Sequence[WorkedExample],
        parallel: bool = True,
        *,
        listed_with_task: bool = False,
    ) -> str:
        """The system turn: the prompt, the tools (unless `listed_with_task`: then they come with the task, and
        the system turn is the same for every task, so the prefix cache serves it across runs) and the
        protocol."""
        parts = [system_prompt.strip()]
        if tools and not listed_with_task:
            parts.append("Tools:\n" + "\n".join(describe_tool(t) for t in tools))
        if tools:
            parts.append(PROTOCOL + ("\n" + PROTOCOL_PARALLEL if parallel and len(tools) > 1 else ""))
        else:
            parts.append('Reply with only: {"answer": "<your answer>"}')
        offered = {t.name for t in tools}
        others = sorted({c.tool for ex in examples for c in ex.calls if c.tool not in offered})
        if others and listed_with_task:
            parts.append("The examples that follow use their own tools; a task lists the tools it may use.")
        elif others:
            parts.append(
                f"The examples that follow use other tools ({', '.join(others)}); now only the tools listed above are available."
            )
        return "\n\n".join(parts)

    @staticmethod
    def task_with_tools(task: str, tools: Sequence[ToolSpec]) -> str:
        return "Tools:\n" + "\n".join(describe_tool(t) for t in tools) + f"\n\nTask: {task}"

    def messages(
        self,
        system_prompt: str,
        tools: Sequence[ToolSpec],
        examples: Sequence[WorkedExample],
        history: Sequence[Message],
        *,
        task_index: int | None = None,
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        """The template's messages; with `task_index` (the run's task in `history`) the tools are listed in
        that user turn instead of the system turn."""
        listed_with_task = task_index is not None and bool(tools)
        out: list[dict[str, Any]] = [
            {
                "role": "system",
                "content": self.system_text(
                    system_prompt, tools, examples, listed_with_task=listed_with_task
                ),
            }
        ]
        for ex in examples:
            out.append({"role": "user", "content": ex.task})
            for call in ex.calls:
                out.append(
                    {
                        "role": "assistant",
                        "content": _call_json({"tool": call.tool, "arguments": call.arguments}),
                    }
                )
                out.append({"role": "tool", "content": call.result})
            out.append(
                {"role": "assistant", "content": json.dumps({"answer": ex.answer}, ensure_ascii=False)}
            )
        for i, msg in enumerate(history):
            role = msg["role"]
            if role == "assistant":
                calls = msg.get("tool_calls") or []
                if calls:
                    text = (
                        _call_json(calls[0])
                        if len(calls) == 1
                        else "[" + ", ".join(_call_json(c) for c in calls) + "]"
                    )
                else:
                    text = json.dumps({"answer": msg.get("content", "")}, ensure_ascii=False)
                out.append({"role": "assistant", "content": text})
            elif role == "tool":
                out.append({"role": "tool", "content": msg["content"]})
            elif role == "system":
                continue  # the system turn is ours
            elif listed_with_task and i == task_index:
                out.append({"role": role, "content": self.task_with_tools(str(msg["content"]), tools)})
            else:
                out.append({"role": role, "content": msg["content"]})
        return out, None

    def grammar(
        self, tools: Sequence[ToolSpec], tool_choice: str, *, thoughts: bool, max_parallel: int
    ) -> GrammarSpec | None:
        schema = json_action_schema(
            [t.schema() for t in tools], tool_choice, thought=thoughts, max_parallel=max_parallel
        )
        return json_schema_spec(schema)

    def parse(self, text: str) -> ParsedAction:
        return parse_json_protocol(text)


# -- chat-template formats --------------------------------------------------------------------------------------


class _TemplateFormat:
    """Tools rendered by the model's own chat template (`tools=`); tool calls as the template's own turns."""

    name = "template"
    xgrammar_model: str | None = None

    def messages(
        self,
        system_prompt: str,
        tools: Sequence[ToolSpec],
        examples: Sequence[WorkedExample],
        history: Sequence[Message],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
        out: list[dict[str, Any]] = [{"role": "system", "content": system_prompt.strip()}]
        n = 0
        for ex in examples:
            out.append({"role": "user", "content": ex.task})
            for call in ex.calls:
                n += 1
                cid = f"ex{n:07d}"[:9]
                out.append(self._assistant_calls([ToolCall(cid, call.tool, dict(call.arguments))]))
                out.append({"role": "tool", "tool_call_id": cid, "name": call.tool, "content": call.result})
            out.append({"role": "assistant", "content": ex.answer})
        for msg in history:
            role = msg["role"]
            if role == "assistant" and msg.get("tool_calls"):
                out.append(self._assistant_calls(msg["tool_calls"]))
            elif role == "tool":
                out.append(
                    {
                        "role": "tool",
                        "tool_call_id": msg.get("tool_call_id"),
                        "name": msg.get("name"),
                        "content": msg["content"],
                    }
                )
            elif role != "system":
                out.append({"role": role, "content": msg.get("content", "")})
        return out, [t.openai() for t in tools]

    def _assistant_calls(self, calls: Sequence[ToolCall]) -> dict[str, Any]:
        return {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in calls
            ],
        }

    def grammar(
        self, tools: Sequence[ToolSpec], tool_choice: str, *, thoughts: bool, max_parallel: int
    ) -> GrammarSpec | None:
        if tool_choice == "none" or not tools or self.xgrammar_model is None:
            return None
        import xgrammar as xgr

        choice: Any = tool_choice
        if tool_choice not in ("auto", "required"):
            choice = {"type": "function", "function": {"name": tool_choice}}
        tag = xgr.get_model_structural_tag(
            self.xgrammar_model,
            tools=[t.openai() for t in tools],
            tool_choice=choice,
            reasoning="disabled",
            parallel_tool_calls=max_parallel > 1,
        )
        return structural_tag_spec(json.loads(tag.model_dump_json()))


class HermesFormat(_TemplateFormat):
    """Hermes/Qwen: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks."""

    name = "hermes"
    xgrammar_model = "qwen_3"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.S)

    def parse(self, text: str) -> ParsedAction:
        blocks = self._BLOCK.findall(text)
        if not blocks:
            answer = text.strip()
            return ParsedAction(answer=answer) if answer else ParsedAction(error="the reply was empty")
        values = [v for b in blocks for v in _json_values(b)]
        calls, error = _calls_from(values)
        if error is None and not calls:
            error = 'a <tool_call> block must hold {"name": ..., "arguments": {...}}'
        thought = self._BLOCK.sub("", text).strip() or None
        return ParsedAction(calls=calls, error=error, thought=thought)


class Llama3Format(_TemplateFormat):
    """Llama 3.1+: a bare JSON object `{"name": ..., "parameters": {...}}` (optionally after <|python_tag|>)."""

    name = "llama3"
    xgrammar_model = "llama"

    def parse(self, text: str) -> ParsedAction:
        body = text.replace("<|python_tag|>", "").strip()
        if body.startswith("{") or body.startswith("["):
            calls, error = _calls_from(_json_values(body))
            if calls or error:
                return ParsedAction(calls=calls, error=error)
        return ParsedAction(answer=body) if body else ParsedAction(error="the reply was empty")


class MistralFormat(_TemplateFormat):
    """Mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`."""

    name = "mistral"

    def parse(self, text: str) -> ParsedAction:
        if "[TOOL_CALLS]" not in text:
            answer = text.strip()
            return ParsedAction(answer=answer) if answer else ParsedAction(error="the reply was empty")
        before, _, after = text.partition("[TOOL_CALLS]")
        calls, error = _calls_from(_json_values(after))
        if error is None and not calls:
            error = 'expected [TOOL_CALLS] [{"name": ..., "arguments": {...}}]'
        return ParsedAction(calls=calls, error=error, thought=before.strip() or None)

    def grammar(
        self, tools: Sequence[ToolSpec], tool_choice: str, *, thoughts: bool, max_parallel: int
    ) -> GrammarSpec | None:
        if tool_choice == "none" or not tools:
            return None
        chosen = [t for t in tools if tool_choice in ("auto", "required") or t.name == tool_choice]
        tags = [
            {
                "type": "tag",
                "begin": f'[TOOL_CALLS] [{{"name": "{t.name}", "arguments": ',
                "content": {"type": "json_schema", "json_schema": dict(t.parameters) or {"type": "object"}},
                "end": "}]",
            }
            for t in chosen
        ]
        fmt: dict[str, Any] = {
            "type": "triggered_tags",
            "triggers": ["[TOOL_CALLS]"],
            "tags": tags,
            "at_least_one": tool_choice != "auto",
            "stop_after_first": True,
        }
        return structural_tag_spec({"type": "structural_tag", "format": fmt})


FORMATS: dict[str, type[ToolFormat]] = {
    "json": JsonProtocol,
    "hermes": HermesFormat,
    "llama3": Llama3Format,
    "mistral": MistralFormat,
}


def detect_format(chat_template: str | None, has_tool_template: bool) -> str:
    """The model's own tool format when its chat template has one, else our JSON protocol."""
    if not chat_template or not has_tool_template:
        return "json"
    if "<tool_call>" in chat_template:
        return "hermes"
    if "[TOOL_CALLS]" in chat_template:
        return "mistral"
    if "<|python_tag|>" in chat_template or "ipython" in chat_template:
        return "llama3"
    return "json"


def make_format(name: str) -> ToolFormat:
    return FORMATS[name]()
