"""What a server may ask of this client: sampling (our model answers, under the server's policy), elicitation
(the person or an API callback answers, or we decline) and roots (the configured directories).

The runtime owns one `ClientFeatures`; the supervisor hands `callbacks(server)` to `transports.connect`, so
both protocol eras reach the same code (2025-era server requests and 2026-07-28 input-required rounds).
Nothing here runs a model: the agents layer installs a `Sampler`, and without one sampling is declined.
Every sampling and elicitation request is audited, allowed or not.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio

from agent_runtime.config.types import RuntimeConfig, ServerConfig
from agent_runtime.logging import get_logger
from policies.approval import ApprovalRequest
from policies.audit import request_record
from policies.elicitation import (
    AnswerInvalid,
    ElicitationSchemaError,
    FormSchema,
    audit_answer,
    check_message,
    check_schema,
    validate_answer,
)
from policies.roots import MAX_ROOTS, Root, make_root
from policies.sampling import SamplingAsk, approval_arguments, decide

if TYPE_CHECKING:
    from mcp.client.session import ClientRequestContext
    from mcp_types import (
        CreateMessageRequestParams,
        CreateMessageResult,
        ElicitRequestParams,
        ElicitResult,
        ErrorData,
        ListRootsResult,
    )

    from agent_runtime.tools.audit import AuditLog

log = get_logger(__name__)

ELICITATION_TIMEOUT = 600.0  # seconds a person (or the API handler) has to answer a form
SAMPLING_SLOTS = (
    2  # generations one server may have running at once (a flood queues, bounded by its deadline)
)
SAMPLING_METHOD = "sampling/createMessage"
ELICITATION_METHOD = "elicitation/create"


@dataclass(slots=True)
class SamplingRequest:
    """A server's completion request as our sampler sees it: text messages and the clamped budget."""

    server: str
    messages: list[dict[str, str]]  # {"role": "user"|"assistant", "content": text}
    system_prompt: str | None
    max_tokens: int  # already clamped to the server's policy
    temperature: float | None = None
    stop_sequences: list[str] = field(default_factory=list)
    model: str | None = None  # our model source the preferences mapped to (None: the default model)


@dataclass(slots=True)
class SamplingResult:
    text: str
    model: str  # the model's name, reported to the server
    stop_reason: str = "endTurn"  # endTurn, maxTokens or stopSequence
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(slots=True)
class ElicitationRequest:
    """A server asking the person something: a checked form, or (mode "url") a URL to visit with consent."""

    server: str
    mode: Literal["form", "url"]
    message: str
    form: FormSchema | None = None
    url: str | None = None
    elicitation_id: str | None = None


@dataclass(slots=True)
class ElicitationAnswer:
    action: Literal["accept", "decline", "cancel"]
    content: dict[str, Any] | None = None  # form mode, with accept
    reason: str | None = None  # why, for the audit log (e.g. no terminal to ask on)


Sampler = Callable[[SamplingRequest], Awaitable[SamplingResult]]
ElicitationHandler = Callable[[ElicitationRequest], Awaitable[ElicitationAnswer]]
Approver = Callable[[ApprovalRequest, str], Awaitable[str | None]]
RootSpec = str | Path | Root


def _sdk() -> Any:
    import mcp_types  # the SDK's types (~0.2 s): loaded by the first server connection anyway

    return mcp_types


