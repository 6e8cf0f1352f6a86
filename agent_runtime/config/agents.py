"""The `agents` and `model` sections of the config: pydantic models, defaults, and errors that point into the file."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent_runtime.config.loader import section_error
from agent_runtime.config.positions import format_path
from agent_runtime.config.types import RuntimeConfig
from agent_runtime.errors import ConfigError

DEFAULT_AGENT = "default"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant. You answer questions by calling tools."


class ExampleCallModel(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tool: str = Field(min_length=1)
    arguments: dict[str, Any] = Field(default_factory=dict)
    result: str


class WorkedExampleModel(BaseModel):
    """One few-shot example shown to the model as real chat turns: task, tool call(s), result(s), answer
    (`inference.formats.WorkedExample` once validated)."""

    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1)
    calls: list[ExampleCallModel] = Field(default_factory=list)
    answer: str = Field(min_length=1)


class ResourceRefModel(BaseModel):
    """A resource given to an agent as context: a URI, and the server to read it from when several (or none)
    list it. A plain string in the config is the URI."""

    model_config = ConfigDict(extra="forbid")
    uri: str = Field(min_length=1)
    server: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return {"uri": value} if isinstance(value, str) else value


class PromptRefModel(BaseModel):
    """A server's prompt whose messages seed an agent's conversation (before the task)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1)
    server: str | None = None
    arguments: dict[str, str] = Field(default_factory=dict)


