"""Two-stage actions for a small local model: first the decision (which tool, or the answer) under a grammar of
the few routed tool names, then that tool's arguments under its own schema, grounded in what the run has seen.

The turn's text is the whole action in our JSON protocol (`{"tool": ..., "arguments": {...}}` or
`{"answer": "..."}`), so the loop parses and records it like any other; the stages only decide how it is
generated. The second stage continues the first one's text (an assistant prefix), so the prompt's KV is
reused from the prefix cache.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from agent_runtime.agents.focus import focus_lines, focus_note, focus_value
from agent_runtime.agents.grounding import GroundingContext, ground_schema
from agent_runtime.agents.llm import GenerationChunk, GenerationRequest, LLMBackend
from agent_runtime.agents.observations import flat_lines
from inference.formats import DEFAULT_EXAMPLES, ExampleCall, ToolSpec, WorkedExample
from inference.grammar import normalise_parameters, sequence_spec

DECIDE_PREFIX = '{"'
# On the decision stage, whose answers are free text: a small model otherwise loops ("24:53:53.000000...").
ANSWER_FREQUENCY_PENALTY = 0.6
ARGUMENTS_FREQUENCY_PENALTY = 0.3  # lighter: arguments copy paths whose parts repeat
CALL_PREFIX = '{"tool": "'
ANSWER_PREFIX = '{"answer": '
# Added to the logits of the last results' word tokens while the model may answer: a 135M model otherwise
# answers from its priors ("the laptop is a MacBook Pro") instead of reading the result it was given. Measured
# on the eval suite (docs/agents.md): 1.0 solved 1-3 tasks more than none, 2.0 fewer (it parrots field names).
COPY_BIAS = 1.0
COPY_RESULTS = 2  # the results the bias reads from, newest last
MAX_ANSWER_NUMBERS = 256  # distinct numbers an answer may copy from; a run that saw more answers freely
_NUMBER_ATOM = re.compile(r"\d+(?:[.,]\d+)*")
_TEXT = '[^0-9"\\\\]'  # one character of answer text that is not a digit (nor a quote or backslash to escape)


# The generic worked examples of a guided run, when the agent has none of its own: their results are written the
# way a guided run shows results to the model (flat `key: value` lines, then the lines that fit the task under
# "Most relevant:", agent_runtime/agents/focus.py), and one answer lists what a listing returned: a small model
# copies the shape of what it has seen answered. A single-stage run keeps inference.formats.DEFAULT_EXAMPLES.
def _shown_as(example: WorkedExample, result: str) -> WorkedExample:
    """A generic example with its one call's result written as a guided run shows results."""
    return dataclasses.replace(example, calls=(dataclasses.replace(example.calls[0], result=result),))


def shown_guided(example: WorkedExample) -> WorkedExample:
    """A config's worked example with its results written as a guided run shows results (`flat_lines`, then the
    lines that fit its task under "Most relevant:"): shown raw JSON, the example's answer taught a 135M model
    nothing about the flat result it then read, and it answered with the copied value and a made-up sentence
    ("2026-12-08T07:24:22+09:00 (Tuesday) is not a valid date in Japan")."""
    calls = []
    for call in example.calls:
        flat = flat_lines(call.result)
        calls.append(dataclasses.replace(call, result=flat + focus_note(focus_lines(example.task, flat))))
    return dataclasses.replace(example, calls=tuple(calls))


GUIDED_EXAMPLES: tuple[WorkedExample, ...] = (
    _shown_as(
        DEFAULT_EXAMPLES[0],
        "from: EUR\nto: JPY\nrate: 162.4\nupdated: 2024-05-01" + focus_note(["rate: 162.4"]),
    ),
    _shown_as(DEFAULT_EXAMPLES[1], "location: Rome, Italy\ntemperature_c: 18\nconditions: cloudy"),
    WorkedExample(
        "Which files are in /data/reports?",
        (
            ExampleCall(
                "files__list_folder", {"path": "/data/reports"}, "[FILE] q1.pdf\n[FILE] q2.pdf\n[DIR] archive"
            ),
        ),
        "The files in /data/reports are q1.pdf and q2.pdf, and a folder archive.",
    ),
)


