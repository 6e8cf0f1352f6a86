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


def _isq_int4_stats(folder: str, group_size: str) -> tuple[str, float]:
    run = _generate(
        "--model", folder, "--quantize", "int4", "--quantize-group-size", group_size, "--dtype", "bfloat16",
        "--temperature", "0", "--max-tokens", "2", "--stats", "--device", "cpu", "The capital of France is",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    line = next(line for line in run.stderr.splitlines() if "weights (" in line)
    return line, float(line.split(" -> ")[-1].removesuffix(" MiB]"))


def test_generate_quantize_group_size_reaches_the_int4_layers() -> None:
    """`--quantize-group-size` sets ISQ's int4 groups: SmolLM2's float folder at group 64 holds half of group
    32's scales and zeros (about 6 MiB less), and `--stats` names the group."""
    from inference.loader import converted_gguf, smollm2_gguf_path

    folder = str(converted_gguf(smollm2_gguf_path()))  # the packaged model's float32 HF folder
    line32, mib32 = _isq_int4_stats(folder, "32")
    line64, mib64 = _isq_int4_stats(folder, "64")
    assert "[int4 g32 weights (isq): " in line32
    assert "[int4 g64 weights (isq): " in line64  # every layer's inputs (576, 1536) divide by 64
    # SmolLM2's layers hold 106M weights: a bf16 scale and zero per group are 4 bytes per 32, or per 64
    assert 5.5 < mib32 - mib64 < 7


def test_generate_rejects_a_group_size_the_kernels_do_not_take() -> None:
    run = _generate("--quantize", "int4", "--quantize-group-size", "48", "--max-tokens", "2", "hi")
    assert run.returncode == 2
    assert "--quantize-group-size: invalid choice: 48" in run.stderr
    assert "Traceback" not in run.stderr
