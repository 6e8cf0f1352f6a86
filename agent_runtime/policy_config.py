"""The `policies` config section: global defaults, per-server and per-tool overrides, validated with
file/line-aware errors and resolved into one frozen policy per (server, tool).

```json
"policies": {
  "deny": ["*delete*"], "approval": "destructive", "roots": ["./workspace"],
  "breaker": {"failure_rate": 0.5}, "audit_path": "audit.jsonl",
  "servers": {"fs": {"path_args": ["path", "paths"], "tools": {"write_file": {"approval": "always"}}}}
}
```
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent_runtime.config import format_path, section_error
from agent_runtime.config_types import RuntimeConfig
from agent_runtime.errors import ConfigError
from policies.approval import ApprovalMode
from policies.arguments import ArgumentLimits
from policies.breaker import BreakerSettings
from policies.egress import EgressPolicy
from policies.globs import ToolFilter
from policies.launch import SAFE_INHERITED, LaunchPolicy, launch_problem
from policies.output import DEFAULT_MAX_OUTPUT_CHARS
from policies.retry import RetrySettings
from transports.targets import StdioTarget

PinningMode = Literal["tofu", "strict", "off"]
LOCK_FILE_NAME = "agent-runtime.lock.json"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BreakerModel(_Model):
    window_size: int = Field(20, ge=1, le=10_000)
    failure_rate: float = Field(0.5, gt=0, le=1)
    minimum_calls: int = Field(5, ge=1)
    slow_call_seconds: float = Field(10.0, gt=0)
    slow_call_rate: float = Field(1.0, gt=0, le=1)
    open_seconds: float = Field(2.0, gt=0)
    open_multiplier: float = Field(2.0, ge=1)
    open_max_seconds: float = Field(60.0, gt=0)
    half_open_probes: int = Field(1, ge=1)
    per_tool: bool = False  # also keep one breaker per tool


class RetryModel(_Model):
    max_attempts: int = Field(3, ge=1, le=20)
    initial_backoff: float = Field(0.1, ge=0)
    max_backoff: float = Field(2.0, ge=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.1, ge=0)


class ArgumentsModel(_Model):
    max_string_bytes: int = Field(1024 * 1024 - 1, ge=1)
    max_depth: int = Field(32, ge=1, le=1000)
    max_total_bytes: int = Field(4 * 1024 * 1024 - 64 * 1024, ge=1)


class LaunchModel(_Model):
    """Checked for every stdio server when the policies load (before anything is spawned). The child
    environment is already minimal (transports.stdio.build_env: the SDK's safe set + the server's env)."""

    allowed_commands: list[str] = Field(default_factory=list)  # globs; empty allows any command


class ToolRules(_Model):
    """Overrides for one tool (keyed by its un-namespaced name, globs allowed)."""

    timeout: float | None = Field(None, gt=0)
    safe: bool | None = None  # safe to retry after the request was sent
    approval: ApprovalMode | None = None
    max_output_chars: int | None = Field(None, ge=1)
    path_args: list[str] | None = None
    url_args: list[str] | None = None
    breaker: BreakerModel | None = None  # a tool-level breaker with these settings


class Rules(_Model):
    """Settings valid at the global level and per server; a server's value replaces the global one,
    except `deny`, which accumulates."""

    allow: list[str] | None = None
    deny: list[str] | None = None
    roots: list[str] | None = None  # path confinement; unset: off
    path_args: list[str] | None = None
    url_args: list[str] | None = None
    egress: bool | None = None  # check URL arguments (on by default)
    egress_allow: list[str] | None = None  # host globs and CIDR networks
    approval: ApprovalMode | None = None
    max_output_chars: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)  # tool timeout override
    max_concurrent_calls: int | None = Field(None, ge=1)
    safe_tools: list[str] | None = None  # globs of tools safe to retry after sending
    breaker: BreakerModel | None = None  # fields set here replace the global ones, field by field
    retry: RetryModel | None = None
    arguments: ArgumentsModel | None = None


class ServerRules(Rules):
    tools: dict[str, ToolRules] = Field(default_factory=dict)


class PoliciesModel(Rules):
    servers: dict[str, ServerRules] = Field(default_factory=dict)
    tools: dict[str, ToolRules] = Field(default_factory=dict)  # keys: `tool` or `server/tool` globs
    pinning: PinningMode = "tofu"
    lock_file: str | None = None
    audit_path: str | None = None
    approval_timeout: float = Field(60.0, gt=0)
    max_concurrent_calls_global: int | None = Field(None, ge=1)
    launch: LaunchModel = Field(default_factory=LaunchModel)


@dataclass(frozen=True, slots=True)
class ToolPolicy:
    """Everything the executor needs to decide one tool's calls; resolved once and cached."""

    server: str
    tool: str
    filter: ToolFilter
    roots: tuple[str, ...] | None
    path_args: tuple[str, ...]
    egress: EgressPolicy | None
    approval: ApprovalMode
    max_output_chars: int
    timeout: float | None
    safe: bool | None
    breaker: BreakerSettings
    tool_breaker: BreakerSettings | None
    retry: RetrySettings
    arguments: ArgumentLimits


