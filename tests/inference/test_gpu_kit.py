"""The GPU kit (benchmarks/gpu_kit.py) and the session script that uses it on a GPU machine without a package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu_kit
from benchmarks.engine_cuda import SMOKE_CONFIG
from inference import loader
from inference.errors import ModelLoadError
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_session.sh"


@pytest.mark.smollm2
def test_model_folder_loads_without_the_embedded_model_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = gpu_kit.model_folder(tmp_path, "qwen3-0.6b")
    assert json.loads((folder / "config.json").read_text()) == json.loads(
        (loader.CONFIGS_DIR / "qwen3-0.6b.json").read_text()
    )
    assert (folder / "tokenizer.json").is_file() and (folder / "tokenizer_config.json").is_file()

    # On the GPU machine the SmolLM2 package is missing: loading must not need it. A tiny config in the folder keeps
    # the dummy weights small; the tokenizer is the kit's.
    def missing() -> Path:
        raise ModelLoadError("the embedded default model is not installed", hint="")

    monkeypatch.setattr(loader, "smollm2_gguf_path", missing)
    (folder / "config.json").write_text(json.dumps(SMOKE_CONFIG))
    loaded = loader.load_model(folder / "config.json", load_format="dummy", dtype=torch.float32)
    assert loaded.source == f"dummy:{folder / 'config.json'}"
    assert loaded.tokenizer.decode([19556, 28, 905]) == "Hello, world"  # SmolLM2's ids


def _session(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_session_without_a_kit_says_how_to_build_one(tmp_path: Path) -> None:
    proc = _session("env", GPU_KIT=str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "make gpu-kit" in proc.stderr


def test_session_rejects_an_unknown_phase(tmp_path: Path) -> None:
    (tmp_path / "kit").mkdir()
    proc = _session("benchmark", GPU_KIT=str(tmp_path / "kit"), OUT=str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "unknown phase benchmark" in proc.stderr


def test_session_logs_each_phase_and_reports_failure(tmp_path: Path) -> None:
    """`aot` with a model that does not exist: the phase fails with a one-line reason, its log lands in $OUT, and
    the script exits 1."""
    (tmp_path / "kit").mkdir()
    out = tmp_path / "out"
    proc = _session("aot", "--model", "no-such-model", GPU_KIT=str(tmp_path / "kit"), OUT=str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    log = (out / "aot.log").read_text()
    assert "no model config 'no-such-model'" in log and "Traceback" not in log
    assert "=== aot: exit 2" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the phase where there is no GPU")
def test_lora_phase_runs_the_lora_benchmark_on_cuda(tmp_path: Path) -> None:
    """`lora` runs `benchmarks.engine --adapters 4 --device cuda` on the kit's Qwen3-0.6B: without a GPU it says so
    in one line (exit 2), logged to $OUT/lora.log, and the script exits 1."""
    (tmp_path / "kit").mkdir()
    out = tmp_path / "out"
    proc = _session("lora", "--quick", GPU_KIT=str(tmp_path / "kit"), OUT=str(out))
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (
        f"--adapters 4 --device cuda --model {tmp_path / 'kit'}/qwen3-0.6b/config.json --quick" in proc.stdout
    )
    log = (out / "lora.log").read_text()
    assert "no CUDA device" in log and "Traceback" not in log
    assert "=== lora: exit 2" in proc.stdout


def test_engine_profile_runs_its_whole_path_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """`benchmarks.engine_profile --smoke`: decode steps at two batch sizes and a prefill step, profiled, tabled."""
    from benchmarks import engine_profile

    assert engine_profile.main(["--smoke", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    for row in ("decode, batch 1", "decode, batch 4", "prefill, 8 x 32 tokens"):
        assert row in out
    assert "aten::" in out  # the top-ops tables list the profiled ops


def test_quantized_benchmark_runs_its_whole_path_on_the_cpu(capsys: pytest.CaptureFixture[str]) -> None:
    """`benchmarks.engine --device cuda --smoke --quantized`: float, int8 and int4 engines one after another, a row
    each with its weight memory and decode figures against the float row (on the CPU: the CPU kernels)."""
    from benchmarks import engine

    assert engine.main(["--device", "cuda", "--smoke", "--quantized"]) == 0
    out = capsys.readouterr().out
    assert "SMOKE RUN ON THE CPU, NOT A RESULT: weight-only quantization" in out
    rows = [line for line in out.splitlines() if "weights (" in line and "│" in line]
    assert (
        len(rows) == 3 and "(float)" in rows[0] and "int8 weights (isq)" in rows[1] and "int4 g32" in rows[2]
    )
    assert "1.00x" in rows[0]


@pytest.mark.parametrize("mode", [["--smoke"], ["--smoke", "--aot", "sm_90"]], ids=["timed", "aot"])
def test_tile_sweep_runs_its_whole_path_without_a_gpu(mode: list[str], tmp_path: Path) -> None:
    """`benchmarks.triton_tiles --smoke` checks and times two candidates per kind under the interpreter; with --aot
    it compiles them for an H100 instead. A subprocess: the interpreter must be chosen before triton loads."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "benchmarks.triton_tiles", *mode],
        cwd=ROOT,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "--aot" in mode:
        assert "sm_90: 4 candidates compiled; 4 fit without spills" in proc.stdout
    else:
        assert "decode: 2 candidates" in proc.stdout and "prefill: 2 candidates" in proc.stdout
        assert "(current)" in proc.stdout and "suggested:" in proc.stdout
