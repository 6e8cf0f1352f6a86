"""`agent-runtime generate` as a user runs it: the embedded SmolLM2, greedy text on stdout, stats on stderr
(the weight memory with `--quantize`), and the `--device` error path (one line, exit 2, no traceback)."""

from __future__ import annotations

import subprocess

import torch

from tests.conftest import PYTHON, ROOT


def _generate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "agent_runtime.cli.main", "generate", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )


def test_generate_greedy_streams_text_and_stats() -> None:
    args = (
        "--temperature",
        "0",
        "--max-tokens",
        "6",
        "--stats",
        "--device",
        "cpu",
        "The capital of France is",
    )
    first = _generate(*args)
    assert first.returncode == 0, first.stderr
    assert "Paris" in first.stdout
    assert "6 completion tokens, finish=length" in first.stderr
    again = _generate(*args)
    assert again.returncode == 0, again.stderr
    assert again.stdout == first.stdout  # greedy: the same text every run


def test_generate_on_a_missing_gpu_is_a_one_line_error() -> None:
    run = _generate("--device", "cuda", "--max-tokens", "2", "hi")
    if torch.cuda.is_available():  # a GPU machine: the same command must simply work
        assert run.returncode == 0, run.stderr
        return
    assert run.returncode == 2
    assert run.stderr.startswith("error: CUDA was requested but no CUDA device is available")
    assert "hint:" in run.stderr
    assert "Traceback" not in run.stderr


def test_generate_quantized_prints_the_weight_memory() -> None:
    """`--quantize int8` re-targets the GGUF's blocks; `--stats` prints the weights' memory before and after."""
    run = _generate(
        "--quantize", "int8", "--dtype", "bfloat16", "--temperature", "0", "--max-tokens", "4", "--stats",
        "--device", "cpu", "The capital of France is",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Paris" in run.stdout
    stats = [line for line in run.stderr.splitlines() if "weights (" in line]
    assert stats and "int8 weights (gguf Q4_1->int8: 210" in stats[-1]
    before, after = (float(x) for x in stats[-1].split(": ")[-1].removesuffix(" MiB]").split(" -> "))
    assert after < 0.7 * before
