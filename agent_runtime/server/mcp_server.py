"""MCP server mode: agents served to MCP hosts (Claude Desktop) as `run_agent` / `list_agents`, with agent steps
as progress and log notifications (the host may cancel a run), optionally re-exporting the connected servers'
tools under their namespaced names."""

from __future__ import annotations

import json
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import aclosing
from typing import Any, get_args

import anyio
import mcp_types as types
import structlog
from mcp.server.connection import allowed_log_levels
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import NotificationOptions, Server
from mcp.server.stdio import stdio_server
from mcp.shared.exceptions import MCPDeprecationWarning, MCPError
from mcp_types import INVALID_PARAMS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from agent_runtime import __version__
from agent_runtime.server.agents import ServedAgents
from policies.secrets import redact

log = structlog.get_logger(__name__)

RUN_AGENT = "run_agent"
LIST_AGENTS = "list_agents"
OWN_TOOLS = (RUN_AGENT, LIST_AGENTS)
LOGGER = "agent-runtime"  # the `logger` of our log notifications
DEFAULT_LOG_LEVEL: types.LoggingLevel = "info"  # until the host sends logging/setLevel
_LEVELS: tuple[types.LoggingLevel, ...] = get_args(types.LoggingLevel)  # severity ascending (RFC 5424)
RETRY_MS = 1000  # the SSE `retry` (ms) we ask hosts to wait before resuming a broken stream (--http)
_MAX_LEVELS_KEPT = 1024  # connections whose level we remember (HTTP sessions come and go)


def _text(text: str, *, error: bool = False, structured: Any = None) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=text)], is_error=error, structured_content=structured
    )