@dataclass(slots=True)
class TurnProgress:
    """What a guided turn reports back as it goes: text deltas for the live view, then the totals."""

    delta: str = ""
    text: str = ""
    finished: bool = False
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


def answer_schema(context: GroundingContext | None = None, *, quote: str = "") -> dict[str, Any]:
    """The answer string's schema: free text, except that once the run has results every number in it is one
    the task or a result wrote (digit for digit: "329.50", "2026", "15"), so a small model copies a value
    instead of blending two ("129.50" from 1299.00 and 329.50); with more numbers than a pattern should hold,
    any text. `quote`: the text the answer starts with (`answer_quote`); the numbers after it are the others (a
    135M model that went on after a quoted datetime wrote one of its own from the quote's digits, "(2026-14-14T14:
    26:53+14:53)", where the other numbers of a result are what it adds: "is 13.0h")."""
    if context is None or not context.results:
        return {"type": "string", "minLength": 1}
    numbers = list(dict.fromkeys(n for text in context.texts for n in _NUMBER_ATOM.findall(text)))
    if len(numbers) > MAX_ANSWER_NUMBERS:
        return (
            {"type": "string", "minLength": 1}
            if not quote
            else {"type": "string", "pattern": f'^{re.escape(quote)}[^"\\\\]*$'}
        )
    if quote:
        quoted = set(_NUMBER_ATOM.findall(quote))
        numbers = [n for n in numbers if n not in quoted]
    # a number is followed by text or ends the answer: two copied numbers never run together ("302" from 3, 02)
    number = "(" + "|".join(re.escape(n) for n in sorted(numbers, key=lambda n: (-len(n), n))) + ")"
    if not quote:
        if not numbers:
            return {"type": "string", "pattern": f"^{_TEXT}+$"}
        return {"type": "string", "pattern": f"^(({_TEXT}|{number}{_TEXT})+{number}?|{number})$"}
    rest = f"({_TEXT}|{number}{_TEXT})*{number}?" if numbers else f"{_TEXT}*"
    # after a quote that ends in a digit the answer goes on with text: "249.99" never becomes "249.9936"
    after = f"({_TEXT}{rest})?" if quote[-1].isdigit() else rest
    return {"type": "string", "pattern": f"^{re.escape(quote)}{after}$"}


def answer_quote(focus: Sequence[str]) -> str:
    """What an answer starts with when a result's lines fit the task: their values, quoted as the result wrote
    them ("Office chair,furniture,249.99"; a JSON list's items joined), joined by "; ". Empty without focus, or
    when a value holds a quote or backslash (the answer's grammar cannot write those unescaped)."""
    values = []
    for line in focus:
        value = focus_value(line).strip()
        try:
            items = json.loads(value) if value.startswith("[") else None
        except ValueError:
            items = None
        if isinstance(items, list) and all(isinstance(i, str) for i in items):
            value = ", ".join(items)
        if not value or '"' in value or "\\" in value or any(ord(c) < 32 for c in value):
            return ""
        values.append(value)
    return "; ".join(values)


def decision_spec(
    candidates: Sequence[str],
    *,
    allow_answer: bool,
    context: GroundingContext | None = None,
    quote: str = "",
) -> Any:
    """The first stage, after the turn's opening `{"`: `tool": "<one of the candidates>"` (the arguments follow
    in stage two), or a whole answer `answer": "..."}` (`answer_schema`: numbers copied from the run, starting
    with `quote` when given)."""
    alternatives: list[list[Mapping[str, Any]]] = []
    if candidates:
        alternatives.append(
            [{"literal": CALL_PREFIX[len(DECIDE_PREFIX) :]}, {"choice": list(candidates)}, {"literal": '"'}]
        )
    if allow_answer or not candidates:
        alternatives.append(
            [
                {"literal": ANSWER_PREFIX[len(DECIDE_PREFIX) :]},
                {"json_schema": answer_schema(context, quote=quote)},
                {"literal": "}"},
            ]
        )
    return sequence_spec(*alternatives)


def arguments_spec(schema: Mapping[str, Any]) -> Any:
    """The second stage: the arguments object (matching the grounded schema), then the closing brace."""
    return sequence_spec([{"json_schema": normalise_parameters(schema)}, {"literal": "}"}])


