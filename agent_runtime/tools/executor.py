"""The tool-call pipeline: every call is decided, bounded and recorded here, in DESIGN.md's order.

allow/deny -> validate args -> path/URL checks -> approval -> concurrency limit -> breaker -> retry (only
when safe) -> deadline -> supervisor.call_tool -> output cap/sanitise -> audit -> outcome. `execute` never
raises for a failed call: every call ends in exactly one typed ToolOutcome (cancellation propagates).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import ipaddress
import json
import os
import random
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.to_thread

from agent_runtime.config import secret_values
from agent_runtime.config.policies import PolicyConfig, ToolPolicy, load_policies
from agent_runtime.config.types import RuntimeConfig, ServerConfig
from agent_runtime.errors import AgentRuntimeError
from agent_runtime.logging import get_logger
from agent_runtime.tools.audit import AuditLog
from agent_runtime.tools.monitor import STALE_GRACE, Monitor, Waits
from agent_runtime.tools.notices import ProgressCallback
from agent_runtime.tools.pins import PinStore
from agent_runtime.tools.supervisor import LIVE_STATES, ServerUnavailable
from policies.approval import ApprovalRequest, approval_reason, is_destructive
from policies.arguments import ArgumentValidator
from policies.audit import decision_record
from policies.breaker import BreakerEvent, BreakerSet, CircuitBreaker, Permit
from policies.clock import Clock, monotonic
from policies.deadlines import Deadline, TimeoutPlan, plan_timeouts
from policies.egress import (
    EgressPolicy,
    IPAddress,
    UrlTarget,
    egress_problem,
    has_urls,
    needs_resolution,
    parse_target,
    url_values,
)
from policies.errors import BreakerOpenError
from policies.limits import AgentBudget
from policies.output import cap_result
from policies.paths import PathPolicy, path_problem, path_values, schema_path_names
from policies.retry import RetryableFailure, call_with_retries, may_retry, tool_is_safe
from policies.secrets import redact
from transports.errors import CallTimeout, ConnectionLost, ServerRequestError, TransportError
from transports.targets import StdioTarget

if TYPE_CHECKING:
    from mcp_types import CallToolResult, Tool

    from agent_runtime.tools.registry import RegistryChange, ToolEntry, ToolRegistry
    from agent_runtime.tools.supervisor import Supervisor

log = get_logger(__name__)  # structlog, imported on the first record that passes the level

OutcomeKind = Literal[
    "result",
    "tool_error",
    "denied",
    "invalid_arguments",
    "timeout",
    "breaker_open",
    "transport_failure",
    "budget_exhausted",
    "unknown_tool",
]
ApprovalHook = Callable[[ApprovalRequest], Awaitable[bool] | bool]
Resolver = Callable[[str], Awaitable[list[IPAddress]]]
DNS_TIMEOUT = 5.0
UNHASHED = "unhashed: over the argument limits"  # the audit's `args` for arguments nothing may walk again
_DENY_LIST_HINT = "the `allow`/`deny` lists of the `policies` section refuse this tool"


@dataclass(slots=True)
class ToolOutcome:
    """How one call ended. `result` is set for `result` and (when the server sent one) `tool_error`."""

    kind: OutcomeKind
    tool: str
    server: str | None
    result: CallToolResult | None
    reason: str | None
    duration: float  # seconds, decisions included
    attempts: int  # requests sent (0 when refused before sending)
    truncated: bool
    hint: str | None = None  # what the user can do about a refusal (for the CLI and APIs that raise)

    @property
    def ok(self) -> bool:
        return self.kind == "result"

    def text(self) -> str:
        """The observation for an agent: the result's text, or what went wrong."""
        body = _result_text(self.result) if self.result is not None else ""
        if self.kind == "result":
            return body
        if self.kind == "tool_error":
            return f"error: {body or self.reason or 'the tool failed'}"
        return f"{self.kind.replace('_', ' ')}: {self.reason}"


def _result_text(result: CallToolResult) -> str:
    parts = []
    for block in result.content:
        text = getattr(block, "text", None)
        if text is None:
            resource = getattr(block, "resource", None)
            text = getattr(resource, "text", None)
        parts.append(text if text is not None else f"[{getattr(block, 'type', 'content')}]")
    if not parts and result.structured_content is not None:
        parts.append(json.dumps(result.structured_content, ensure_ascii=False))
    return "\n".join(parts)


