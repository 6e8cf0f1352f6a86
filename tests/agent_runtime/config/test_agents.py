"""The `model` section's device, GPU-memory and quantization settings, and the CLI flags that override them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from agent_runtime.agents.llm import engine_config, load_options
from agent_runtime.cli import common, generate, mcp_server, run, serve
from agent_runtime.config import load_config
from agent_runtime.config.agents import ModelSettings, load_agents, load_model_settings
from agent_runtime.errors import AgentRuntimeError, ConfigError
from inference.config import EngineConfig


def config_with(tmp_path: Path, model: object) -> Path:
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(json.dumps({"mcpServers": {}, "model": model}, indent=2))
    return path


def test_defaults_are_auto_device_and_ninety_percent_of_the_gpu() -> None:
    settings = ModelSettings()
    assert settings.device == "auto" and settings.gpu_memory_utilization == 0.9
    # the engine's defaults; kv_cache_memory unset: profiled on CUDA, a share of RAM on the CPU
    assert engine_config(settings) == EngineConfig()


def test_model_section_accepts_devices_and_utilization(tmp_path: Path) -> None:
    for device in ("auto", "cuda", "cpu"):
        path = config_with(
            tmp_path,
            {
                "device": device,
                "gpu_memory_utilization": 0.75,
                "enforce_eager": True,
                "compile": True,
                "fused_decode": False,
            },
        )
        settings = load_model_settings(load_config(path, env={}))
        assert settings.device == device
        config = engine_config(settings)
        assert (
            config.gpu_memory_utilization == 0.75 and config.enforce_eager is True and config.compile is True
        )
        assert config.fused_decode is False


@pytest.mark.parametrize(
    ("model", "where"),
    [
        ({"device": "gpu"}, "model.device"),
        ({"device": "cuda:0"}, "model.device"),
        ({"gpu_memory_utilization": 1.5}, "model.gpu_memory_utilization"),
        ({"gpu_memory_utilization": 0}, "model.gpu_memory_utilization"),
        ({"quantize": "int3"}, "model.quantize"),
        ({"quantize": "q4_k"}, "model.quantize"),
        ({"quantize_group_size": 48}, "model.quantize_group_size"),
        ({"compile": "sometimes"}, "model.compile"),
        ({"fused_decode": "yes please"}, "model.fused_decode"),
    ],
)
def test_bad_values_are_config_errors_pointing_into_the_file(tmp_path: Path, model: dict, where: str) -> None:
    path = config_with(tmp_path, model)
    with pytest.raises(ConfigError) as info:
        load_model_settings(load_config(path, env={}))
    assert where in str(info.value)
    assert f"{path.name}:" in str(info.value)  # file:line:column of the offending value


def test_cli_device_flags(tmp_path: Path) -> None:
    gen = argparse.ArgumentParser()
    generate.add_arguments(gen)
    assert gen.parse_args(["hi"]).device == "auto"
    assert gen.parse_args(["hi", "--device", "cpu"]).device == "cpu"
    with pytest.raises(SystemExit):
        gen.parse_args(["hi", "--device", "tpu"])

    serve_parser = argparse.ArgumentParser()
    serve.add_arguments(serve_parser)
    config = load_config(config_with(tmp_path, {"device": "cuda", "gpu_memory_utilization": 0.6}), env={})
    assert common.resolve_model(config, serve_parser.parse_args([])).device == "cuda"  # the config's
    flagged = common.resolve_model(config, serve_parser.parse_args(["--device", "cpu"]))
    assert flagged.device == "cpu" and flagged.gpu_memory_utilization == 0.6  # the flag wins, the rest stays
    assert common.resolve_model(None, serve_parser.parse_args([])).device == "auto"

    run_parser = argparse.ArgumentParser()
    run.add_arguments(run_parser)
    assert run_parser.parse_args(["task"]).device is None  # no flag: the config decides
    assert run_parser.parse_args(["task", "--device", "cuda"]).device == "cuda"


def test_adapters_in_config_flags_and_agents(tmp_path: Path) -> None:
    model = {
        "adapters": {"tools": "./adapters/tools"},
        "max_loras": 2,
        "max_lora_rank": 64,
        "lora_kernels": "torch",
    }
    config = load_config(config_with(tmp_path, model), env={})
    settings = load_model_settings(config)
    assert settings.adapters == {"tools": "./adapters/tools"}
    engine = engine_config(settings)
    assert (engine.max_loras, engine.max_lora_rank, engine.lora_kernels) == (2, 64, "torch")
    default = engine_config(ModelSettings())
    assert (default.max_lora_rank, default.lora_kernels) == (16, "auto")  # the engine's own defaults
    serve_parser = argparse.ArgumentParser()
    serve.add_arguments(serve_parser)
    flagged = common.resolve_model(
        config, serve_parser.parse_args(["--adapter", "sql=/a/sql", "--adapter", "x=y"])
    )
    assert flagged.adapters == {
        "tools": "./adapters/tools",
        "sql": "/a/sql",
        "x": "y",
    }  # added to the config's
    with pytest.raises(AgentRuntimeError, match="not NAME=PATH"):
        common.resolve_model(config, serve_parser.parse_args(["--adapter", "nopath"]))
    for add in (generate.add_arguments, run.add_arguments):
        parser = argparse.ArgumentParser()
        add(parser)
        args = ["hi", "--adapter", "a=b"]
        assert common.parse_adapters(parser.parse_args(args).adapter) == {"a": "b"}
    with pytest.raises(ConfigError, match="max_loras"):
        load_model_settings(load_config(config_with(tmp_path, {"max_loras": 0}), env={}))
    with pytest.raises(ConfigError, match="max_lora_rank"):
        load_model_settings(load_config(config_with(tmp_path, {"max_lora_rank": 0}), env={}))
    with pytest.raises(ConfigError, match="lora_kernels"):
        load_model_settings(load_config(config_with(tmp_path, {"lora_kernels": "cuda"}), env={}))
    path = tmp_path / "agents.json"
    path.write_text(json.dumps({"mcpServers": {}, "agents": {"sql": {"adapter": "sql"}}}))
    assert load_agents(load_config(path, env={}))["sql"].adapter == "sql"


def test_quantize_settings_are_loader_options(tmp_path: Path) -> None:
    default = ModelSettings()
    assert default.quantize == "auto" and default.quantize_group_size == 32
    assert load_options(default) == {
        "dtype": "auto",
        "device": "auto",
        "quantize": "auto",
        "quantize_group_size": 32,
    }
    path = config_with(tmp_path, {"quantize": "int4", "quantize_group_size": 128, "device": "cpu"})
    settings = load_model_settings(load_config(path, env={}))
    options = load_options(settings)
    assert options["quantize"] == "int4" and options["quantize_group_size"] == 128
    assert engine_config(settings) == EngineConfig()  # how weights load is no engine setting


def test_cli_quantize_flags(tmp_path: Path) -> None:
    gen = argparse.ArgumentParser()
    generate.add_arguments(gen)
    assert gen.parse_args(["hi"]).quantize == "auto"
    assert gen.parse_args(["hi", "--quantize", "int8"]).quantize == "int8"
    with pytest.raises(SystemExit):
        gen.parse_args(["hi", "--quantize", "q4"])

    serve_parser = argparse.ArgumentParser()
    serve.add_arguments(serve_parser)
    config = load_config(config_with(tmp_path, {"quantize": "int8", "quantize_group_size": 64}), env={})
    assert common.resolve_model(config, serve_parser.parse_args([])).quantize == "int8"  # the config's
    flagged = common.resolve_model(config, serve_parser.parse_args(["--quantize", "none"]))
    assert flagged.quantize == "none" and flagged.quantize_group_size == 64  # the flag wins, the rest stays
    assert common.resolve_model(None, serve_parser.parse_args([])).quantize == "auto"

    for module in (run, mcp_server):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args = ["task"] if module is run else []
        assert parser.parse_args(args).quantize is None  # no flag: the config decides
        assert parser.parse_args([*args, "--quantize", "int4"]).quantize == "int4"
