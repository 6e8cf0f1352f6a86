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
from typing import TYPE_CHECKING, Any

from agent_runtime.config.loader import section_error
from agent_runtime.config.positions import format_path
from agent_runtime.config.types import DEFAULT_APPROVAL_TIMEOUT, DEFAULT_PINNING, PinningMode, RuntimeConfig
from agent_runtime.errors import ConfigError
from policies.approval import ApprovalMode
from policies.arguments import ArgumentLimits
from policies.breaker import BreakerSettings
from policies.egress import EgressPolicy
from policies.globs import ToolFilter
from policies.launch import LaunchPolicy, launch_problem
from policies.output import DEFAULT_MAX_OUTPUT_CHARS
from policies.retry import RetrySettings
from transports.targets import StdioTarget

if TYPE_CHECKING:  # the section's pydantic models, imported only when there is a section to validate
    from pydantic import BaseModel

    from agent_runtime.config.models import PoliciesModel

LOCK_FILE_NAME = "agent-runtime.lock.json"


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
    """The validated section plus where relative paths resolve; `for_tool` gives the effective policy.

    `section` is None when the file has no policies (every default): start-up then reads the defaults
    below without importing pydantic, and `model` builds the default model on first use."""

    section: PoliciesModel | None
    base_dir: Path
    _cache: dict[tuple[str, str], ToolPolicy] = field(default_factory=dict)
    has_file: bool = True  # False for ad-hoc servers (CLI flags): nothing is written beside a config file

    @property
    def model(self) -> PoliciesModel:
        if self.section is None:
            self.section = _models().PoliciesModel()
        return self.section

    @property
    def pinning(self) -> PinningMode:
        return self.section.pinning if self.section is not None else DEFAULT_PINNING

    @property
    def approval_timeout(self) -> float:
        return self.section.approval_timeout if self.section is not None else DEFAULT_APPROVAL_TIMEOUT

    @property
    def max_concurrent_calls_global(self) -> int | None:
        return self.section.max_concurrent_calls_global if self.section is not None else None

    @property
    def lock_file(self) -> Path | None:
        """Where pins are kept; None (pins in memory only) for ad-hoc servers without a `lock_file`."""
        lock_file = self.section.lock_file if self.section is not None else None
        if lock_file is None and not self.has_file:
            return None
        return self.resolve_path(lock_file or LOCK_FILE_NAME)

    @property
    def audit_path(self) -> Path | None:
        audit_path = self.section.audit_path if self.section is not None else None
        return self.resolve_path(audit_path) if audit_path else None

    @property
    def launch(self) -> LaunchPolicy:
        allowed = self.section.launch.allowed_commands if self.section is not None else ()
        return LaunchPolicy(tuple(allowed))

    def max_concurrent_calls(self, server: str, default: int | None) -> int | None:
        g = self.section
        if g is None:
            return default
        rules = g.servers.get(server)
        if rules is not None and rules.max_concurrent_calls is not None:
            return rules.max_concurrent_calls
        return g.max_concurrent_calls if g.max_concurrent_calls is not None else default

    def for_tool(self, server: str, tool: str) -> ToolPolicy:
        key = (server, tool)
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = self._resolve(server, tool)
        return found

    def _resolve(self, server: str, tool: str) -> ToolPolicy:
        m = _models()
        g = self.model
        s = g.servers.get(server) or m.ServerRules()
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
        breaker_model = m.BreakerModel(**_layered(g.breaker, s.breaker))
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
            roots=tuple(str(self.resolve_path(r)) for r in roots) if roots is not None else None,
            path_args=tuple(pick("path_args") or ()),
            egress=None
            if egress_on is False
            else EgressPolicy.of(
                allow=[
                    *(getattr(egress_on, "allow", None) or ()),
                    *((s.egress_allow if s.egress_allow is not None else g.egress_allow) or ()),
                ],
                url_args=pick("url_args") or (),
                mode=getattr(egress_on, "mode", "public"),
            ),
            approval=pick("approval") or "never",
            max_output_chars=pick("max_output_chars") or DEFAULT_MAX_OUTPUT_CHARS,
            timeout=pick("timeout"),
            safe=safe,
            breaker=breaker,
            tool_breaker=tool_breaker,
            retry=RetrySettings(**m.RetryModel(**_layered(g.retry, s.retry)).model_dump()),
            arguments=ArgumentLimits(**m.ArgumentsModel(**_layered(g.arguments, s.arguments)).model_dump()),
        )

    def resolve_path(self, value: str) -> Path:
        """A path of the section (roots, files), relative to the config file's directory."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.base_dir / p).resolve()


def _models() -> Any:
    from agent_runtime.config import models  # pydantic's import (~0.1 s) only when there is a section

    return models


def _merge_tool_rules(layers: list[Any]) -> Any:
    merged: dict[str, Any] = {}
    for layer in layers:  # later (more specific) layers win
        merged.update(layer.model_dump(exclude_none=True, exclude_unset=True))
    return _models().ToolRules(**merged)


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
    if not raw:  # no section: every default, nothing to validate (and no pydantic to import)
        return _checked_launch(config, PolicyConfig(None, base_dir, has_file=config.path is not None))
    from pydantic import ValidationError

    m = _models()
    try:
        model = m.PoliciesModel.model_validate(raw)
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
        merged = m.BreakerModel(**_layered(model.breaker, model.servers[name].breaker if name else None))
        if merged.open_max_seconds < merged.open_seconds:
            path = ("policies", "servers", name, "breaker") if name else ("policies", "breaker")
            raise _section_error(config, _json_path(path), "open_max_seconds must be >= open_seconds")
        retry = m.RetryModel(**_layered(model.retry, model.servers[name].retry if name else None))
        if retry.max_backoff < retry.initial_backoff:
            path = ("policies", "servers", name, "retry") if name else ("policies", "retry")
            raise _section_error(config, _json_path(path), "max_backoff must be >= initial_backoff")
    return _checked_launch(config, PolicyConfig(model, base_dir, has_file=config.path is not None))


def _checked_launch(config: RuntimeConfig, policy: PolicyConfig) -> PolicyConfig:
    """Refuse (before anything is spawned) a stdio server the launch policy does not allow."""
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


def policy_warnings(config: RuntimeConfig, policy: PolicyConfig) -> list[str]:
    """What `config check` points out about path confinement that loads fine but may not do what its author
    meant: path_args where no roots apply (nothing is confined), roots whose path_args exclude every
    detected name and declare none (only `file:` URIs are checked), roots that do not exist, and roots on a
    network server (judged against this machine's files, relative paths denied)."""
    g = policy.section
    if g is None:
        return []
    m = _models()
    warnings: list[str] = []
    for server in config.servers:
        s = g.servers.get(server.name) or m.ServerRules()
        roots = s.roots if s.roots is not None else g.roots
        tool_path_args = [r.path_args for r in s.tools.values() if r.path_args is not None] + [
            r.path_args
            for pat, r in g.tools.items()
            if r.path_args is not None and ("/" not in pat or fnmatchcase(server.name, pat.split("/", 1)[0]))
        ]
        path_args = s.path_args if s.path_args is not None else g.path_args
        where = f"server {server.name!r}"
        if roots is None:
            if path_args or any(tool_path_args):
                warnings.append(
                    f"{where}: path_args is set but no roots apply, so no path is confined; "
                    "set policies.roots (or policies.servers.<name>.roots)"
                )
            continue
        if not roots:
            warnings.append(f"{where}: roots is empty, so every path-like argument is denied")
        positive = [p for p in (path_args or []) if not p.startswith("!")]
        if not positive and any(p in ("!*", "!**") for p in (path_args or [])) and not any(tool_path_args):
            warnings.append(
                f"{where}: roots are set but path_args excludes every argument name, so only file: URIs "
                "are checked; list the names that hold paths"
            )
        for root in roots:
            resolved = policy.resolve_path(root)
            if not resolved.is_dir():
                warnings.append(f"{where}: root {str(resolved)!r} is not an existing directory")
        if not isinstance(server.target, StdioTarget):
            warnings.append(
                f"{where}: roots on a network server are judged against this machine's files and its "
                "relative paths are denied; the server's own filesystem is not known here"
            )
    return warnings


def _known_keys(loc: tuple[Any, ...]) -> set[str]:
    m = _models()
    model: type[BaseModel] = m.PoliciesModel
    for part in loc:
        if part == "servers" and model is m.PoliciesModel:
            model = m.ServerRules
        elif part == "tools":
            model = m.ToolRules
        elif part == "launch":
            model = m.LaunchModel
        elif part == "egress":
            model = m.EgressModel
        elif isinstance(part, str) and part in {"breaker", "retry", "arguments"}:
            model = {"breaker": m.BreakerModel, "retry": m.RetryModel, "arguments": m.ArgumentsModel}[part]
    return set(model.model_fields)


def _json_path(parts: tuple[Any, ...]) -> str:
    return format_path(tuple(p for p in parts if isinstance(p, int | str)))


def _section_error(
    config: RuntimeConfig, json_path: str, reason: str, hint: str | None = None
) -> ConfigError:
    return section_error(config, json_path, reason, hint)
