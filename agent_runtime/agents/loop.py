"""The ReAct agent loop: the model picks tool calls or a final answer, tool results come back as
observations, budgets end runs; every step is an event. Also multi-turn sessions.
"""

from __future__ import annotations

import fnmatch
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
import structlog
from anyio.streams.memory import MemoryObjectSendStream

from agent_runtime.agents.checks import failure_summary, ungrounded_values
from agent_runtime.agents.context import run_context
from agent_runtime.agents.events import (
    AgentEvent,
    AgentResult,
    AnswerUnverified,
    FinalAnswer,
    ModelReplyInvalid,
    RunFinished,
    StepRecord,
    StepStarted,
    Stopped,
    TokenDelta,
    ToolCallFinished,
    ToolCallProgress,
    ToolCallRecord,
    ToolCallStarted,
    ToolsRouted,
    Usage,
    UsageReport,
)
from agent_runtime.agents.examples import CallMemory, examples_for
from agent_runtime.agents.focus import focus_lines, focus_note
from agent_runtime.agents.grounding import GroundingContext
from agent_runtime.agents.guided import GUIDED_EXAMPLES, guided_turn, shown_guided
from agent_runtime.agents.llm import GenerationRequest, LLMBackend
from agent_runtime.agents.observations import Observation, flat_lines, observe, render_result
from agent_runtime.config.agents import AgentConfig
from agent_runtime.errors import AgentRuntimeError
from inference.formats import (
    DEFAULT_EXAMPLES,
    ExampleCall,
    JsonProtocol,
    Message,
    ParsedAction,
    ToolCall,
    ToolSpec,
    WorkedExample,
    make_format,
)

if TYPE_CHECKING:
    from agent_runtime.agents.host import AgentHost
    from agent_runtime.agents.routing import Routing

log = structlog.get_logger(__name__)

PROGRESS_EVENTS = 64  # progress events waiting to be read; past that they are dropped (each call's relay
# already keeps only the newest of a flood, so this fills only when the reader stalls)


class AgentError(AgentRuntimeError):
    """An agent cannot be built (unknown name, no tools, a model that cannot be loaded)."""


# -- the agent ----------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Budget:
    steps: int = 0
    tool_calls: int = 0


