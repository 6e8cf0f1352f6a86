"""The llama.cpp peer's pieces that run without llama_cpp: the `--workload` file of benchmarks/llama_cpp_peer.py
(read, checked, refused with a usage error), benchmarks/engine.py's discovery of the peer's Python, which says
why there is no llama.cpp row, and the peer's OpenMP environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import llama_cpp_peer
from benchmarks.engine import (
    PEER_OMP_WAITS,
    PEER_SCRIPT,
    Workload,
    find_llama_python,
    make_workload,
    peer_env,
)


def _write(tmp_path: Path, payload: object) -> str:
    path = tmp_path / "workload.json"
    path.write_text(json.dumps(payload))
    return str(path)


def test_workload_file_round_trips_the_engine_workload(tmp_path: Path) -> None:
    work: Workload = make_workload(5, (3, 9), (2, 6), vocab=1000)
    requests = [{"prompt": p, "max_tokens": n} for p, n in zip(work.prompts, work.max_tokens, strict=True)]
    args = llama_cpp_peer.parse_args(["--model", "m.gguf", "--workload", _write(tmp_path, requests)])
    assert args.requests == list(zip(work.prompts, work.max_tokens, strict=True))
    assert llama_cpp_peer.parse_args(["--model", "m.gguf"]).requests == []  # the single-stream CLI as before


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ([], "non-empty JSON list"),
        ([{"prompt": [], "max_tokens": 4}], "request 0: prompt must be"),
        ([{"prompt": [1, 2], "max_tokens": 4}, {"prompt": [1, "x"], "max_tokens": 4}], "request 1: prompt"),
        ([{"prompt": [1, 2], "max_tokens": 0}], "request 0: max_tokens must be a positive integer"),
        ([[1, 2]], "request 0: prompt must be"),
    ],
)
def test_bad_workload_files_are_usage_errors(tmp_path: Path, payload: object, reason: str) -> None:
    # the script as benchmarks/engine.py runs it: its argument check comes before llama_cpp is imported
    run = subprocess.run(
        [sys.executable, str(PEER_SCRIPT), "--model", "m.gguf", "--workload", _write(tmp_path, payload)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert reason in run.stderr
    assert "Traceback" not in run.stderr


def test_no_peer_when_the_python_is_missing(tmp_path: Path) -> None:
    peer, reason = find_llama_python(str(tmp_path / "no-such-python"))
    assert peer is None
    assert reason == f"no llama.cpp row: {tmp_path / 'no-such-python'} does not exist"
    peer, reason = find_llama_python("")
    assert peer is None and "--llama-python is empty" in reason


def test_no_peer_when_the_python_lacks_llama_cpp() -> None:
    # the test environment's own python: llama-cpp-python is never a dependency of this project
    peer, reason = find_llama_python(sys.executable)
    assert peer is None
    assert reason.startswith(f"no llama.cpp row: {sys.executable} cannot import llama_cpp (")
    assert "No module named 'llama_cpp'" in reason


def test_quantize_mode_arguments(tmp_path: Path) -> None:
    args = llama_cpp_peer.parse_args(["--model", "f32.gguf", "--quantize-to", "Q4_K_M", "--out", "q.gguf"])
    assert (args.quantize_to, args.out, args.requests) == ("Q4_K_M", "q.gguf", [])
    for argv, reason in (
        (["--quantize-to", "Q4_K_M"], "--quantize-to and --out go together"),
        (["--quantize-to", "Q3_K_M", "--out", "q.gguf"], "invalid choice: 'Q3_K_M'"),
        (
            ["--quantize-to", "Q6_K", "--out", "q.gguf", "--workload", _write(tmp_path, [])],
            "separate runs",
        ),
    ):
        run = subprocess.run(
            [sys.executable, str(PEER_SCRIPT), "--model", "m.gguf", *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, argv
        assert reason in run.stderr


def test_the_peer_waits_as_llama_cpp_users_do_or_passively() -> None:
    # `import inference` (via the benchmarks package) gave this process our OpenMP settings; the peer must not
    # inherit them: its default run is libgomp's own waiting, the other plain PASSIVE
    assert os.environ.get("GOMP_SPINCOUNT") is not None or os.environ.get("OMP_WAIT_POLICY") is not None
    assert set(PEER_OMP_WAITS) == {"default", "passive"}
    default = peer_env("default")
    assert "OMP_WAIT_POLICY" not in default and "GOMP_SPINCOUNT" not in default
    assert default["PATH"] == os.environ["PATH"]
    passive = peer_env("passive")
    assert passive["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in passive