class AgentConfig(BaseModel):
    """One agent: what it is told, which tools it sees, and the budgets that end its runs."""

    model_config = ConfigDict(extra="forbid")
    name: str = DEFAULT_AGENT
    description: str = ""
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    tools: list[str] = Field(default_factory=lambda: ["*"])  # globs over namespaced tool names
    max_steps: int = Field(default=8, ge=1, le=1000)
    max_tool_calls: int = Field(default=16, ge=0, le=10_000)
    timeout_secs: float = Field(default=300.0, gt=0, le=86_400)
    tool_timeout_secs: float | None = Field(default=None, gt=0)
    temperature: float = Field(default=0.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_tokens: int = Field(default=256, ge=1, le=32_768)  # per model turn
    seed: int | None = None
    tool_choice: str = "auto"  # auto | required | none | a tool name (for the first step)
    parallel_tool_calls: int = Field(default=4, ge=1, le=64)
    # `policy`: calls go through the runtime's approval policy; `never`: destructive tools are not offered.
    approval: Literal["policy", "never"] = "policy"
    tool_format: Literal["auto", "json", "hermes", "llama3", "mistral"] = "auto"
    constrained: bool = True  # grammar-constrained actions on the local engine
    # Two-stage actions on the local engine (our JSON format): the tool name from the few routed tools, then its
    # arguments under its own schema, grounded in the task and observations (docs/agents.md, "Small models").
    guided: bool = True
    route_tools: int = Field(default=3, ge=1, le=64)  # tools offered per step when guided
    # remember verified single-call runs on disk (by tool definition) and show them to later runs as examples
    learn_examples: bool = True
    # a guided answer starts with the values of the result lines that fit the task (docs/agents.md, "Small models")
    quote_results: bool = True
    thoughts: bool = False  # let the model write an optional "thought" before each action
    observation_max_tokens: int = Field(default=512, ge=16, le=100_000)
    examples: list[WorkedExampleModel] | None = None  # None: the built-in generic examples
    model: str | None = None  # a model source overriding the `model` section for this agent
    adapter: str | None = None  # a LoRA adapter of the model's `adapters` that this agent's turns run under
    # read at the start of each run and placed in the system prompt, at most resources_max_chars in all
    resources: list[ResourceRefModel] = Field(default_factory=list, max_length=64)
    resources_max_chars: int = Field(default=16_000, ge=256, le=1_000_000)
    prompt: PromptRefModel | None = None  # its messages open the conversation of a session's first turn

    @field_validator("tools")
    @classmethod
    def _tools_not_empty(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError('an agent needs at least one tool glob (use ["*"] for every tool)')
        for glob in v:
            if not isinstance(glob, str) or not glob.strip():
                raise ValueError("tool globs must be non-empty strings")
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, v: str) -> str:
        if not v:
            raise ValueError("tool_choice must be auto, required, none or a tool name")
        return v

    @model_validator(mode="after")
    def _budgets(self) -> AgentConfig:
        if self.tool_choice == "required" and self.max_tool_calls == 0:
            raise ValueError("tool_choice `required` with max_tool_calls 0 can never finish")
        return self

    def sees(self, tool_name: str) -> bool:
        return any(fnmatch.fnmatchcase(tool_name, g) for g in self.tools)


class ModelSettings(BaseModel):
    """The `model` section: which model the local engine loads, how (dtype, device, quantization: the loader's
    arguments, `agent_runtime.agents.llm.load_options`) and how big its batches and KV cache are (the engine's own
    settings type is `inference.config.EngineConfig`; `agent_runtime.agents.llm.engine_config` converts, copying
    the fields the two share by name)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["local", "openai"] = (
        "local"  # `openai`: agent_runtime.agents.openai_backend reads the rest
    )
    source: str = "smollm2-135m-instruct"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: the GPU when torch sees one (bf16, fp16 on pre-Ampere cards), else the CPU (bf16 where it is fast)
    device: Literal["auto", "cuda", "cpu"] = "auto"
    # bytes, or a fraction (<= 1) of free memory; unset: profiled on CUDA, a capped quarter of free RAM on the CPU
    kv_cache_memory: int | float | None = Field(default=None, gt=0)
    # CUDA: the share of the GPU's memory the engine may use (weights, activations and KV cache together)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    enforce_eager: bool = False  # CUDA: no CUDA-graph decode (every step runs eagerly)
    max_num_seqs: int = Field(default=64, ge=1, le=4096)
    max_num_batched_tokens: int = Field(default=2048, ge=16)
    max_model_len: int | None = Field(default=None, ge=16)
    block_size: int = Field(default=16, ge=1, le=1024)
    enable_prefix_caching: bool = True
    # LoRA adapters in PEFT's format, name -> folder (docs/adapters.md); agents pick one with `adapter`
    adapters: dict[str, str] = Field(default_factory=dict)
    max_loras: int = Field(default=4, ge=1, le=256)  # adapters resident at once (and so in one step)
    # CUDA: the rank each projection's LoRA kernel buffers hold (larger adapters run on torch, eagerly)
    max_lora_rank: int = Field(default=16, ge=1, le=1024)
    # how LoRA updates run: auto (Triton kernels on CUDA, torch elsewhere), torch, or triton (CUDA only)
    lora_kernels: Literal["auto", "torch", "triton"] = "auto"
    # weights: auto (a GGUF stays quantized on a bf16 CPU model, else float), none (float), int8 or int4 (CPU)
    quantize: Literal["auto", "none", "int8", "int4"] = "auto"
    quantize_group_size: Literal[32, 64, 128, 256] = 32  # int4: inputs per scale
    # CPU: decode steps of up to 8 rows through torch.compile (1-3 minutes the first time, then inductor's disk cache)
    compile: bool = False
    # CPU: decode steps in one C++ call where every projection runs our int8/int4 kernel (a GGUF or quantized model)
    fused_decode: bool = True


def _error(config: RuntimeConfig, base: tuple[str | int, ...], exc: ValidationError) -> ConfigError:
    first = exc.errors()[0]
    loc = tuple(p for p in first.get("loc", ()) if p != "__root__")
    path = format_path((*base, *loc))
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return section_error(config, path, msg, "see docs/agents.md for the agents and model sections")


def load_model_settings(config: RuntimeConfig) -> ModelSettings:
    raw = config.sections.get("model")
    if raw is None:
        return ModelSettings()
    if isinstance(raw, str):  # shorthand: "model": "smollm2-135m-instruct"
        raw = {"source": raw}
    if not isinstance(raw, Mapping):
        raise section_error(config, "model", "`model` must be an object or a model source string")
    body = dict(raw)
    if body.get("backend") == "openai":  # a remote model: its own keys belong to OpenAIBackendSettings
        body = {k: v for k, v in body.items() if k in ModelSettings.model_fields}
    try:
        return ModelSettings.model_validate(body)
    except ValidationError as exc:
        raise _error(config, ("model",), exc) from None


def load_agents(config: RuntimeConfig) -> dict[str, AgentConfig]:
    """Every configured agent by name, plus `default` (sees every tool) unless the config defines one."""
    raw = config.sections.get("agents")
    agents: dict[str, AgentConfig] = {}
    if raw is not None and not isinstance(raw, Mapping):
        raise section_error(config, "agents", "`agents` must be an object mapping agent names to settings")
    for name, body in (raw or {}).items():
        if not isinstance(body, Mapping):
            raise section_error(config, f"agents.{name}", "an agent must be an object")
        try:
            agents[name] = AgentConfig.model_validate({**body, "name": name})
        except ValidationError as exc:
            raise _error(config, ("agents", name), exc) from None
    agents.setdefault(DEFAULT_AGENT, AgentConfig())
    return agents