class Agent:
    """A configured agent bound to a runtime's tools and a backend; runs are independent and may overlap."""

    def __init__(self, host: AgentHost, config: AgentConfig) -> None:
        self.host = host
        self.config = config
        self.name = config.name

    # -- tools ---------------------------------------------------------------------------------------------

    def tools(self) -> list[ToolSpec]:
        """The tools this agent sees now (globs over the live registry plus local tools)."""
        specs: list[ToolSpec] = []
        for entry in self.host.mcp_entries():
            if not self.config.sees(entry.name):
                continue
            if self.config.approval == "never" and _destructive(entry.definition):
                continue
            d = entry.definition
            read_only = d.annotations.read_only_hint if d.annotations is not None else None
            specs.append(
                ToolSpec(entry.name, d.description or "", dict(d.input_schema or {}), entry.server, read_only)
            )
        for tool in self.host.runtime.local_tools:
            if self.config.sees(tool.name):
                specs.append(ToolSpec(tool.name, tool.description, tool.parameters, server=None))
        return specs

    def check_tools(self) -> list[ToolSpec]:
        """The agent's tools, or a ConfigError naming the glob that matches nothing / the empty set."""
        specs = self.tools()
        names = [s.name for s in specs]
        live_prefixes = self.host.live_prefixes()
        all_prefixes = self.host.configured_prefixes()
        quarantined = self.host.quarantined_names()
        for i, glob in enumerate(self.config.tools):
            if any(fnmatch.fnmatchcase(n, glob) for n in names):
                continue
            if any(fnmatch.fnmatchcase(n, glob) for n in quarantined):
                log.warning(
                    "tool glob matches only quarantined tools; `agent-runtime tools approve` reviews them",
                    agent=self.name,
                    glob=glob,
                )
                continue
            lit = glob.split("*")[0].split("?")[0].split("[")[0]
            down = [
                p for p in all_prefixes if p not in live_prefixes and (p.startswith(lit) or lit.startswith(p))
            ]
            if down:  # its server is configured but not up yet: not the config's fault
                log.warning(
                    "tool glob matches no live tool; its server is not ready", agent=self.name, glob=glob
                )
                continue
            raise self.host.config_error(
                f"agents.{self.name}.tools[{i}]",
                f"tool glob {glob!r} matches no tool",
                "available: " + (", ".join(sorted(self.host.all_tool_names())[:12]) or "none"),
            )
        if not specs and self.config.tool_choice != "none":
            raise self.host.config_error(
                f"agents.{self.name}.tools",
                f"agent {self.name!r} has no tools",
                "check the tool globs and that the servers started (`agent-runtime tools list`)",
            )
        if (
            self.config.tool_choice not in ("auto", "required", "none")
            and self.config.tool_choice not in names
        ):
            raise self.host.config_error(
                f"agents.{self.name}.tool_choice",
                f"tool_choice names {self.config.tool_choice!r}, which this agent does not see",
            )
        return specs

    # -- runs ----------------------------------------------------------------------------------------------

    async def run(self, task: str, *, history: Sequence[Message] = ()) -> AgentResult:
        result: AgentResult | None = None
        async for event in self.stream(task, history=history):
            if isinstance(event, RunFinished):
                result = event.result
        assert result is not None
        return result

    def session(self) -> AgentSession:
        return AgentSession(self)

    async def stream(self, task: str, *, history: Sequence[Message] = ()) -> AsyncGenerator[AgentEvent, None]:
        """Events of one run, ending with RunFinished (which carries the AgentResult)."""
        cfg = self.config
        backend = await self.host.backend(cfg.model)  # loads the model on first use (not counted below)
        started = time.perf_counter()
        deadline = time.monotonic() + cfg.timeout_secs
        tools = self.tools()
        fmt = make_format(cfg.tool_format if cfg.tool_format != "auto" else backend.tool_format())
        examples = _examples(cfg)
        by_name = {t.name: t for t in tools}
        # the configured resources (into the system prompt) and prompt (its messages before the first task)
        context = await run_context(self.host.runtime, cfg, first_turn=not history)
        system_prompt = context.system_prompt
        history = [*history, *context.seed]
        messages: list[Message] = [*history, {"role": "user", "content": task}]
        # a backend written against the protocol before two-stage actions has no supports_prefix: single-stage
        prefix = bool(getattr(backend, "supports_prefix", False))
        guided = cfg.guided and cfg.constrained and prefix and fmt.name == "json" and bool(tools)
        if guided:
            examples = list(GUIDED_EXAMPLES) if cfg.examples is None else [shown_guided(e) for e in examples]
        routing: Routing | None = None
        offered = tools
        grounding = GroundingContext()
        for msg in messages:
            grounding.add(str(msg.get("content") or ""))
        if guided:
            # The tools that fit the task, fixed for the run: the prompt stays the same from step to step, so
            # each step's prompt is served from the prefix cache up to the previous step's end.
            routing = await self.host.route(task, tools)
            picked = set(routing.top(cfg.route_tools))
            if cfg.tool_choice not in ("auto", "required", "none"):
                picked.add(cfg.tool_choice)
            offered = [t for t in tools if t.name in picked]
            yield ToolsRouted(0, [t.name for t in offered], routing.to_dict())
        seen_calls: dict[str, ToolCallRecord] = {}
        memory = self.host.examples if cfg.learn_examples else None
        if cfg.examples is None and memory is not None:
            examples = examples_for(offered, memory) or examples
        verified: bool | None = None
        rechecked = False
        steps: list[StepRecord] = []
        usage = Usage()
        budget = _Budget()
        run_id = uuid.uuid4().hex[:12]
        outcome: Literal["answer", "stopped"] = "stopped"
        answer: str | None = None
        stop_reason: str | None = "max_steps"
        detail: str | None = f"no answer after {cfg.max_steps} steps"

        for index in range(1, cfg.max_steps + 1):
            if time.monotonic() >= deadline:
                stop_reason, detail = "timeout", f"the run exceeded timeout_secs={cfg.timeout_secs:g}"
                break
            budget.steps = index
            yield StepStarted(index)
            # auto/required/none hold for every step; a named tool is forced on the first step only (forcing
            # it again would loop on the same call until the budget ends the run).
            choice = cfg.tool_choice
            if index > 1 and choice not in ("auto", "required", "none"):
                choice = "auto"
            if guided and isinstance(fmt, JsonProtocol):
                # the routed tools come with the task: the system turn and the examples stay the same from run
                # to run, so the prefix cache serves them to every run, not only to the next step of this one
                template_msgs, template_tools = fmt.messages(
                    system_prompt, offered, examples, messages, task_index=len(history)
                )
            else:
                template_msgs, template_tools = fmt.messages(system_prompt, offered, examples, messages)
            grammar = None
            if cfg.constrained and backend.supports_grammar and not guided:
                grammar = fmt.grammar(
                    tools, choice, thoughts=cfg.thoughts, max_parallel=cfg.parallel_tool_calls
                )
            request = GenerationRequest(
                template_msgs,
                template_tools,
                grammar,
                max_tokens=cfg.max_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                seed=cfg.seed,
                request_id=f"{self.name}-{run_id}-{index}",
                adapter=cfg.adapter,
            )
            step = StepRecord(index, "", None)
            steps.append(step)
            t0 = time.perf_counter()
            text = ""
            finish: str | None = None
            timed_out = False
            try:
                if guided:
                    candidates = [t.name for t in offered]
                    if choice not in ("auto", "required", "none"):
                        candidates = [choice]
                    elif choice == "none":
                        candidates = []
                    # A task that clearly matches a tool gets a call before any answer: a small model otherwise
                    # answers from what it believes (a time, a file's content) instead of looking it up, and
                    # picks among tools worse than the routing does. So until a call has worked, the next call
                    # is the best routed tool not yet tried (after a failure, the model may fix the arguments
                    # of the same tool once: an identical call is never sent again).
                    forced = _next_routed(routing, steps, cfg.route_tools) if choice == "auto" else None
                    if forced is not None:
                        candidates = [forced]
                    # a named tool_choice forces that call on the first step, as `required` forces some call
                    allow_answer = choice in ("auto", "none") and forced is None
                    if index == cfg.max_steps and choice != "required" and _worked(steps):
                        candidates = []  # the last step answers from what the calls returned
                    if len(steps) > 1 and choice != "required" and _repeated_a_result(steps[-2]):
                        candidates = []  # it asked again for what it has: it answers from that now
                    # a step of a plan takes its paths from its own part of the task: the read of "Read X and
                    # write the total to Y" must not get Y, nor the write X
                    part = routing.part_of(forced) if routing is not None and forced is not None else None
                    turn = guided_turn(
                        backend,
                        request,
                        offered,
                        candidates,
                        grounding.for_part(part),
                        allow_answer=allow_answer or not candidates,
                        deadline=deadline,
                        quote=cfg.quote_results,
                    )
                    async with aclosing(turn) as progress:
                        async for p in progress:
                            if p.delta:
                                yield TokenDelta(index, p.delta)
                            text = p.text
                            step.prompt_tokens, step.completion_tokens = p.prompt_tokens, p.completion_tokens
                            step.cached_tokens = p.cached_tokens
                            if p.finished:
                                finish = p.finish_reason
                                break
                            if time.monotonic() >= deadline:
                                timed_out = True
                                break
                else:
                    # aclosing: leaving early (deadline, consumer gone) aborts the request in the engine now.
                    async with aclosing(backend.generate(request)) as chunks:
                        async for chunk in chunks:
                            if chunk.delta_text:
                                yield TokenDelta(index, chunk.delta_text)
                            text = chunk.text
                            step.prompt_tokens, step.completion_tokens = (
                                chunk.prompt_tokens,
                                chunk.completion_tokens,
                            )
                            step.cached_tokens = chunk.cached_tokens
                            if chunk.finished:
                                finish = chunk.finish_reason
                                break
                            if time.monotonic() >= deadline:
                                timed_out = True
                                break
            except Exception as exc:
                if not getattr(exc, "user_facing", False) and not isinstance(
                    exc, AgentRuntimeError | RuntimeError
                ):
                    raise
                step.model_seconds = time.perf_counter() - t0
                stop_reason, detail = "model_error", str(exc)
                _account(usage, step)
                break
            step.model_seconds = time.perf_counter() - t0
            step.model_text, step.finish_reason = text, finish
            _account(usage, step)
            if timed_out:
                stop_reason, detail = "timeout", f"the run exceeded timeout_secs={cfg.timeout_secs:g}"
                break
            if finish in ("error", "abort"):
                stop_reason, detail = "model_error", f"generation ended with {finish!r}"
                break

            action = fmt.parse(text)
            step.thought = action.thought
            if action.error is None and action.answer is None and not action.calls:
                action = ParsedAction(error="the reply held neither a tool call nor an answer")
            if action.error is not None:
                why = action.error + (" (the reply was cut off at max_tokens)" if finish == "length" else "")
                step.error = why
                yield ModelReplyInvalid(index, text, why)
                messages.append({"role": "assistant", "content": text})
                messages.append(
                    {"role": "user", "content": f"Error: {why}. Reply again following the format."}
                )
                continue
            if action.answer is not None and not action.calls:
                answer = action.answer
                made = [c for s in steps for c in s.tool_calls]
                failed = failure_summary(made)
                if failed is not None:
                    answer = failed  # every call failed: say so, never a value the tools did not give
                elif made:
                    sources = [task, *(c.observation for c in made if not c.is_error)]
                    missing = ungrounded_values(answer, sources)
                    verified = not missing
                    if missing and not rechecked and index < cfg.max_steps:
                        rechecked = True
                        step.error = f"the answer states {', '.join(missing[:3])}, which no tool result gave"
                        yield AnswerUnverified(index, answer, missing, retrying=True)
                        messages.append({"role": "assistant", "content": answer})
                        messages.append(
                            {"role": "user", "content": _RECHECK.format(values=", ".join(missing[:3]))}
                        )
                        continue
                    if missing:
                        yield AnswerUnverified(index, answer, missing, retrying=False)
                    elif memory is not None:
                        self._remember(memory, task, made, by_name, answer)
                step.answer = answer
                messages.append({"role": "assistant", "content": answer})
                yield FinalAnswer(index, answer)
                outcome, stop_reason, detail = "answer", None, None
                break

            calls = action.calls[: cfg.parallel_tool_calls]
            if budget.tool_calls + len(calls) > cfg.max_tool_calls:
                step.error = "tool-call budget exhausted"
                stop_reason = "max_tool_calls"
                detail = f"the model asked for more than max_tool_calls={cfg.max_tool_calls} tool calls"
                messages.append({"role": "assistant", "content": text, "tool_calls": calls})
                break
            budget.tool_calls += len(calls)
            for i, call in enumerate(calls):
                call.id = f"call_{index}_{i}"
                spec = by_name.get(call.name)
                yield ToolCallStarted(
                    index, call.id, call.name, call.arguments, spec.server if spec else None
                )
            messages.append({"role": "assistant", "content": text, "tool_calls": calls})
            t1 = time.perf_counter()
            records: list[ToolCallRecord] = []
            reports = self._execute_reporting(
                index, calls, by_name, deadline, backend, seen_calls, records, flat=guided
            )
            async with aclosing(reports):
                async for report in reports:
                    yield report
            step.tool_seconds = time.perf_counter() - t1
            usage.tool_seconds += step.tool_seconds
            usage.tool_calls += len(records)
            for rec in records:
                step.tool_calls.append(rec)
                content = rec.observation
                if rec.outcome == "result":
                    grounding.add_result(rec.observation)
                    if guided:  # the lines that fit the task, again after the result (agents/focus.py)
                        grounding.focus = focus_lines(task, rec.observation)
                        content += focus_note(grounding.focus)
                else:
                    grounding.add(rec.observation)
                spec = by_name.get(rec.name)
                if rec.outcome == "result" and spec is not None and spec.read_only is not True:
                    seen_calls.clear()  # it may have changed what an earlier call saw: repeats are fair again
                messages.append(
                    {
                        "role": "tool",
                        "tool_call_id": rec.call_id,
                        "name": rec.name,
                        "content": content,
                    }
                )
                yield ToolCallFinished(
                    index,
                    rec.call_id,
                    rec.name,
                    rec.server,
                    rec.outcome,
                    rec.duration,
                    rec.observation,
                    rec.is_error,
                    rec.truncated,
                )

        usage.steps = len(steps)
        usage.wall_seconds = time.perf_counter() - started
        if outcome == "stopped":
            yield Stopped(len(steps), stop_reason or "max_steps", detail or "")
        yield UsageReport(usage)
        result = AgentResult(
            self.name,
            task,
            outcome,
            answer,
            stop_reason,
            detail,
            steps,
            usage,
            messages,
            routing={"offered": [t.name for t in offered], **routing.to_dict()} if routing else None,
            verified=verified if outcome == "answer" else None,
        )
        yield RunFinished(result)

    def _remember(
        self,
        memory: CallMemory,
        task: str,
        calls: Sequence[ToolCallRecord],
        by_name: dict[str, ToolSpec],
        answer: str,
    ) -> None:
        """Keep a verified run's successful calls as examples for later runs (single-call runs only: a
        multi-step run's calls are not each an example of answering its task)."""
        good = [c for c in calls if c.outcome == "result"]
        spec = by_name.get(good[0].name) if len(good) == 1 and len(calls) == 1 else None
        if spec is not None:
            memory.remember(spec, task, good[0].arguments, good[0].observation, answer)

    async def _execute_reporting(
        self,
        step: int,
        calls: list[ToolCall],
        by_name: dict[str, ToolSpec],
        deadline: float,
        backend: LLMBackend,
        seen: dict[str, ToolCallRecord],
        records: list[ToolCallRecord],
        *,
        flat: bool = False,
    ) -> AsyncGenerator[ToolCallProgress, None]:
        """`_execute` into `records`, yielding the progress servers report while the calls run. Closing it
        early (the reader went away) cancels the calls, and the servers are told so."""
        send, receive = anyio.create_memory_object_stream[ToolCallProgress](PROGRESS_EVENTS)

        async def run_calls() -> None:
            with send:
                records.extend(
                    await self._execute(
                        step, calls, by_name, deadline, backend, seen, flat=flat, progress=send
                    )
                )

        async with anyio.create_task_group() as tg:
            tg.start_soon(run_calls)
            with receive:
                try:
                    async for event in receive:
                        yield event
                except GeneratorExit:
                    # Closed at a yield: end the calls here (the group waits for them) rather than let the
                    # group wrap GeneratorExit in an exception group.
                    tg.cancel_scope.cancel()

    async def _execute(
        self,
        step: int,
        calls: list[ToolCall],
        by_name: dict[str, ToolSpec],
        deadline: float,
        backend: LLMBackend,
        seen: dict[str, ToolCallRecord],
        *,
        flat: bool = False,
        progress: MemoryObjectSendStream[ToolCallProgress] | None = None,
    ) -> list[ToolCallRecord]:
        """Run a step's calls concurrently (bounded); records come back in call order, failures included.
        A call identical to one made earlier in the run is not sent again: the model gets the earlier result
        with a note, so a model stuck on one call cannot spend the run repeating it."""
        records: list[ToolCallRecord | None] = [None] * len(calls)
        limiter = anyio.CapacityLimiter(max(1, self.config.parallel_tool_calls))

        async def one(i: int, call: ToolCall) -> None:
            key = _call_key(call)
            earlier = seen.get(key)
            if earlier is not None:
                records[i] = _repeated(step, call, earlier)
                return
            async with limiter:
                rec = await self._call_one(
                    step, call, by_name.get(call.name), deadline, backend, flat=flat, progress=progress
                )
            seen[key] = rec
            records[i] = rec

        async with anyio.create_task_group() as tg:
            for i, call in enumerate(calls):
                tg.start_soon(one, i, call)
        return [r for r in records if r is not None]

    async def _call_one(
        self,
        step: int,
        call: ToolCall,
        spec: ToolSpec | None,
        deadline: float,
        backend: LLMBackend,
        *,
        flat: bool = False,
        progress: MemoryObjectSendStream[ToolCallProgress] | None = None,
    ) -> ToolCallRecord:
        """One call, its outcome rendered as the observation the model sees (`flat`: JSON as key: value lines);
        the server's progress reports go to `progress` as events."""
        cfg = self.config
        remaining = max(0.001, deadline - time.monotonic())
        timeout = min(remaining, cfg.tool_timeout_secs) if cfg.tool_timeout_secs else remaining
        started = time.perf_counter()
        server = spec.server if spec else None
        reason: str | None
        if spec is None:
            kind, body, reason = "unknown_tool", "", f"{call.name!r} is not one of this agent's tools"
        elif spec.server is None:
            local = await self.host.runtime.local_tools.call(call.name, call.arguments, timeout=timeout)
            kind, body, reason = local.kind, local.text, local.reason
        else:
            on_progress = None
            if progress is not None:
                server_name = spec.server

                def on_progress(done: float, total: float | None, message: str | None) -> None:
                    event = ToolCallProgress(step, call.id, call.name, server_name, done, total, message)
                    try:
                        progress.send_nowait(event)
                    except anyio.WouldBlock:
                        log.debug("progress event dropped: nobody reads the events", tool=call.name)
                    except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                        pass  # the step is over: a late report has nobody to go to

            try:
                outcome = await self.host.runtime.execute(
                    call.name, call.arguments, agent=self.name, timeout=timeout, on_progress=on_progress
                )
            except Exception as exc:  # the executor promises outcomes; anything else still reaches the model
                log.warning("tool call raised", tool=call.name, error=repr(exc))
                kind, body, reason = "transport_failure", "", str(exc)
            else:
                kind, reason = outcome.kind, outcome.reason
                body = render_result(outcome.result) if outcome.result is not None else ""
                if flat:
                    body = flat_lines(body)
                server = outcome.server or server
        duration = time.perf_counter() - started
        obs: Observation = observe(
            kind,
            body,
            reason,
            max_tokens=cfg.observation_max_tokens,
            encode=backend.encode,
            decode=backend.decode,
        )
        return ToolCallRecord(
            step,
            call.id,
            call.name,
            server,
            call.arguments,
            kind,
            obs.text,
            obs.is_error,
            obs.truncated,
            duration,
        )