@dataclass(slots=True)
class PolicyConfig:
    """The validated section plus where relative paths resolve; `for_tool` gives the effective policy."""

    model: PoliciesModel
    base_dir: Path
    _cache: dict[tuple[str, str], ToolPolicy] = field(default_factory=dict)

    @property
    def lock_file(self) -> Path:
        return self._path(self.model.lock_file or LOCK_FILE_NAME)

    @property
    def audit_path(self) -> Path | None:
        return self._path(self.model.audit_path) if self.model.audit_path else None

    @property
    def launch(self) -> LaunchPolicy:
        return LaunchPolicy(tuple(self.model.launch.allowed_commands), SAFE_INHERITED)

    def max_concurrent_calls(self, server: str, default: int | None) -> int | None:
        rules = self.model.servers.get(server)
        if rules is not None and rules.max_concurrent_calls is not None:
            return rules.max_concurrent_calls
        return self.model.max_concurrent_calls if self.model.max_concurrent_calls is not None else default

    def for_tool(self, server: str, tool: str) -> ToolPolicy:
        key = (server, tool)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._resolve(server, tool)
        return found

    def _resolve(self, server: str, tool: str) -> ToolPolicy:
        g = self.model
        s = g.servers.get(server) or ServerRules()
        t = _merge_tool_rules(
            [r for pat, r in g.tools.items() if _tool_key_matches(pat, server, tool)]
            + [r for pat, r in s.tools.items() if fnmatchcase(tool, pat)]
        )

        def pick(name: str) -> Any:
            for layer in (t, s, g):
                value = getattr(layer, name, None)
                if value is not None:
                    return value
            return None

        roots = s.roots if s.roots is not None else g.roots
        egress_on = pick("egress")
        breaker_model = BreakerModel(**_layered(g.breaker, s.breaker))
        breaker = BreakerSettings(**breaker_model.model_dump(exclude={"per_tool"}))
        tool_breaker = None
        if t.breaker is not None:
            tool_breaker = BreakerSettings(**t.breaker.model_dump(exclude={"per_tool"}))
        elif breaker_model.per_tool:
            tool_breaker = breaker
        safe = t.safe
        if safe is None and any(fnmatchcase(tool, p) for p in (s.safe_tools or g.safe_tools or [])):
            safe = True
        return ToolPolicy(
            server=server,
            tool=tool,
            filter=ToolFilter.of(
                s.allow if s.allow is not None else (g.allow or []), [*(g.deny or []), *(s.deny or [])]
            ),
            roots=tuple(str(self._path(r)) for r in roots) if roots is not None else None,
            path_args=tuple(pick("path_args") or ()),
            egress=None
            if egress_on is False
            else EgressPolicy.of(
                allow=(s.egress_allow if s.egress_allow is not None else g.egress_allow) or (),
                url_args=pick("url_args") or (),
            ),
            approval=pick("approval") or "never",
            max_output_chars=pick("max_output_chars") or DEFAULT_MAX_OUTPUT_CHARS,
            timeout=pick("timeout"),
            safe=safe,
            breaker=breaker,
            tool_breaker=tool_breaker,
            retry=RetrySettings(**RetryModel(**_layered(g.retry, s.retry)).model_dump()),
            arguments=ArgumentLimits(**ArgumentsModel(**_layered(g.arguments, s.arguments)).model_dump()),
        )

    def _path(self, value: str) -> Path:
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def _merge_tool_rules(layers: list[ToolRules]) -> ToolRules:
    merged: dict[str, Any] = {}
    for layer in layers:  # later (more specific) layers win
        merged.update(layer.model_dump(exclude_none=True, exclude_unset=True))
    return ToolRules(**merged)