async def resolve_host(host: str) -> list[IPAddress]:
    """Every address `host` resolves to (the egress check judges all of them)."""
    infos = await anyio.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


class ToolCallRefused(AgentRuntimeError):
    """A call the pipeline refused or could not complete, for APIs that raise (Runtime.call_tool)."""

    def __init__(self, outcome: ToolOutcome, hint: str | None = None) -> None:
        super().__init__(f"{outcome.tool}: {outcome.kind.replace('_', ' ')}: {outcome.reason}", hint)
        self.outcome = outcome


def outcome_error(outcome: ToolOutcome) -> Exception:
    """The typed exception for a failed outcome: transport errors keep their transport types."""
    if outcome.kind == "timeout":
        return CallTimeout(outcome.reason or "no reply before the deadline", "raise the tool's timeout")
    if outcome.kind == "transport_failure":
        return ConnectionLost(outcome.reason or "transport failure", None, sent=outcome.attempts > 0)
    hints = {
        "denied": "see the `policies` section of the config",
        "invalid_arguments": "`agent-runtime tools list --json` shows the tool's inputSchema",
        "breaker_open": "the server failed repeatedly; `agent-runtime servers status` shows it",
        "budget_exhausted": "the agent's budget is used up",
        "unknown_tool": "`agent-runtime tools list` shows the available tools",
    }
    return ToolCallRefused(outcome, outcome.hint or hints.get(outcome.kind))


class _Failed(Exception):
    """A failed attempt, carrying its outcome kind and whether its request left this process."""

    def __init__(self, kind: OutcomeKind, reason: str, *, sent: bool = True) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.sent = sent


@dataclass(slots=True)
class _Prepared:
    """Per tool definition, everything about its calls that the arguments do not change: resolved policy,
    compiled schema, safety, allow/deny verdict, timeouts, limiter and breakers. Decided once (rebuilt
    when the definition changes) so a call pays only for the checks that depend on its arguments."""

    definition: Tool
    server: ServerConfig
    policy: ToolPolicy
    validator: ArgumentValidator
    safe: bool
    approval: str | None
    destructive: bool
    path_policy: PathPolicy | None
    denial: str | None  # the allow/deny lists judge the name only
    validation_seconds: float  # the schema-validation budget of a call, within its deadline
    plan: TimeoutPlan  # the timeouts of a call that neither the caller nor a budget shortens
    limiter: anyio.CapacityLimiter  # the server's concurrency limit
    slot_wait: Waits  # the monitor's histogram of waits for the server's slots
    breakers: list[CircuitBreaker]  # the server's breaker, then the tool's when configured


def _plan_timeouts(
    tool: str,
    server: ServerConfig,
    policy: ToolPolicy,
    *,
    caller: float | None = None,
    budget_left: float | None = None,
) -> TimeoutPlan:
    """The timeouts of one call of `tool`: the server's settings, the policy's override, then any caller
    timeout or agent budget (which only shorten them)."""
    t = server.timeouts
    return plan_timeouts(
        tool,
        connect=t.connect,
        request=t.request,
        tool_default=t.tool,
        per_tool=t.per_tool,
        policy_override=policy.timeout,
        caller=caller,
        budget_left=budget_left,
    )


@dataclass(slots=True)
class _Call:
    """One admitted call on its way through the call slots, the breakers and the retries."""

    prep: _Prepared
    server: str
    tool: str  # the server's own name for the tool
    args: dict[str, Any]
    deadline: Deadline
    attempt_timeout: float
    on_progress: ProgressCallback | None = None