def _examples(cfg: AgentConfig) -> list[WorkedExample]:
    """The config's worked examples (validated pydantic models) as the formats take them; the built-in ones
    when the config has none."""
    if cfg.examples is None:
        return list(DEFAULT_EXAMPLES)
    return [
        WorkedExample(
            ex.task, tuple(ExampleCall(c.tool, dict(c.arguments), c.result) for c in ex.calls), ex.answer
        )
        for ex in cfg.examples
    ]


def _worked(steps: Sequence[StepRecord]) -> bool:
    return any(c.outcome == "result" for s in steps for c in s.tool_calls)


def _repeated_a_result(step: StepRecord) -> bool:
    """The step only repeated calls that had worked (the model asked again for what it already has)."""
    return bool(step.tool_calls) and all(c.outcome == "repeated" and not c.is_error for c in step.tool_calls)


def _next_routed(routing: Routing | None, steps: Sequence[StepRecord], limit: int) -> str | None:
    """The tool a confidently routed run calls next, or None when the model decides. A task in several parts
    (`routing.plan`) calls each part's tool in order, once each; otherwise, until a call returns a result, the
    best routed tool not tried yet (after a failure, the next best)."""
    if routing is None or not routing.confident:
        return None
    calls = [c for s in steps for c in s.tool_calls]
    if routing.plan:
        return next((name for name in routing.plan if not any(c.name == name for c in calls)), None)
    if any(c.outcome == "result" for c in calls):
        return None
    for name in routing.top(limit):
        if not any(c.name == name for c in calls):
            return name
    return None


