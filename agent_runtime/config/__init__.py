"""Configuration: the config file's dialects (Claude Desktop, VS Code, mistral.rs) loaded into one normalised
`RuntimeConfig`, our sections (`runtime`, `policies`, `model`, `agents`), and the secrets a config holds.

The lowest layer of `agent_runtime`: it imports only `agent_runtime.errors`, `policies` and `transports.targets`.
The pydantic models (`models`, `agents`) load only when a file has something to validate (CLI cold start).
"""

from agent_runtime.config.loader import (
    DEFAULT_FILE,
    ENV_VAR,
    STATE_DIR_ENV,
    adhoc_config,
    default_config_path,
    load_config,
    parse_config,
    section_error,
    state_dir,
)
from agent_runtime.config.secrets import redact_config, redacted_target, secret_values
from agent_runtime.config.types import (
    ReconnectPolicy,
    RuntimeConfig,
    RuntimeSettings,
    ServerConfig,
    ServerTimeouts,
)

__all__ = [
    "DEFAULT_FILE",
    "ENV_VAR",
    "STATE_DIR_ENV",
    "ReconnectPolicy",
    "RuntimeConfig",
    "RuntimeSettings",
    "ServerConfig",
    "ServerTimeouts",
    "adhoc_config",
    "default_config_path",
    "load_config",
    "parse_config",
    "redact_config",
    "redacted_target",
    "secret_values",
    "section_error",
    "state_dir",
]