def _tool_key_matches(pattern: str, server: str, tool: str) -> bool:
    return fnmatchcase(f"{server}/{tool}", pattern) if "/" in pattern else fnmatchcase(tool, pattern)


def _layered(*models: BaseModel | None) -> dict[str, Any]:
    """Fields explicitly set, later models winning: a server's `breaker: {"minimum_calls": 2}` keeps the
    global failure rate."""
    merged: dict[str, Any] = {}
    for m in models:
        if m is not None:
            merged.update(m.model_dump(exclude_unset=True))
    return merged


def load_policies(config: RuntimeConfig) -> PolicyConfig:
    """Validate `config.sections["policies"]`; raises ConfigError naming the file, line and JSON path."""
    raw = config.sections.get("policies", {}) if config.sections else {}
    base_dir = config.path.parent if config.path is not None else Path.cwd()
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise _section_error(config, "policies", "the policies section must be a JSON object")
    try:
        model = PoliciesModel.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = _json_path(("policies", *err["loc"]))
        hint = None
        if err["type"] == "extra_forbidden":
            hint = "known keys: " + ", ".join(sorted(_known_keys(err["loc"][:-1])))
        raise _section_error(config, where, err["msg"], hint) from None
    known = {s.name for s in config.servers}
    for name in model.servers:
        if name not in known:
            raise _section_error(
                config,
                _json_path(("policies", "servers", name)),
                f"no server named {name!r} is configured",
                f"configured servers: {', '.join(sorted(known)) or '(none)'}",
            )
    for name in ["", *model.servers]:
        merged = BreakerModel(**_layered(model.breaker, model.servers[name].breaker if name else None))
        if merged.open_max_seconds < merged.open_seconds:
            path = ("policies", "servers", name, "breaker") if name else ("policies", "breaker")
            raise _section_error(config, _json_path(path), "open_max_seconds must be >= open_seconds")
        retry = RetryModel(**_layered(model.retry, model.servers[name].retry if name else None))
        if retry.max_backoff < retry.initial_backoff:
            path = ("policies", "servers", name, "retry") if name else ("policies", "retry")
            raise _section_error(config, _json_path(path), "max_backoff must be >= initial_backoff")
    policy = PolicyConfig(model, base_dir)
    for server in config.servers:
        target = server.target
        if isinstance(target, StdioTarget) and server.enabled:
            problem = launch_problem(target.command, target.args, policy.launch)
            if problem is not None:
                raise _section_error(
                    config,
                    "policies.launch.allowed_commands" if "allowlist" in problem else "policies.launch",
                    f"server {server.name!r}: {problem}",
                    "list the command in policies.launch.allowed_commands, or remove the server",
                )
    return policy


def _known_keys(loc: tuple[Any, ...]) -> set[str]:
    model: type[BaseModel] = PoliciesModel
    for part in loc:
        if part == "servers" and model is PoliciesModel:
            model = ServerRules
        elif part == "tools":
            model = ToolRules
        elif part == "launch":
            model = LaunchModel
        elif isinstance(part, str) and part in {"breaker", "retry", "arguments"}:
            model = {"breaker": BreakerModel, "retry": RetryModel, "arguments": ArgumentsModel}[part]
    return set(model.model_fields)


def _json_path(parts: tuple[Any, ...]) -> str:
    return format_path(tuple(p for p in parts if isinstance(p, int | str)))


def _section_error(
    config: RuntimeConfig, json_path: str, reason: str, hint: str | None = None
) -> ConfigError:
    return section_error(config, json_path, reason, hint)