class Executor:
    """Runs tool calls through the policy pipeline against a supervisor; one per runtime."""

    def __init__(
        self,
        supervisor: Supervisor,
        registry: ToolRegistry,
        config: RuntimeConfig,
        *,
        policies: PolicyConfig | None = None,
        approval_hook: ApprovalHook | None = None,
        clock: Clock = monotonic,
        resolver: Resolver = resolve_host,
        monitor: Monitor | None = None,
        audit: AuditLog | None = None,
        pins: PinStore | None = None,
        rng: random.Random | None = None,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self.supervisor = supervisor
        self.registry = registry
        self.config = config
        self.policies = policies if policies is not None else load_policies(config)
        self.approval_hook = approval_hook
        self.clock = clock
        self.resolver = resolver
        self.breakers = BreakerSet(clock, self._on_breaker)
        self.monitor = monitor if monitor is not None else Monitor(supervisor, self.breakers)
        if self.monitor.breakers is None:
            self.monitor.breakers = self.breakers
        self.audit = audit if audit is not None else AuditLog(self.policies.audit_path)
        self.pins = (
            pins if pins is not None else PinStore.open(self.policies.lock_file, self.policies.pinning)
        )
        self.rng = rng
        self.sleep = sleep
        self._prepared: dict[tuple[str, str], _Prepared] = {}
        self._limiters: dict[str, anyio.CapacityLimiter] = {}
        rt = config.runtime
        self._global = anyio.CapacityLimiter(
            self.policies.max_concurrent_calls_global or rt.max_concurrent_calls_global
        )
        # The global limit binds only when the servers' own limits add up to more than it; otherwise no
        # call can ever find it full, and the call path skips it.
        self._global_binds = sum(self._slot_count(s) for s in config.servers) > self._global.total_tokens
        self._secrets = self._collect_secrets(config)
        self._prefixes = sorted(((s.prefix, s) for s in config.servers if s.prefix), key=lambda p: -len(p[0]))
        self._unsubscribe = registry.subscribe(self._on_registry_change)
        for server in {e.server for e in registry.list()}:  # servers already listed before we subscribed
            self.pins.observe(server, [e.definition for e in registry.list(server)])

    # -- public -----------------------------------------------------------------------------------------

    async def execute(
        self,
        name: str,
        arguments: Mapping[str, Any] | None,
        *,
        agent: str | None = None,
        budget: AgentBudget | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - shortens the tool's deadline, never extends it
        on_progress: ProgressCallback | None = None,
    ) -> ToolOutcome:
        """Run one call through the pipeline. `on_progress(progress, total, message)` gets the server's
        progress reports while it runs (a progress token is sent only then); they never extend the deadline."""
        start = time.perf_counter()
        if type(arguments) is dict:  # the common case, without the ABC isinstance check
            args = dict(arguments)
        elif arguments is None:
            args = {}
        elif isinstance(arguments, Mapping):
            args = dict(arguments)
        else:
            why = f"arguments must be a JSON object, not {type(arguments).__name__}"
            return self._refuse("invalid_arguments", name, None, {}, agent, start, why)
        entry = self.registry.get(name)
        if entry is None:
            return await self._unresolved(name, args, agent, start)
        server, tool = entry.server, entry.tool_name

        if budget is not None:
            why = budget.exhausted(name)
            if why is not None:
                return self._refuse("budget_exhausted", name, server, args, agent, start, why)
            budget.charge(name)

        prep = self._prepared.get((server, tool))
        if prep is None or prep.definition is not entry.definition:
            prep = self._prepare(entry)
        if prep.denial is not None:
            return self._refuse("denied", name, server, args, agent, start, prep.denial, hint=_DENY_LIST_HINT)
        why = self._pin_problem(entry)
        if why is not None:
            hint = f"review and approve it: `agent-runtime tools approve {name}`"
            return self._refuse("denied", name, server, args, agent, start, why, hint=hint)
        problem = prep.validator.check(
            args, prep.validation_seconds if timeout is None else min(prep.validation_seconds, timeout)
        )
        if problem is not None:
            # Arguments over the limits are not digested for the audit: they may be too deep to encode.
            return self._refuse(
                problem.kind, name, server, args, agent, start, problem.reason, unhashed=problem.over_limits
            )
        why = None if prep.path_policy is None else self._path_problem(prep, args)
        egress = prep.policy.egress
        unresolved: list[UrlTarget] = []
        if why is None and egress is not None and has_urls(args, egress.url_args):
            why, unresolved = _egress_verdict(egress, args)
        if why is not None:
            return self._refuse("denied", name, server, args, agent, start, why)
        if prep.approval is not None:
            why = await self._approval_problem(prep, entry, args, agent)
            if why is not None:
                hint = "answer the approval prompt (a terminal is needed), or change the tool's `approval` policy"
                return self._refuse("denied", name, server, args, agent, start, why, hint=hint)
        # DNS last: a call denied for any reason that does not need the host's addresses never looks it up.
        if unresolved:
            assert egress is not None
            why = await self._egress_problem(egress, unresolved)
            if why is not None:
                return self._refuse("denied", name, server, args, agent, start, why)

        # Records only when someone reads them (a file, a listener, debug logs). The decision and the outcome
        # go together at the end: with only a file to write, the audit writer builds both records (and
        # digests the arguments) later, off the call's critical path.
        decided_at = time.time() if self.audit.wants_records() else None
        if timeout is None and budget is None:
            plan = prep.plan
        else:
            plan = _plan_timeouts(
                tool,
                prep.server,
                prep.policy,
                caller=timeout,
                budget_left=budget.remaining_time() if budget is not None else None,
            )
        deadline = Deadline.after(plan.total, self.clock)
        kind: OutcomeKind = "transport_failure"
        result: CallToolResult | None = None
        reason: str | None = None
        attempts = 0
        truncated = False
        finished = False
        try:
            kind, result, reason, attempts = await self._call(
                _Call(prep, server, tool, args, deadline, plan.attempt, on_progress)
            )
            if reason is not None:  # server-supplied text (errors, stderr): no secrets in outcomes or stats
                reason = redact(reason, self._secrets)
            if result is not None:
                result, truncated = cap_result(result, prep.policy.max_output_chars)
            finished = True
        finally:
            duration = time.perf_counter() - start
            cancelled = not finished  # the caller cancelled us mid-call (or a bug raised): still audited
            self.monitor.record(server, "cancelled" if cancelled else kind, duration, reason, attempts)
            if decided_at is not None:
                self.audit.write_call(
                    agent,
                    server,
                    name,
                    args,
                    prep.approval,
                    decided_at,
                    "cancelled" if cancelled else kind,
                    reason,
                    duration,
                    attempts,
                    truncated,
                    self._secrets,
                )
        return ToolOutcome(kind, name, server, result, reason, duration, attempts, truncated)

    def health(self) -> list[Any]:
        return self.monitor.snapshot()

    def quarantined(self, entry: ToolEntry) -> bool:
        """Whether the tool's current definition awaits approval (new, or changed since it was pinned):
        its calls are denied, and it is not offered to agents or MCP hosts."""
        return self.pins.check(entry.server, entry.definition).quarantined

    async def serve(self) -> None:
        """The executor's background work until cancelled: the stale-call sweep and the audit flusher.
        Run it in the task group that owns the executor (the runtime's)."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.monitor.run)
            tg.start_soon(self.audit.run)

    def close(self) -> None:
        self._unsubscribe()
        self.audit.close()

    # -- the call path ----------------------------------------------------------------------------------

    async def _call(self, call: _Call) -> tuple[OutcomeKind, CallToolResult | None, str | None, int]:
        """Take the call slots, then attempt; returns (kind, result, reason, requests sent)."""
        limiter = call.prep.limiter
        deadline = call.deadline
        glob = self._global if self._global_binds else None
        if glob is not None and not _slot(glob, self.monitor.global_slot_wait):
            if not await self._wait_for_slot(glob, deadline, self.monitor.global_slot_wait):
                return "timeout", None, "no free call slot (global limit) before the deadline", 0
        try:
            if not _slot(limiter, call.prep.slot_wait):
                if not await self._wait_for_slot(limiter, deadline, call.prep.slot_wait):
                    return "timeout", None, f"no free call slot for {call.server} before the deadline", 0
            try:
                # The first attempt runs here directly: most calls succeed and pay for no retry loop.
                try:
                    result = await self._attempt(call, 1)
                except RetryableFailure as failure:
                    return await self._retry(failure, call)
                except _Failed as failure:
                    return failure.kind, None, failure.reason, int(failure.sent)
                except BreakerOpenError as exc:
                    return "breaker_open", None, exc.reason, 0
                return _finished(result, 1)
            finally:
                limiter.release()
        finally:
            if glob is not None:
                glob.release()

    async def _wait_for_slot(self, limiter: anyio.CapacityLimiter, deadline: Deadline, waits: Waits) -> bool:
        """Wait for a call slot no later than the deadline (the free case is `_slot`, without awaiting);
        False when none came free in time. The wait goes into `waits`, however it ends."""
        start = time.perf_counter()
        try:
            with anyio.fail_after(deadline.remaining()):
                await limiter.acquire()
        except TimeoutError:
            return False
        finally:
            waits.observe(time.perf_counter() - start)
        return True

    async def _attempt(self, call: _Call, n: int) -> CallToolResult:
        """Attempt `n`: one request through the breakers, bounded by the deadline. A failure raises _Failed (final)
        or RetryableFailure (whether another attempt is safe); BreakerOpenError passes through, never retried."""
        prep, server, deadline = call.prep, call.server, call.deadline
        breakers = prep.breakers
        monitor = self.monitor
        permits = _acquire_all(breakers)
        verdict: Literal["success", "failure", "neutral"] = "neutral"
        remaining = deadline.remaining()
        if remaining <= 0:
            _release(breakers, permits, "neutral")
            raise _Failed("timeout", f"deadline passed before attempt {n}", sent=False)
        now = anyio.current_time()
        # Our hard bound past the transport's own timeout. While the monitor sweeps, the sweep is that
        # bound (it cancels at deadline + STALE_GRACE, before this would): no timer per call.
        scope = (
            anyio.CancelScope()
            if monitor.sweeping
            else anyio.CancelScope(deadline=now + remaining + 2 * STALE_GRACE)
        )
        flight = monitor.track(server, call.tool, now + remaining, scope)
        t0 = time.perf_counter()
        try:
            with scope:
                result = await self.supervisor.call_tool(
                    server,
                    call.tool,
                    call.args,
                    timeout=max(0.001, round(min(call.attempt_timeout, remaining), 3)),
                    progress=call.on_progress,
                )
                verdict = "neutral" if result.is_error else "success"
                return result
            verdict = "failure"  # our hard bound fired: the transport did not honour its timeout
            stale = monitor.untrack(flight)
            if not stale:
                monitor.stats(server).stale_cancelled += 1
            raise RetryableFailure(
                _Failed("timeout", f"no reply within {remaining:.3g}s (cancelled past its deadline)"),
                retry=prep.safe,
            )
        except CallTimeout as exc:
            verdict = "failure"
            raise RetryableFailure(_Failed("timeout", exc.reason), retry=prep.safe) from None
        except ServerUnavailable as exc:
            verdict = "failure"  # never left this process
            raise RetryableFailure(_Failed("transport_failure", exc.reason, sent=False), retry=True) from None
        except ConnectionLost as exc:
            verdict = "failure"
            retry = may_retry(sent=exc.sent, tool_safe=prep.safe)
            raise RetryableFailure(
                _Failed("transport_failure", exc.reason, sent=exc.sent), retry=retry
            ) from None
        except ServerRequestError as exc:
            # The server is alive and answered; a JSON-RPC error is the tool's problem, not the transport's.
            raise _Failed("tool_error", exc.reason) from None
        except TransportError as exc:
            verdict = "failure"
            raise RetryableFailure(_Failed("transport_failure", exc.reason), retry=False) from None
        finally:
            monitor.untrack(flight)
            _release(breakers, permits, verdict, time.perf_counter() - t0)

    async def _retry(
        self, first: RetryableFailure, call: _Call
    ) -> tuple[OutcomeKind, CallToolResult | None, str | None, int]:
        """Attempts 2.. of a call whose first attempt failed: only when safe, within the deadline."""
        sent = int(getattr(first.cause, "sent", True))

        async def attempt(n: int) -> CallToolResult:
            nonlocal sent
            try:
                result = await self._attempt(call, n)
            except RetryableFailure as failure:
                sent += getattr(failure.cause, "sent", True)
                raise
            except _Failed as failure:
                sent += failure.sent
                raise
            sent += 1
            return result

        def on_retry(next_attempt: int, cause: BaseException, wait: float) -> None:
            log.info(
                "retrying tool call",
                server=call.server,
                tool=call.tool,
                attempt=next_attempt,
                wait=round(wait, 3),
                error=str(cause),
            )

        try:
            result, _ = await call_with_retries(
                attempt,
                settings=call.prep.policy.retry,
                deadline=call.deadline,
                sleep=self.sleep,
                rng=self.rng,
                on_retry=on_retry,
                first_failure=first,
            )
        except _Failed as failure:
            return failure.kind, None, failure.reason, sent
        except BreakerOpenError as exc:
            return "breaker_open", None, exc.reason, sent
        return _finished(result, sent)

    async def _unresolved(
        self, name: str, args: dict[str, Any], agent: str | None, start: float
    ) -> ToolOutcome:
        """No such tool right now: its definition may be invalid (denied, saying why), or its server may be
        down (a transport failure the breaker counts)."""
        invalid = self.registry.problem(name)
        if invalid is not None and invalid.kind == "invalid_definition":
            return self._refuse(
                "denied",
                name,
                invalid.server,
                args,
                agent,
                start,
                f"the tool's definition is invalid: {invalid.detail}",
                hint="the server offers a definition the runtime will not use; `agent-runtime tools list` "
                "shows why",
            )
        server_cfg = next((s for prefix, s in self._prefixes if name.startswith(prefix)), None)
        if server_cfg is not None:
            try:
                status = self.supervisor.server(server_cfg.name)
            except Exception:
                status = None
            if status is not None and status.state not in LIVE_STATES:
                breaker = self.breakers.get(
                    server_cfg.name,
                    self.policies.for_tool(server_cfg.name, name[len(server_cfg.prefix) :]).breaker,
                )
                try:
                    permit = breaker.acquire()
                except BreakerOpenError as exc:
                    return self._refuse("breaker_open", name, server_cfg.name, args, agent, start, exc.reason)
                breaker.record(permit, "failure", 0.0)
                reason = ServerUnavailable(server_cfg.name, status.state, status.last_error).reason
                return self._refuse("transport_failure", name, server_cfg.name, args, agent, start, reason)
        names = [e.name for e in self.registry.list()]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
        reason = f"no tool named {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")
        return self._refuse(
            "unknown_tool", name, server_cfg.name if server_cfg else None, args, agent, start, reason
        )

    # -- checks -----------------------------------------------------------------------------------------

    def _prepare(self, entry: ToolEntry) -> _Prepared:
        server, tool = entry.server, entry.tool_name
        server_cfg = self.config.server(server)
        policy = self.policies.for_tool(server, tool)
        ann = entry.definition.annotations
        read_only = ann.read_only_hint if ann is not None else None
        destructive_hint = ann.destructive_hint if ann is not None else None
        idempotent = ann.idempotent_hint if ann is not None else None
        plan = _plan_timeouts(tool, server_cfg, policy)
        lowered = read_only is True or destructive_hint is False
        if not server_cfg.trusted:  # an untrusted server's annotations may raise the bar, never lower it
            read_only = idempotent = destructive_hint = None
        approval = approval_reason(
            policy.approval, read_only_hint=read_only, destructive_hint=destructive_hint
        )
        if approval is not None and lowered and not server_cfg.trusted and policy.approval == "destructive":
            approval = (
                "the server is not marked `trusted`, so its read-only/non-destructive hints are not believed"
            )
        breakers = [self.breakers.get(server, policy.breaker)]
        if policy.tool_breaker is not None:
            breakers.append(self.breakers.get(f"{server}/{tool}", policy.tool_breaker))
        prep = _Prepared(
            definition=entry.definition,
            server=server_cfg,
            policy=policy,
            validator=ArgumentValidator.compile(entry.definition.input_schema, policy.arguments),
            safe=tool_is_safe(
                configured=policy.safe,
                trusted=server_cfg.trusted,
                read_only_hint=read_only,
                idempotent_hint=idempotent,
            ),
            approval=approval,
            destructive=is_destructive(read_only, destructive_hint),
            path_policy=None
            if policy.roots is None
            else server_path_policy(
                policy.roots, policy.path_args, server_cfg, entry.definition.input_schema
            ),
            denial=policy.filter.denial(server, tool),
            validation_seconds=min(policy.arguments.max_validation_seconds, plan.total),
            plan=plan,
            limiter=self._limiter(server, server_cfg),
            slot_wait=self.monitor.stats(server).slot_wait,
            breakers=breakers,
        )
        self._prepared[(server, tool)] = prep
        return prep

    def _pin_problem(self, entry: ToolEntry) -> str | None:
        check = self.pins.check(entry.server, entry.definition)
        if not check.quarantined:
            return None
        what = (
            "is new since the server was approved"
            if check.status == "new"
            else f"changed ({', '.join(check.changed)}) since it was approved"
        )
        return f"tool {entry.name} is quarantined: it {what}"

    def _path_problem(self, prep: _Prepared, args: dict[str, Any]) -> str | None:
        if prep.path_policy is None:
            return None
        policy = prep.path_policy
        for where, value in path_values(
            args, policy.path_args, detect=policy.detect, schema_names=policy.schema_names
        ):
            problem = path_problem(value, policy)
            if problem is not None:
                return f"{where}: {problem}"
        return None

    async def _egress_problem(self, policy: EgressPolicy, targets: list[UrlTarget]) -> str | None:
        """Judge the URL targets whose verdict depends on what their hosts resolve to."""
        for target in targets:
            assert target.host is not None
            resolved: list[IPAddress] = []
            with anyio.move_on_after(DNS_TIMEOUT):
                try:
                    resolved = await self.resolver(target.host)
                except (OSError, ValueError, UnicodeError) as exc:
                    log.debug("egress resolution failed", host=target.host, error=str(exc))
            problem = egress_problem(target, resolved, policy)
            if problem is not None:
                return problem
        return None

    async def _approval_problem(
        self, prep: _Prepared, entry: ToolEntry, args: dict[str, Any], agent: str | None
    ) -> str | None:
        request = ApprovalRequest(
            agent, entry.server, entry.tool_name, args, prep.destructive, prep.approval or ""
        )
        return await self.ask_approval(request, prep.approval or "")

    async def ask_approval(self, request: ApprovalRequest, label: str) -> str | None:
        """Ask the approval hook; None when it said yes, else why not. Fails closed: no hook, a timeout
        (policies.approval_timeout), a failing hook or any answer but True is a refusal. Tool calls and
        servers' sampling requests both come through here."""
        hook = self.approval_hook
        if hook is None:
            return f"approval required ({label}) and no approver is configured"
        started = time.perf_counter()
        try:
            with anyio.fail_after(self.policies.approval_timeout):
                if _is_async_callable(hook):
                    answer = hook(request)
                else:
                    # A synchronous hook (a prompt, a blocking HTTP call) runs in a worker thread so that it
                    # cannot stall the event loop; past the deadline the thread is abandoned and the call
                    # denied, whatever the hook answers later.
                    answer = await anyio.to_thread.run_sync(hook, request, abandon_on_cancel=True)
                if inspect.isawaitable(answer):
                    answer = await answer
        except TimeoutError:
            return f"approval required ({label}); no answer within {self.policies.approval_timeout:g}s"
        except Exception as exc:  # fail closed on any hook failure
            log.warning("approval hook failed", server=request.server, tool=request.tool, error=repr(exc))
            return f"approval required ({label}); the approver failed: {type(exc).__name__}"
        finally:
            self.monitor.stats(request.server).approval_wait.observe(time.perf_counter() - started)
        if answer is not True:
            return f"approval required ({label}) and was denied"
        return None

    # -- helpers ----------------------------------------------------------------------------------------

    def _refuse(
        self,
        kind: OutcomeKind,
        name: str,
        server: str | None,
        args: Mapping[str, Any],
        agent: str | None,
        start: float,
        reason: str,
        *,
        hint: str | None = None,
        unhashed: bool = False,
    ) -> ToolOutcome:
        digest: str | Mapping[str, Any] = UNHASHED if unhashed else args if isinstance(args, Mapping) else {}
        reason = redact(reason, self._secrets)
        self.audit.write(
            decision_record(
                agent=agent,
                server=server,
                tool=name,
                digest=digest,
                allowed=False,
                reason=f"{kind}: {reason}",
                secrets=self._secrets,
            )
        )
        duration = time.perf_counter() - start
        if server is not None:
            self.monitor.record(server, kind, duration, reason)
        log.debug("tool call refused", tool=name, outcome=kind, reason=reason)
        return ToolOutcome(kind, name, server, None, reason, duration, 0, False, hint)

    def server_limiter(self, server: str) -> anyio.CapacityLimiter:
        """The server's concurrency limit, shared by its tool calls and its resource/prompt requests."""
        return self._limiter(server, self.config.server(server))

    @property
    def secrets(self) -> tuple[str, ...]:
        return self._secrets

    def _limiter(self, server: str, cfg: ServerConfig) -> anyio.CapacityLimiter:
        limiter = self._limiters.get(server)
        if limiter is None:
            limiter = self._limiters[server] = anyio.CapacityLimiter(self._slot_count(cfg))
        return limiter

    def _slot_count(self, cfg: ServerConfig) -> int:
        """The concurrency limit of one server: policies, else the server's config, else the runtime's."""
        default = cfg.max_concurrent_calls or self.config.runtime.max_concurrent_calls
        return self.policies.max_concurrent_calls(cfg.name, default) or default

    def _on_breaker(self, event: BreakerEvent) -> None:
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.on_breaker_event(event)

    def _on_registry_change(self, change: RegistryChange) -> None:
        # Runs inside the supervisor's owner task: it must never raise into it.
        try:
            entries = self.registry.list(change.server)
            if entries:
                self.pins.observe(change.server, [e.definition for e in entries])
        except Exception:
            log.exception("pinning the tools of a server failed", server=change.server)

    @staticmethod
    def _collect_secrets(config: RuntimeConfig) -> tuple[str, ...]:
        return tuple(secret_values(config))


def server_path_policy(
    roots: tuple[str, ...], path_args: tuple[str, ...], server: ServerConfig, input_schema: Any
) -> PathPolicy:
    """The path policy for one tool: where its server resolves relative paths (a stdio server: its
    configured cwd, else the runtime's own, which it inherits; plus the directories named in its arguments;
    a network server: unknown, so relative paths are denied) and which arguments its schema marks as paths."""
    target = server.target
    schema_names = schema_path_names(input_schema)
    if not isinstance(target, StdioTarget):
        return PathPolicy(roots, path_args, deny_relative=True, schema_names=schema_names)
    cwd = target.cwd or os.getcwd()
    bases = []
    for arg in target.args:
        value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
        if not value or "\x00" in value:
            continue
        candidate = os.path.join(cwd, os.path.expanduser(value))
        if os.path.isdir(candidate):
            bases.append(candidate)
    return PathPolicy(roots, path_args, cwd, tuple(bases), schema_names=schema_names)


def _egress_verdict(policy: EgressPolicy, args: dict[str, Any]) -> tuple[str | None, list[UrlTarget]]:
    """Every URL argument judged on its face (no DNS): the first problem, or the targets still to resolve."""
    unresolved: list[UrlTarget] = []
    for where, value, _declared in url_values(args, policy.url_args):
        target = parse_target(where, value, policy)
        if needs_resolution(target):
            unresolved.append(target)
            continue
        problem = egress_problem(target, (), policy)
        if problem is not None:
            return problem, []
    return None, unresolved


def _is_async_callable(fn: object) -> bool:
    """An `async def` function, or an object whose `__call__` is one (partials of either included)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    if inspect.iscoroutinefunction(fn):
        return True
    call = inspect.getattr_static(type(fn), "__call__", None)  # an instance with `async def __call__`
    return inspect.iscoroutinefunction(call)


def _slot(limiter: anyio.CapacityLimiter, waits: Waits) -> bool:
    """One call slot if one is free now (the common case: no await, no cancel scope), counted as no wait."""
    try:
        limiter.acquire_nowait()
    except anyio.WouldBlock:
        return False
    waits.free()
    return True


def _finished(result: CallToolResult, sent: int) -> tuple[OutcomeKind, CallToolResult, str | None, int]:
    if result.is_error:
        return "tool_error", result, "tool returned an error", sent
    return "result", result, None, sent


def _acquire_all(breakers: list[CircuitBreaker]) -> list[Permit]:
    permits: list[Permit] = []
    try:
        for b in breakers:
            permits.append(b.acquire())
    except BreakerOpenError:
        for b, p in zip(breakers, permits, strict=False):
            b.record(p, "neutral")
        raise
    return permits


def _release(
    breakers: list[CircuitBreaker],
    permits: list[Permit],
    verdict: Literal["success", "failure", "neutral"],
    duration: float | None = None,
) -> None:
    for b, p in zip(breakers, permits, strict=True):
        if not p.done:
            b.record(p, verdict, duration)