def _stage(
    base: GenerationRequest, name: str, grammar: Any, prefix: str, frequency_penalty: float
) -> GenerationRequest:
    """One stage's request: the turn's request (prompt, sampling, adapter, ...) with the stage's grammar,
    assistant prefix and penalty, under its own request id."""
    return dataclasses.replace(
        base,
        grammar=grammar,
        request_id=f"{base.request_id}-{name}" if base.request_id else None,
        assistant_prefix=prefix,
        frequency_penalty=frequency_penalty,
    )


async def _stream(
    backend: LLMBackend, request: GenerationRequest, progress: TurnProgress, prefix: str
) -> AsyncGenerator[TurnProgress, None]:
    """Run one stage, adding its output after `prefix` to the turn's text."""
    async with aclosing(backend.generate(request)) as chunks:
        chunk: GenerationChunk
        async for chunk in chunks:
            progress.delta = chunk.delta_text
            progress.text = prefix + chunk.text
            if chunk.finished:
                progress.prompt_tokens += chunk.prompt_tokens
                progress.completion_tokens += chunk.completion_tokens
                progress.cached_tokens += chunk.cached_tokens
                progress.finish_reason = chunk.finish_reason
            yield progress


async def guided_turn(
    backend: LLMBackend,
    base: GenerationRequest,
    tools: Sequence[ToolSpec],
    candidates: Sequence[str],
    context: GroundingContext,
    *,
    allow_answer: bool,
    deadline: float,
    quote: bool = True,
) -> AsyncGenerator[TurnProgress, None]:
    """One model turn in two stages; the last progress has `finished` set and the whole action as `text`.
    `quote`: an answer starts with the values of the result lines that fit the task (`answer_quote`): a 135M
    model shown the budget CSV and "Most relevant: Office chair,furniture,249.99" still answered with the first
    row (measured on the eval suite, docs/agents.md)."""
    progress = TurnProgress()
    decide = _stage(
        base,
        "decide",
        decision_spec(
            candidates,
            allow_answer=allow_answer,
            context=context,
            quote=answer_quote(context.focus) if quote else "",
        ),
        DECIDE_PREFIX,
        ANSWER_FREQUENCY_PENALTY if allow_answer else 0.0,
    )
    if allow_answer and context.results and COPY_BIAS:
        decide = dataclasses.replace(
            decide,
            copy_text="\n".join(context.results[-COPY_RESULTS:]),
            copy_bias=COPY_BIAS,
            copy_focus="\n".join(focus_value(line) for line in context.focus),
        )
    async for p in _stream(backend, decide, progress, DECIDE_PREFIX):
        yield p
    head = progress.text
    if head.startswith(ANSWER_PREFIX) and progress.finish_reason == "length":
        # An answer cut at max_tokens is still an answer: close its string so it parses (the text says so).
        progress.text = close_answer(head)
    if not head.startswith(CALL_PREFIX) or progress.finish_reason not in ("stop", None):
        progress.finished = True
        yield progress
        return
    name = head[len(CALL_PREFIX) :].rstrip('"')
    spec = next((t for t in tools if t.name == name), None)
    if spec is None or time.monotonic() >= deadline:
        progress.finished = True
        yield progress
        return
    schema = ground_schema(spec.parameters, context, read_only=spec.read_only)
    prefix = f'{CALL_PREFIX}{name}", "arguments": '
    args = _stage(base, "args", arguments_spec(schema), prefix, ARGUMENTS_FREQUENCY_PENALTY)
    async for p in _stream(backend, args, progress, prefix):
        yield p
    progress.finished = True
    yield progress


def close_answer(text: str) -> str:
    """`{"answer": "...` cut short, completed as valid JSON (dropping a half-written escape at its end)."""
    for cut in range(0, 8):
        candidate = (text[: len(text) - cut] if cut else text) + ' [cut at max_tokens]"}'
        try:
            json.loads(candidate)
        except ValueError:
            continue
        return candidate
    return '{"answer": "(the answer was cut at max_tokens)"}'


def describe_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A call as our protocol writes it (what the history shows the model)."""
    return json.dumps({"tool": name, "arguments": dict(arguments)}, ensure_ascii=False)
