"""Model flags shared by the model commands (agent_runtime/cli/common.py): `--quantize-group-size` overrides the
config's `model.quantize_group_size` on serve and mcp-server, reaches run and chat, and rejects other sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent_runtime.cli.common import resolve_model
from agent_runtime.cli.main import build_parser
from agent_runtime.config import load_config


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "MCP_CONFIG.json"
    model = {"source": "smollm2-135m-instruct", "quantize": "int4", "quantize_group_size": 128}
    path.write_text(json.dumps({"mcpServers": {}, "model": model}))
    return path


@pytest.mark.parametrize("command", ["serve", "mcp-server"])
def test_group_size_flag_overrides_the_config(tmp_path: Path, command: str) -> None:
    config = load_config(_config(tmp_path))
    parser = build_parser()
    from_config = resolve_model(config, parser.parse_args([command]))
    assert (from_config.quantize, from_config.quantize_group_size) == ("int4", 128)
    flagged = resolve_model(config, parser.parse_args([command, "--quantize-group-size", "64"]))
    assert (flagged.quantize, flagged.quantize_group_size) == ("int4", 64)


@pytest.mark.parametrize("command", ["run", "chat"])
def test_agent_commands_take_the_group_size(command: str) -> None:
    extra = ["a task"] if command == "run" else []
    args = build_parser().parse_args([command, "--quantize-group-size", "256", *extra])
    assert args.quantize_group_size == 256
    assert build_parser().parse_args([command, *extra]).quantize_group_size is None  # the config decides


def test_other_group_sizes_are_an_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["serve", "--quantize-group-size", "16"])
    assert info.value.code == 2
    assert (
        "--quantize-group-size: invalid choice: 16 (choose from 32, 64, 128, 256)" in capsys.readouterr().err
    )


@pytest.mark.parametrize("command", ["serve", "mcp-server"])
def test_compile_flag_overrides_the_config(tmp_path: Path, command: str) -> None:
    path = tmp_path / "MCP_CONFIG.json"
    path.write_text(
        json.dumps({"mcpServers": {}, "model": {"source": "smollm2-135m-instruct", "compile": True}})
    )
    config = load_config(path)
    parser = build_parser()
    assert resolve_model(config, parser.parse_args([command])).compile is True
    assert resolve_model(config, parser.parse_args([command, "--no-compile"])).compile is False
    assert resolve_model(None, parser.parse_args([command, "--compile"])).compile is True
    assert resolve_model(None, parser.parse_args([command])).compile is False


@pytest.mark.parametrize("command", ["run", "chat", "generate"])
def test_model_commands_take_compile(command: str) -> None:
    extra = {"run": ["a task"], "chat": [], "generate": ["a prompt"]}[command]
    assert build_parser().parse_args([command, "--compile", *extra]).compile is True
    default = build_parser().parse_args([command, *extra]).compile
    assert default is (False if command == "generate" else None)  # run and chat: the config decides