_RECHECK = (
    "Your answer states {values}, which none of the tool results above contains. Answer again using only "
    "values from the tool results."
)


def _call_key(call: ToolCall) -> str:
    return json.dumps([call.name, call.arguments], sort_keys=True, ensure_ascii=False, default=str)


def _repeated(step: int, call: ToolCall, earlier: ToolCallRecord) -> ToolCallRecord:
    # after a result, the repeat gets that result again (the next step answers from it): no instruction a small
    # model would copy into its answer; after an error, what to change
    note = (
        f"(the same call as step {earlier.step}, not sent again)\n{earlier.observation}"
        if not earlier.is_error
        else f"You already called {call.name} with these arguments (step {earlier.step}); it was not sent "
        f"again. Change the arguments or the tool.\n{earlier.observation}"
    )
    return ToolCallRecord(
        step,
        call.id,
        call.name,
        earlier.server,
        call.arguments,
        "repeated",
        note,
        earlier.is_error,
        False,
        0.0,
    )


def _account(usage: Usage, step: StepRecord) -> None:
    usage.prompt_tokens += step.prompt_tokens
    usage.cached_tokens += step.cached_tokens
    usage.completion_tokens += step.completion_tokens
    usage.model_seconds += step.model_seconds


def _destructive(tool: Any) -> bool:
    ann = getattr(tool, "annotations", None)
    if ann is None:
        return False
    if getattr(ann, "read_only_hint", None) is True or getattr(ann, "readOnlyHint", None) is True:
        return False
    hint = getattr(ann, "destructive_hint", None)
    if hint is None:
        hint = getattr(ann, "destructiveHint", None)
    return hint is not False  # MCP's default for a tool that is not read-only is "may be destructive"


class AgentSession:
    """A multi-turn conversation with one agent: each turn sees the previous turns' messages."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.history: list[Message] = []
        self.results: list[AgentResult] = []

    async def send(self, text: str) -> AgentResult:
        result: AgentResult | None = None
        async for event in self.stream(text):
            if isinstance(event, RunFinished):
                result = event.result
        assert result is not None
        return result

    async def stream(self, text: str) -> AsyncIterator[AgentEvent]:
        async for event in self.agent.stream(text, history=self.history):
            if isinstance(event, RunFinished):
                self.history = list(event.result.messages)
                if event.result.outcome != "answer":
                    # Keep the conversation well-formed for the next turn: an unanswered turn ends in a note.
                    self.history.append(
                        {"role": "assistant", "content": f"(stopped: {event.result.stop_reason})"}
                    )
                self.results.append(event.result)
            yield event

    def reset(self) -> None:
        self.history.clear()
