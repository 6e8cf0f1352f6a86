"""Prompting and parsing per tool format: tolerant of the model, strict for the runtime."""

from __future__ import annotations

import json

from inference.formats import (
    DEFAULT_EXAMPLES,
    HermesFormat,
    JsonProtocol,
    Llama3Format,
    MistralFormat,
    ToolCall,
    ToolSpec,
    detect_format,
    parse_json_protocol,
)

TIME = ToolSpec(
    "time__get_current_time",
    "Get current time in a specific timezone",
    {
        "type": "object",
        "properties": {"timezone": {"type": "string", "description": "IANA timezone name"}},
        "required": ["timezone"],
    },
    "time",
)


def test_json_protocol_parses_calls_answers_and_tolerates_noise() -> None:
    a = parse_json_protocol('{"tool": "t__x", "arguments": {"a": 1}}')
    assert [(c.name, c.arguments) for c in a.calls] == [("t__x", {"a": 1})] and a.answer is None
    b = parse_json_protocol('Sure!\n```json\n{"name": "t__x", "args": "{\\"a\\": 2}"}\n```')
    assert [(c.name, c.arguments) for c in b.calls] == [("t__x", {"a": 2})]
    c = parse_json_protocol('[{"tool": "a", "arguments": {}}, {"tool": "b", "arguments": {"k": "v"}}]')
    assert [c.name for c in c.calls] == ["a", "b"]
    assert parse_json_protocol('{"thought": "easy", "answer": "42"}').answer == "42"
    assert parse_json_protocol("It is noon.").answer == "It is noon."  # prose from an unconstrained model
    assert parse_json_protocol('{"tool": "t__x", "arguments": [1]}').error is not None
    assert parse_json_protocol('{"foo": 1}').error is not None
    assert parse_json_protocol('{"tool": "t__x", "arguments": {').error is not None
    assert parse_json_protocol("   ").error == "the reply was empty"


def test_json_protocol_prompt_has_tools_examples_and_history() -> None:
    fmt = JsonProtocol()
    history = [
        {"role": "user", "content": "What time is it in Tokyo?"},
        {
            "role": "assistant",
            "content": "raw",
            "tool_calls": [ToolCall("c1", TIME.name, {"timezone": "Asia/Tokyo"})],
        },
        {"role": "tool", "tool_call_id": "c1", "name": TIME.name, "content": '{"datetime": "x"}'},
    ]
    msgs, tools = fmt.messages("Be brief.", [TIME], DEFAULT_EXAMPLES, history)
    assert tools is None
    system = msgs[0]["content"]
    assert system.startswith("Be brief.") and TIME.name in system and "IANA timezone name" in system
    assert "fx__get_rate" in system  # the generic examples' tools are named as not available
    # Worked examples are real turns: user, assistant call, tool result, assistant answer.
    assert [m["role"] for m in msgs[1:5]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(msgs[-2]["content"]) == {"tool": TIME.name, "arguments": {"timezone": "Asia/Tokyo"}}
    assert msgs[-1] == {"role": "tool", "content": '{"datetime": "x"}'}


def test_native_formats_parse_their_own_syntax() -> None:
    h = HermesFormat().parse('<tool_call>\n{"name": "t__x", "arguments": {"a": 1}}\n</tool_call>')
    assert [(c.name, c.arguments) for c in h.calls] == [("t__x", {"a": 1})]
    assert HermesFormat().parse("plain answer").answer == "plain answer"
    ll = Llama3Format().parse('<|python_tag|>{"name": "t__x", "parameters": {"a": 2}}')
    assert [(c.name, c.arguments) for c in ll.calls] == [("t__x", {"a": 2})]
    m = MistralFormat().parse(
        '[TOOL_CALLS] [{"name": "t__x", "arguments": {"a": 3}}, {"name": "t__y", "arguments": {}}]'
    )
    assert [c.name for c in m.calls] == ["t__x", "t__y"]
    assert MistralFormat().parse("[TOOL_CALLS] nonsense").error is not None


def test_native_formats_render_tools_through_the_template_and_build_grammars() -> None:
    msgs, tools = HermesFormat().messages("sys", [TIME], [], [{"role": "user", "content": "hi"}])
    assert tools == [TIME.openai()] and msgs[0] == {"role": "system", "content": "sys"}
    for fmt in (HermesFormat(), Llama3Format(), MistralFormat()):
        spec = fmt.grammar([TIME], "auto", thoughts=False, max_parallel=2)
        assert spec is not None and spec.kind == "structural_tag" and TIME.name in spec.payload
        assert fmt.grammar([TIME], "none", thoughts=False, max_parallel=1) is None


def test_detect_format() -> None:
    assert detect_format(None, False) == "json"
    assert detect_format("{{ '<tool_call>' }}", True) == "hermes"
    assert detect_format("[TOOL_CALLS]", True) == "mistral"
    assert detect_format("<|python_tag|> ipython", True) == "llama3"
    assert detect_format("<tool_call>", False) == "json"  # a template that does not render tools