class ClientFeatures:
    """Answers servers' sampling, elicitation and roots requests for one runtime."""

    def __init__(
        self,
        config: RuntimeConfig,
        *,
        audit: AuditLog | None = None,
        approve: Approver | None = None,
        sampler: Sampler | None = None,
        elicitation_handler: ElicitationHandler | None = None,
        secrets: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.audit = audit
        self.approve = approve
        self.sampler = sampler
        self.elicitation_handler = elicitation_handler
        self.secrets = secrets
        self._roots: tuple[Root, ...] = config.runtime.roots
        self._server_roots: dict[str, tuple[Root, ...]] = {
            s.name: s.roots for s in config.servers if s.roots is not None
        }
        self._sampling_slots = {s.name: anyio.CapacityLimiter(SAMPLING_SLOTS) for s in config.servers}

    # -- roots ------------------------------------------------------------------------------------------

    def roots(self, server: str) -> tuple[Root, ...]:
        """The roots advertised to `server`: its own when configured (or set), else the runtime's."""
        return self._server_roots.get(server, self._roots)

    def set_roots(self, roots: Sequence[RootSpec], server: str | None = None) -> list[str]:
        """Replace the runtime's roots (or one server's); the names of the servers whose roots changed.
        Relative paths resolve against the config file's folder (else the working directory)."""
        if len(roots) > MAX_ROOTS:
            raise ValueError(f"{len(roots)} roots (at most {MAX_ROOTS})")
        base = self.config.path.parent if self.config.path is not None else Path.cwd()
        made = tuple(r if isinstance(r, Root) else make_root(str(r), base=base) for r in roots)
        names = [s.name for s in self.config.servers]
        if server is not None:
            if server not in names:
                raise KeyError(server)
            before = {server: self.roots(server)}
            self._server_roots[server] = made
        else:
            before = {name: self.roots(name) for name in names}
            self._roots = made
        return [name for name, old in before.items() if self.roots(name) != old]

    # -- the SDK callbacks ------------------------------------------------------------------------------

    def callbacks(self, server: ServerConfig) -> dict[str, Any]:
        """Keyword arguments for `transports.connect`: the three callbacks, bound to `server`."""
        name = server.name

        async def sampling(
            context: ClientRequestContext, params: CreateMessageRequestParams
        ) -> CreateMessageResult | ErrorData:
            return await self.sample(server, params)

        async def elicitation(
            context: ClientRequestContext, params: ElicitRequestParams
        ) -> ElicitResult | ErrorData:
            return await self.elicit(server, params)

        async def list_roots(context: ClientRequestContext) -> ListRootsResult:
            types = _sdk()
            roots = [types.Root(uri=r.uri, name=r.name) for r in self.roots(name)]
            return types.ListRootsResult(roots=roots)

        return {
            "sampling_callback": sampling,
            "elicitation_callback": elicitation,
            "list_roots_callback": list_roots,
        }

    # -- sampling ---------------------------------------------------------------------------------------

    async def sample(
        self, server: ServerConfig, params: CreateMessageRequestParams
    ) -> CreateMessageResult | ErrorData:
        """Decide, ask approval when the policy says so, generate, audit; a refusal is an error to the server."""
        types = _sdk()
        started = time.perf_counter()
        messages: list[dict[str, str]] = []
        non_text: list[str] = []
        chars = len(params.system_prompt or "")
        for message in params.messages:
            parts = []
            for block in message.content_as_list:
                if block.type == "text":
                    parts.append(block.text)
                else:
                    non_text.append(block.type)
            text = "\n".join(parts)
            chars += len(text)
            messages.append({"role": message.role, "content": text})
        prefs = params.model_preferences
        ask = SamplingAsk(
            max_tokens=params.max_tokens,
            messages=len(messages),
            prompt_chars=chars,
            non_text=tuple(non_text),
            wants_tools=bool(params.tools) or params.tool_choice is not None,
            hints=tuple(h.name for h in (prefs.hints or []) if h.name) if prefs is not None else (),
            intelligence=prefs.intelligence_priority if prefs is not None else None,
            speed=prefs.speed_priority if prefs is not None else None,
            cost=prefs.cost_priority if prefs is not None else None,
        )
        decision = decide(server.sampling, ask, sampler_available=self.sampler is not None)
        digest = {
            "system_prompt": params.system_prompt,
            "messages": messages,
            "max_tokens": params.max_tokens,
        }
        if not decision.allowed:
            return self._sampling_refused(server.name, digest, decision.reason, started)
        if decision.needs_approval:
            shown = approval_arguments(
                params.system_prompt, [(m["role"], m["content"]) for m in messages], decision.max_tokens
            )
            request = ApprovalRequest(
                None,
                server.name,
                SAMPLING_METHOD,
                shown,
                False,
                "policy requires approval for every sampling request",
            )
            why = (
                await self.approve(request, "sampling")
                if self.approve is not None
                else "approval required (sampling) and no approver is configured"
            )
            if why is not None:
                return self._sampling_refused(server.name, digest, why, started)
        sampler = self.sampler
        assert sampler is not None  # decide() refused otherwise
        ask_model = SamplingRequest(
            server=server.name,
            messages=messages,
            system_prompt=params.system_prompt,
            max_tokens=decision.max_tokens,
            temperature=params.temperature,
            stop_sequences=list(params.stop_sequences or []),
            model=decision.model,
        )
        try:
            with anyio.fail_after(server.timeouts.tool):
                async with self._sampling_slots[server.name]:
                    result = await sampler(ask_model)
        except TimeoutError:
            why = f"no answer from the model within {server.timeouts.tool:g}s (tool_secs)"
            return self._sampling_failed(server.name, digest, decision.reason, why, started)
        except Exception as exc:  # the server gets an error, the runtime keeps going
            log.warning("sampling failed", server=server.name, error=repr(exc)[:200])
            why = f"the model failed: {type(exc).__name__}"
            return self._sampling_failed(server.name, digest, decision.reason, why, started)
        self._write(
            request_record(
                event="sampling",
                server=server.name,
                method=SAMPLING_METHOD,
                digest=digest,
                allowed=True,
                reason=decision.reason,
                outcome="result",
                duration=time.perf_counter() - started,
                tokens=result.completion_tokens,
                secrets=self.secrets,
            )
        )
        log.info(
            "sampled for server",
            server=server.name,
            model=result.model,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
        return types.CreateMessageResult(
            role="assistant",
            content=types.TextContent(type="text", text=result.text),
            model=result.model,
            stop_reason=result.stop_reason,
        )

    def _sampling_refused(
        self, server: str, digest: Mapping[str, Any], why: str, started: float
    ) -> ErrorData:
        types = _sdk()
        self._sampling_record(server, digest, allowed=False, reason=why, outcome="denied", started=started)
        log.info("sampling refused", server=server, reason=why)
        return types.ErrorData(code=types.INVALID_REQUEST, message=f"sampling declined by the client: {why}")

    def _sampling_failed(
        self, server: str, digest: Mapping[str, Any], allowed: str, why: str, started: float
    ) -> ErrorData:
        types = _sdk()
        self._sampling_record(
            server, digest, allowed=True, reason=f"{allowed}; {why}", outcome="error", started=started
        )
        return types.ErrorData(code=types.INTERNAL_ERROR, message=f"sampling failed: {why}")

    def _sampling_record(
        self,
        server: str,
        digest: Mapping[str, Any],
        *,
        allowed: bool,
        reason: str,
        outcome: str,
        started: float,
    ) -> None:
        """The audit record of a sampling request that produced no completion (refused or failed)."""
        self._write(
            request_record(
                event="sampling",
                server=server,
                method=SAMPLING_METHOD,
                digest=digest,
                allowed=allowed,
                reason=reason,
                outcome=outcome,
                duration=time.perf_counter() - started,
                secrets=self.secrets,
            )
        )

    # -- elicitation ------------------------------------------------------------------------------------

    async def elicit(self, server: ServerConfig, params: ElicitRequestParams) -> ElicitResult | ErrorData:
        """Check the request, ask the handler when the server's policy is `ask` (else decline), check the
        answer against the schema, audit request and answer."""
        types = _sdk()
        started = time.perf_counter()
        mode = params.mode
        digest: dict[str, Any] = {"mode": mode, "message": params.message}
        form: FormSchema | None = None
        try:
            message = check_message(params.message)
            if isinstance(params, types.ElicitRequestFormParams):
                digest["schema"] = params.requested_schema
                form = check_schema(params.requested_schema)
        except ElicitationSchemaError as exc:
            self._elicitation_record(server.name, digest, False, exc.reason, "error", started)
            return types.ErrorData(code=types.INVALID_PARAMS, message=exc.reason)
        handler = self.elicitation_handler
        if server.elicitation != "ask" or handler is None:
            why = (
                "elicitation is set to decline for this server (config: elicitation)"
                if server.elicitation != "ask"
                else "no one can answer: not on a terminal and no elicitation handler is installed"
            )
            self._elicitation_record(server.name, digest, False, why, "decline", started)
            return types.ElicitResult(action="decline")
        request = ElicitationRequest(
            server=server.name,
            mode="url" if mode == "url" else "form",
            message=message,
            form=form,
            url=getattr(params, "url", None),
            elicitation_id=getattr(params, "elicitation_id", None),
        )
        try:
            with anyio.fail_after(ELICITATION_TIMEOUT):
                answer = await handler(request)
            if answer.action not in ("accept", "decline", "cancel"):
                raise AnswerInvalid(f"action {str(answer.action)[:20]!r} is not accept, decline or cancel")
            content = None
            if answer.action == "accept" and form is not None:
                content = validate_answer(form, answer.content)
        except TimeoutError:
            why = f"no answer within {ELICITATION_TIMEOUT:g}s"
            self._elicitation_record(server.name, digest, True, why, "cancel", started)
            return types.ElicitResult(action="cancel")
        except AnswerInvalid as exc:
            why = f"the answer does not fit the requested schema: {exc.reason}"
            self._elicitation_record(server.name, digest, True, why, "error", started)
            return types.ErrorData(code=types.INTERNAL_ERROR, message=why)
        except Exception as exc:  # a failing handler must not take the connection down
            log.warning("elicitation handler failed", server=server.name, error=repr(exc)[:200])
            why = f"the elicitation handler failed: {type(exc).__name__}"
            self._elicitation_record(server.name, digest, True, why, "cancel", started)
            return types.ElicitResult(action="cancel")
        self._elicitation_record(
            server.name,
            digest,
            True,
            answer.reason,
            answer.action,
            started,
            audit_answer(form, content, self.secrets),
        )
        if answer.action == "accept" and form is not None:
            return types.ElicitResult(action="accept", content=content)
        return types.ElicitResult(action=answer.action)

    def _elicitation_record(
        self,
        server: str,
        digest: Mapping[str, Any],
        allowed: bool,
        reason: str | None,
        outcome: str,
        started: float,
        answer: Mapping[str, Any] | None = None,
    ) -> None:
        self._write(
            request_record(
                event="elicitation",
                server=server,
                method=ELICITATION_METHOD,
                digest=digest,
                allowed=allowed,
                reason=reason,
                outcome=outcome,
                duration=time.perf_counter() - started,
                answer=answer,
                secrets=self.secrets,
            )
        )

    def _write(self, record: Any) -> None:
        if self.audit is not None:
            self.audit.write(record)