class AgentMCPServer:
    """Builds the low-level MCP server; one instance serves one stdio connection or the HTTP endpoint."""

    def __init__(
        self, agents: ServedAgents | None, runtime: Any | None = None, *, reexport: bool = False
    ) -> None:
        self.agents = agents
        self.runtime = runtime
        self.reexport = reexport and runtime is not None
        # The level each connection asked for (key: its HTTP session id; None for stdio and in-process).
        self._log_levels: OrderedDict[str | None, types.LoggingLevel] = OrderedDict()
        with warnings.catch_warnings():
            # logging/setLevel is deprecated from 2026-07-28 on, but 2025-era hosts (most of them) use it.
            warnings.simplefilter("ignore", MCPDeprecationWarning)
            self.server: Server[Any] = Server(
                "agent-runtime",
                version=__version__,
                instructions="Run agent-runtime's tool-using agents on a task (run_agent); list_agents names "
                "them.",
                on_list_tools=self._list_tools,
                on_call_tool=self._call_tool,
                on_set_logging_level=self._set_log_level,
            )

    def initialization_options(self) -> Any:
        return self.server.create_initialization_options(NotificationOptions(tools_changed=self.reexport))

    # -- logging --------------------------------------------------------------------------------------------

    async def _set_log_level(
        self, ctx: ServerRequestContext[Any], params: types.SetLevelRequestParams
    ) -> types.EmptyResult:
        key = _connection_key(ctx)
        self._log_levels.pop(key, None)
        self._log_levels[key] = params.level
        while len(self._log_levels) > _MAX_LEVELS_KEPT:
            self._log_levels.popitem(last=False)
        log.info("host set the log level", level=params.level)
        return types.EmptyResult()

    def log_level(self, ctx: ServerRequestContext[Any]) -> types.LoggingLevel:
        return self._log_levels.get(_connection_key(ctx), DEFAULT_LOG_LEVEL)

    async def _host_log(
        self, ctx: ServerRequestContext[Any], level: types.LoggingLevel, data: dict[str, Any]
    ) -> None:
        """A `notifications/message` on this request's stream, if the host wants that level: on 2025-era
        connections at or above its logging/setLevel (default info), on 2026-07-28 only at or above the
        level the request itself opted into (its `_meta`), as that era asks. Its message is redacted."""
        if level not in allowed_log_levels(ctx.protocol_version, ctx.meta):
            return
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS and _LEVELS.index(level) < _LEVELS.index(
            self.log_level(ctx)
        ):
            return
        data = {**data, "message": redact(str(data.get("message", "")))}
        notification = types.LoggingMessageNotification(
            params=types.LoggingMessageNotificationParams(level=level, data=data, logger=LOGGER)
        )
        await ctx.session.send_notification(notification, related_request_id=ctx.request_id)

    # -- tools/list -----------------------------------------------------------------------------------------

    def tools(self) -> list[types.Tool]:
        names = self.agents.names() if self.agents is not None else []
        agent_prop: dict[str, Any] = {"type": "string", "description": "which agent (default: the first)"}
        if names:
            agent_prop["enum"] = names
        tools = [
            types.Tool(
                name=RUN_AGENT,
                description="Run an agent on a task: it calls its MCP tools as needed and returns its final "
                "answer. Steps are reported as progress notifications. Agents: "
                + (", ".join(names) or "none"),
                input_schema={
                    "type": "object",
                    "properties": {
                        "task": {"type": "string", "description": "what the agent should do", "minLength": 1},
                        "agent": agent_prop,
                    },
                    "required": ["task"],
                    "additionalProperties": False,
                },
                annotations=types.ToolAnnotations(read_only_hint=False, open_world_hint=True),
            ),
            types.Tool(
                name=LIST_AGENTS,
                description="List the configured agents with their descriptions.",
                input_schema={"type": "object", "properties": {}, "additionalProperties": False},
                annotations=types.ToolAnnotations(read_only_hint=True, idempotent_hint=True),
            ),
        ]
        if self.reexport:
            tools.extend(self._reexported())
        return tools

    def _reexported(self) -> Iterator[types.Tool]:
        assert self.runtime is not None
        for entry in self.runtime.offered_tools():  # quarantined tools are not shown until approved
            if entry.name in OWN_TOOLS:
                continue  # our own names win; the namespaced prefix makes this rare
            d = entry.definition
            yield types.Tool(
                name=entry.name,
                title=getattr(d, "title", None),
                description=d.description,
                input_schema=dict(d.input_schema),
                output_schema=getattr(d, "output_schema", None),
                annotations=d.annotations,
            )

    async def _list_tools(self, ctx: ServerRequestContext[Any], params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=self.tools())

    # -- tools/call -----------------------------------------------------------------------------------------

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        args = params.arguments or {}
        if params.name == LIST_AGENTS:
            agents = self.agents
            rows = [{"name": n, "description": agents.describe(n)} for n in agents.names()] if agents else []
            return _text(json.dumps(rows, ensure_ascii=False), structured={"agents": rows})
        if params.name == RUN_AGENT:
            return await self._run_agent(ctx, args)
        if self.reexport:
            return await self._forward(params.name, args)
        raise MCPError(code=INVALID_PARAMS, message=f"unknown tool {params.name!r}")

    async def _run_agent(self, ctx: ServerRequestContext[Any], args: dict[str, Any]) -> types.CallToolResult:
        task = args.get("task")
        if not isinstance(task, str) or not task.strip():
            return _text("`task` must be a non-empty string", error=True)
        names = self.agents.names() if self.agents is not None else []
        if not names or self.agents is None:
            return _text("no agents are configured (add an `agents` section to the config)", error=True)
        agent = args.get("agent") or names[0]
        if agent not in names:
            return _text(f"no agent named {agent!r}; agents: {', '.join(names)}", error=True)
        step = 0
        final = None
        try:
            async with aclosing(self.agents.stream(agent, [{"role": "user", "content": task}])) as run:
                async for item in run:
                    if item.kind == "step":
                        step += 1
                        text = item.text[:1000]
                        await ctx.session.report_progress(step, None, text or None)
                        await self._host_log(ctx, "info", {"agent": agent, "step": step, "message": text})
                    elif item.kind == "final":
                        final = item
        except anyio.get_cancelled_exc_class():
            # The host cancelled (notifications/cancelled) or went away: the agent's generator has been closed
            # (its model request aborted, its engine sequence freed); nothing more goes to the host for it.
            log.info("agent run cancelled", agent=agent, steps=step)
            raise
        except Exception as exc:
            # A user-facing error (model or tool layer) is the tool's result, not a protocol failure.
            if not getattr(exc, "user_facing", False):
                log.exception("agent run failed", agent=agent)
            await self._host_log(ctx, "error", {"agent": agent, "step": step, "message": f"failed: {exc}"})
            return _text(f"agent {agent!r} failed: {exc}", error=True)
        if final is None:
            await self._host_log(
                ctx, "error", {"agent": agent, "step": step, "message": "ended without an answer"}
            )
            return _text(f"agent {agent!r} ended without an answer", error=True)
        failed = final.data.get("finish_reason") not in (None, "stop")
        structured = {
            "answer": final.text,
            "agent": agent,
            "steps": step,
            **{k: v for k, v in final.data.items() if k != "answer"},
        }
        finish = final.data.get("finish_reason") or "stop"
        outcome = final.data.get("stop_reason") or finish
        message = f"finished ({outcome}) after {step} steps"
        level: types.LoggingLevel = "info"
        if failed:  # an error ends at error level, a limit (steps, time) at warning
            level = "error" if finish == "error" else "warning"
            message += f": {final.text[:500]}"
        await self._host_log(ctx, level, {"agent": agent, "step": step, "message": message})
        return _text(final.text, error=failed, structured=structured)

    async def _forward(self, name: str, args: dict[str, Any]) -> types.CallToolResult:
        """A re-exported tool: through the executor's policy pipeline when the runtime has one."""
        assert self.runtime is not None
        executor = getattr(self.runtime, "executor", None)
        if executor is not None:
            outcome = await executor.execute(name, args, agent="mcp-server")
            result = getattr(outcome, "result", None)
            if result is not None:
                return result  # the server's own result (content, structured content, is_error)
            return _text(outcome.text(), error=not outcome.ok)
        try:
            return await self.runtime.call_tool(name, args)
        except Exception as exc:
            if getattr(exc, "user_facing", False):
                return _text(str(exc), error=True)
            raise


def _connection_key(ctx: ServerRequestContext[Any]) -> str | None:
    """Which host connection a request came on: its HTTP session id (None on stdio and in-process, one
    connection each)."""
    headers = getattr(ctx.request, "headers", None)
    return headers.get("mcp-session-id") if headers is not None else None


async def serve_stdio(server: AgentMCPServer) -> None:
    """Serve one host over this process's stdin/stdout until stdin closes (the SDK diverts stray stdout
    writes to stderr, so only JSON-RPC reaches the host)."""
    async with stdio_server() as (read, write):
        await server.server.run(read, write, server.initialization_options())
