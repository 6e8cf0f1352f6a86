"""The config file's schema as pydantic models: server entries in every dialect, `runtime`, `policies`.

Imported only when there is something to validate (pydantic costs ~0.1 s to import), so a file without
server entries or sections never loads it; agent_runtime.config.loader and agent_runtime.config.policies turn
validation errors into located ConfigErrors.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent_runtime.config.types import DEFAULT_APPROVAL_TIMEOUT, DEFAULT_PINNING, McpLogLevel, PinningMode
from policies.approval import ApprovalMode
from policies.elicitation import ElicitationMode
from policies.sampling import DEFAULT_MAX_TOKENS, SamplingApproval

# -- server entries and the runtime section (agent_runtime.config.loader) ------------------------------------------

PositiveSecs = Annotated[float, Field(gt=0, allow_inf_nan=False)]
PositiveInt = Annotated[int, Field(gt=0)]


class ConfigModel(BaseModel):
    # defer_build: a file uses one dialect, so only its models pay the schema build (CLI cold start)
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, defer_build=True)


class Timeouts(ConfigModel):
    startup_secs: PositiveSecs | None = None
    connect_secs: PositiveSecs | None = None
    request_secs: PositiveSecs | None = None
    tool_secs: PositiveSecs | None = None
    per_tool: dict[str, PositiveSecs] = Field(default_factory=dict)


class OAuthModel(ConfigModel):
    """`auth` of an HTTP/SSE server: OAuth 2.1 per the MCP authorization spec (tokens are kept outside the
    config, in the state directory or the OS keyring)."""

    type: Literal["oauth"]
    grant: Literal["authorization_code", "client_credentials"] = "authorization_code"
    client_id: str | None = None  # a pre-registered client (else metadata document or dynamic registration)
    client_secret: str | None = None
    issuer: str | None = None  # the authorization server the client belongs to (its secret goes only there)
    scopes: list[str] = Field(default_factory=list)
    redirect_port: int = Field(0, ge=0, le=65535)  # `auth login`'s loopback listener; 0: ephemeral
    redirect_uri: str | None = None  # a fixed loopback redirect, e.g. http://127.0.0.1:8765/callback
    client_metadata_url: str | None = None  # an https client ID metadata document
    store: Literal["file", "keyring"] = "file"


class Sampling(ConfigModel):
    """`sampling` of a server: may it ask our model for completions, and on what terms."""

    allow: bool = False
    max_tokens: PositiveInt = DEFAULT_MAX_TOKENS  # a request's maxTokens is clamped to this
    approval: SamplingApproval = "never"  # "always": a person approves each request (fails closed)
    models: dict[str, str] = Field(default_factory=dict)  # model-hint glob or priority -> our model


class RootEntry(ConfigModel):
    path: str  # a path (relative to the config file) or a file:// URI
    name: str | None = None


RootList = list[str | RootEntry]


class Common(ConfigModel):
    """Our per-server keys, accepted in every dialect."""

    timeouts: Timeouts | None = None
    enabled: bool | None = None
    tool_prefix: str | None = None
    trusted: bool = False
    bearer_token: str | None = None
    auth: OAuthModel | None = None
    max_concurrent_calls: PositiveInt | None = None
    kill_grace_secs: PositiveSecs | None = None
    max_message_bytes: PositiveInt | None = None  # one message from the server at most (runtime default)
    log_level: McpLogLevel | None = None  # the server's log messages we ask for and log (default info)
    sampling: Sampling | None = None  # off unless set with allow: true
    elicitation: ElicitationMode | None = None  # "decline" (default) or "ask" the person / the API handler
    roots: RootList | None = None  # roots advertised to this server (default: runtime.roots)


class ClaudeServer(Common):
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    transport: str | None = None
    type: str | None = None
    disabled: bool | None = None  # Cline / Roo Code spelling of enabled=false


class VSCodeServer(Common):
    type: str | None = None
    command: str | None = None
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)


class MistralProcess(ConfigModel):
    type: str
    command: str
    args: list[str] = Field(default_factory=list)
    work_dir: str | None = None
    env: dict[str, str] | None = None


class MistralRemote(ConfigModel):
    type: str
    url: str
    timeout_secs: PositiveSecs | None = None
    headers: dict[str, str] | None = None


class MistralServer(Common):
    id: str | None = None
    name: str | None = None
    source: dict[str, Any]
    resources: list[str] | None = None  # accepted for compatibility; resources are not used yet


class Reconnect(ConfigModel):
    initial_delay_secs: PositiveSecs = 0.5
    max_delay_secs: PositiveSecs = 30.0
    multiplier: Annotated[float, Field(ge=1.0, allow_inf_nan=False)] = 2.0
    jitter: Annotated[float, Field(ge=0.0, le=1.0, allow_inf_nan=False)] = 0.2


class RuntimeSection(ConfigModel):
    tool_timeout_secs: PositiveSecs | None = None
    max_concurrent_calls: PositiveInt | None = None
    max_concurrent_calls_global: PositiveInt | None = None
    shutdown_timeout_secs: PositiveSecs = 10.0
    reconnect: Reconnect = Field(default_factory=Reconnect)
    log_dir: str | None = None
    max_message_bytes: PositiveInt | None = None  # per message read from any server (default 32 MiB)
    roots: RootList = Field(default_factory=list)  # roots advertised to every server without its own


class MistralTop(ConfigModel):
    # null means "no timeout" in mistral.rs; here every call keeps a deadline, so null means our default
    tool_timeout_secs: PositiveSecs | None = None
    max_concurrent_calls: PositiveInt | None = None
    auto_register_tools: bool | None = None  # mistral.rs's; only true (every tool registered) is supported


# -- the policies section (agent_runtime.config.policies) ---------------------------------------------------


class PolicyModel(BaseModel):
    # defer_build: a policies section rarely uses every model; only those validated pay the schema build
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)


class BreakerModel(PolicyModel):
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


class RetryModel(PolicyModel):
    max_attempts: int = Field(3, ge=1, le=20)
    initial_backoff: float = Field(0.1, ge=0)
    max_backoff: float = Field(2.0, ge=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.1, ge=0)


class ArgumentsModel(PolicyModel):
    max_string_bytes: int = Field(1024 * 1024 - 1, ge=1)
    max_depth: int = Field(32, ge=1, le=1000)
    max_total_bytes: int = Field(4 * 1024 * 1024 - 64 * 1024, ge=1)
    max_validation_seconds: float = Field(0.1, gt=0, le=60)


class LaunchModel(PolicyModel):
    """Checked for every stdio server when the policies load (before anything is spawned). The child
    environment is minimal already (transports.stdio.build_env: the SDK's safe set + the server's env)."""

    allowed_commands: list[str] = Field(default_factory=list)  # globs; empty allows any command


class EgressModel(PolicyModel):
    """`egress: {"mode": "allowlist", "allow": [...]}`: only listed hosts and networks are reachable.
    `{"mode": "public"}` is the default (`egress: true`): public addresses, `allow` listing exceptions."""

    mode: Literal["public", "allowlist"] = "public"
    allow: list[str] = Field(default_factory=list)  # host globs and CIDR networks


class ToolRules(PolicyModel):
    """Overrides for one tool (keyed by its un-namespaced name, globs allowed)."""

    timeout: float | None = Field(None, gt=0)
    safe: bool | None = None  # safe to retry after the request was sent
    approval: ApprovalMode | None = None
    max_output_chars: int | None = Field(None, ge=1)
    path_args: list[str] | None = None
    url_args: list[str] | None = None
    breaker: BreakerModel | None = None  # a tool-level breaker with these settings


class Rules(PolicyModel):
    """Settings valid at the global level and per server; a server's value replaces the global one,
    except `deny`, which accumulates."""

    allow: list[str] | None = None
    deny: list[str] | None = None
    roots: list[str] | None = None  # path confinement; unset: off
    path_args: list[str] | None = None
    url_args: list[str] | None = None
    egress: bool | EgressModel | None = None  # check URL arguments (on by default); or a mode object
    egress_allow: list[str] | None = None  # host globs and CIDR networks
    approval: ApprovalMode | None = None
    max_output_chars: int | None = Field(None, ge=1)
    timeout: float | None = Field(None, gt=0)  # tool timeout override
    max_concurrent_calls: int | None = Field(None, ge=1)
    safe_tools: list[str] | None = None  # globs of tools safe to retry after sending
    breaker: BreakerModel | None = None  # fields set here replace the global ones, field by field
    retry: RetryModel | None = None
    arguments: ArgumentsModel | None = None

    @field_validator("egress", mode="before")
    @classmethod
    def _egress_object(cls, value: Any) -> Any:
        # An object is validated as EgressModel itself, so its errors name `egress.mode`, not a union branch.
        return EgressModel.model_validate(value) if isinstance(value, dict) else value


class ServerRules(Rules):
    tools: dict[str, ToolRules] = Field(default_factory=dict)


class PoliciesModel(Rules):
    servers: dict[str, ServerRules] = Field(default_factory=dict)
    tools: dict[str, ToolRules] = Field(default_factory=dict)  # keys: `tool` or `server/tool` globs
    pinning: PinningMode = DEFAULT_PINNING
    lock_file: str | None = None
    audit_path: str | None = None
    approval_timeout: float = Field(DEFAULT_APPROVAL_TIMEOUT, gt=0)
    max_concurrent_calls_global: int | None = Field(None, ge=1)
    launch: LaunchModel = Field(default_factory=LaunchModel)
