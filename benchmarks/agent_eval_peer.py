"""The peer of benchmarks/agent_eval.py: smolagents' ToolCallingAgent on the same SmolLM2 weights (its
TransformersModel on the HF folder our loader converts the packaged GGUF into) and the same MCP servers through
smolagents' MCP client (mcpadapt), task by task; one JSON line of results per task.

Runs in its own venv (`make eval-peer`), started by agent_eval.py:

    .venv-smolagents/bin/python benchmarks/agent_eval_peer.py JOB.json RESULTS.jsonl

JOB.json: {"model_folder", "dtype", "max_steps", "max_new_tokens", "timeout", "tasks": [{"key", "text",
"config"}]}; each config is a plain `mcpServers` file. Nothing here imports agent_runtime.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

FINAL_ANSWER = "final_answer"


def _norm(name: str) -> str:
    return name.replace("-", "_").lower()


def _text(result: Any) -> str:
    parts = [getattr(c, "text", "") or f"[{getattr(c, 'type', 'content')}]" for c in result.content or []]
    return " ".join(parts)[:300]


def server_params(config: Path) -> list[Any]:
    from mcp import StdioServerParameters

    servers = json.loads(config.read_text())["mcpServers"]
    return [
        StdioServerParameters(command=s["command"], args=s.get("args", []), env=s.get("env") or None)
        for s in servers.values()
    ]


def make_adapter(log: list[dict[str, Any]]) -> Any:
    """smolagents' own MCP adapter, with each call's outcome recorded (it drops `isError`, we need it)."""
    from mcpadapt.smolagents_adapter import SmolAgentsAdapter

    class RecordingAdapter(SmolAgentsAdapter):
        def adapt(self, func: Any, mcp_tool: Any) -> Any:
            def recorded(arguments: dict[str, Any] | None) -> Any:
                entry = {
                    "name": mcp_tool.name,
                    "arguments": arguments or {},
                    "outcome": "error",
                    "observation": "",
                }
                log.append(entry)
                result = func(arguments)
                entry["outcome"] = "tool_error" if getattr(result, "isError", False) else "result"
                entry["observation"] = _text(result)
                return result

            return super().adapt(recorded, mcp_tool)

    return RecordingAdapter(structured_output=False)


def record_of(
    steps: list[Any], log: list[dict[str, Any]], output: Any, stop: str | None, wall: float
) -> dict:
    from smolagents.memory import ActionStep
    from smolagents.utils import AgentParsingError, AgentToolCallError

    calls: list[dict[str, Any]] = []
    pending = list(log)
    prompt = completion = parse_errors = n_steps = 0
    texts: list[str] = []
    for step in steps:
        if not isinstance(step, ActionStep):
            continue
        n_steps += 1
        texts.append(str(step.model_output or "")[:300])
        if step.token_usage is not None:
            prompt += step.token_usage.input_tokens
            completion += step.token_usage.output_tokens
        if isinstance(step.error, AgentParsingError):
            parse_errors += 1
        for tc in step.tool_calls or []:
            if tc.name == FINAL_ANSWER:
                continue
            match = next((e for e in pending if _norm(e["name"]) == _norm(tc.name)), None)
            if match is not None:
                pending.remove(match)
                calls.append(match)
                continue
            err = str(step.error or "")
            outcome = (
                "unknown_tool"
                if "Unknown tool" in err
                else "invalid_arguments"
                if isinstance(step.error, AgentToolCallError)
                else "not_run"
            )
            args = tc.arguments if isinstance(tc.arguments, dict) else {"input": tc.arguments}
            calls.append({"name": tc.name, "arguments": args, "outcome": outcome, "observation": err[:300]})
    return {
        "answer": None if output is None else str(output),
        "stop_reason": stop,
        "steps": n_steps,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "wall_seconds": wall,
        "cached_tokens": None,  # transformers' generate keeps no cache across calls
        "calls": calls,
        "parse_errors": parse_errors,
        "error": None,
        "model_texts": texts,
    }


def run_task(model: Any, job: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    from mcpadapt.core import MCPAdapt
    from smolagents import ToolCallingAgent
    from smolagents.monitoring import LogLevel

    log: list[dict[str, Any]] = []
    with MCPAdapt(server_params(Path(task["config"])), make_adapter(log), connect_timeout=60) as tools:
        deadline = time.monotonic() + float(job["timeout"])

        def on_step(step: Any, agent: Any) -> None:
            if time.monotonic() > deadline:
                agent.interrupt()

        agent = ToolCallingAgent(
            tools=list(tools),
            model=model,
            max_steps=int(job["max_steps"]),
            step_callbacks=[on_step],
            verbosity_level=LogLevel.OFF,
        )
        started = time.perf_counter()
        output: Any = None
        stop: str | None = None
        try:
            result = agent.run(task["text"], return_full_result=True)
            output = result.output
            stop = "max_steps" if result.state == "max_steps_error" else None
        except Exception as exc:
            stop = "timeout" if "interrupted" in str(exc).lower() else "model_error"
            if stop == "model_error":
                print(f"{task['key']}: {exc!r}", file=sys.stderr)
        wall = time.perf_counter() - started
        return record_of(list(agent.memory.steps), log, output, stop, wall)


def main() -> int:
    job_path, out_path = Path(sys.argv[1]), Path(sys.argv[2])
    job = json.loads(job_path.read_text())
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from smolagents import TransformersModel

    model = TransformersModel(
        model_id=job["model_folder"],
        device_map="cpu",
        torch_dtype=job["dtype"],
        max_new_tokens=int(job["max_new_tokens"]),
    )
    for task in job["tasks"]:
        try:
            record = run_task(model, job, task)
        except Exception as exc:  # a server that did not start, a crash: that task fails, the others run
            record = {"stop_reason": "harness_error", "error": repr(exc)[:300]}
            print(f"{task['key']}: {exc!r}", file=sys.stderr)
        with out_path.open("a") as out:
            out.write(json.dumps({"key": task["key"], "record": record}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
