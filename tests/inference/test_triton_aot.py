"""The Triton kernels compile for real GPUs on a machine without one (inference/triton_aot.py).

Each test runs in a subprocess without TRITON_INTERPRET: the other Triton tests set it in this process, and a kernel
defined under it can only be interpreted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT

pytest.importorskip("triton", reason="triton ships with the dev environment")

ALL_KERNELS = {
    "_write_kv_kernel",
    "_prefill_kernel",
    "_decode_kernel",
    "_decode_reduce_kernel",
    "_rms_norm_kernel",
    "_silu_and_mul_kernel",
    "_norm_rotary_kernel",
    "_quant_matmul_kernel",
    "_split_k_sum_kernel",
}


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(
        tmp_path / "triton-cache"
    )  # compile for real, not from an earlier run's cache
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _run(args: list[str], tmp_path: Path, **extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-W", "ignore", *args],
        cwd=ROOT,
        env=_env(tmp_path, **extra),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _reports(out: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_h100_within_its_resources(tmp_path: Path) -> None:
    """Qwen3-0.6B (head dim 128, q/k norm, GQA 2) and Qwen2.5-0.5B (head dim 64, GQA 7, qkv bias) in bf16, sm_90,
    with float weights and with int8 and int4 (group 32) linear layers."""
    proc = _run(
        [
            "-m",
            "inference.triton_aot",
            "--target",
            "sm_90",
            "--model",
            "qwen3-0.6b",
            "--model",
            "qwen2.5-0.5b",
            "--json",
        ],
        tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = _reports(proc.stdout)
    assert [r["model"] for r in reports] == ["qwen3-0.6b", "qwen2.5-0.5b"]
    for report in reports:
        assert report["problems"] == []
        launches = report["launches"]
        assert {x["kernel"] for x in launches} == ALL_KERNELS
        for x in launches:
            # a cubin came out and cuobjdump read it: no kernel runs on zero registers
            assert 0 < x["registers"] <= 255, x
            assert 0 <= x["shared_bytes"] <= 232_448, x
            assert x["spill_bytes"] == 0, f"{x['kernel']} spills {x['spill_bytes']} bytes in bf16"
    qwen3 = reports[0]["launches"]
    # A graph-captured batch of 1 takes the widest split-KV grid the H100's 132 SMs call for; 256 rows take one split.
    decode = {x["case"]: x["constants"] for x in qwen3 if x["kernel"] == "_decode_kernel"}
    assert decode["decode in a graph, batch 1"]["NUM_SPLITS"] == 16
    assert decode["decode in a graph, batch 64"]["NUM_SPLITS"] == 1
    prefill = next(x for x in qwen3 if x["kernel"] == "_prefill_kernel")
    assert prefill["constants"]["BLOCK_D"] == 128 and prefill["constants"]["GROUP"] == 2
    # the quantized matmuls of both layouts: decode tiles split K over the H100's SMs, prefill takes bigger tiles
    quant = [x for x in qwen3 if x["kernel"] == "_quant_matmul_kernel"]
    assert {x["case"].split(":")[0] for x in quant} == {"int8", "int4"}
    assert {x["constants"]["INT4"] for x in quant} == {False, True}
    assert any(x["constants"]["SPLIT_K"] > 1 and x["constants"]["BLOCK_M"] == 16 for x in quant)
    assert any(x["constants"]["BLOCK_M"] == 64 and x["constants"]["SPLIT_K"] == 1 for x in quant)


def test_lora_kernels_compile_for_h100_within_their_resources(tmp_path: Path) -> None:
    """The segmented LoRA kernels over SmolLM2's and Qwen3-0.6B's projections, ranks 8 and 16, decode and prefill,
    in bf16 for sm_90: no problems, no spills, and the tiles the engine's steps ask for."""
    proc = _run(
        ["-m", "inference.triton_aot", "--lora", "smollm2-135m", "--lora", "qwen3-0.6b", "--json"], tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = _reports(proc.stdout)
    assert [r["model"] for r in reports] == ["lora:smollm2-135m", "lora:qwen3-0.6b"]
    for report in reports:
        assert report["problems"] == []
        launches = report["launches"]
        assert {x["kernel"] for x in launches} == {"_shrink_kernel", "_expand_kernel"}
        for x in launches:
            assert 0 < x["registers"] <= 255, x
            assert 0 <= x["shared_bytes"] <= 232_448, x
            assert x["spill_bytes"] == 0, f"{x['kernel']} spills {x['spill_bytes']} bytes in bf16"
        cases = {(x["kernel"], x["case"]): x["constants"] for x in launches}
        # rank 8 on q, k and v: 24 rank columns in a 32-wide tile; one decode row splits the input features
        decode = cases[("_shrink_kernel", "r8 qkv, decode, 1 row")]
        assert decode["BLOCK_R"] == 32 and decode["BLOCK_M"] == 16 and decode["SPLIT_K"] > 1
        assert cases[("_expand_kernel", "r16 qkv, prefill, 512 tokens over 4 adapters")]["BLOCK_R"] == 64


def test_catches_an_error_only_the_compiler_sees(tmp_path: Path) -> None:
    """A loop-carried variable that changes type runs under the interpreter but is a compile error: the check must
    report it, and leave Triton's driver and JIT as it found them."""
    (tmp_path / "bad_kernel.py").write_text(
        textwrap.dedent(
            """
            import triton
            import triton.language as tl

            @triton.jit
            def loop_changes_type(x_ptr, n):
                acc = 0
                for i in range(n):
                    acc += tl.load(x_ptr + i)
                tl.store(x_ptr, acc)
            """
        )
    )
    script = textwrap.dedent(
        """
        import json, sys, torch
        sys.path.insert(0, sys.argv[1])
        import triton
        from triton.runtime.driver import driver
        from triton.runtime.jit import JITFunction
        from inference import triton_aot, triton_attention, triton_layers
        import bad_kernel

        run, active, splits = JITFunction.run, getattr(driver, "_active", None), triton_attention.num_decode_splits
        error = None
        try:
            with triton_aot.compile_only(90):
                bad_kernel.loop_changes_type[(1,)](torch.zeros(4), 4)
        except triton.CompilationError as exc:
            error = type(exc).__name__ + ": " + str(exc).splitlines()[-1]
        with triton_aot.compile_only(90) as captures:
            from inference.triton_layers import rms_norm
            rms_norm(torch.zeros(3, 64, dtype=torch.bfloat16), torch.ones(64, dtype=torch.bfloat16), 1e-6)
        print(json.dumps({
            "error": error,
            "captured": [c.kernel.fn.__name__ for c in captures],
            "restored": JITFunction.run is run and getattr(driver, "_active", None) is active
                and triton_attention.num_decode_splits is splits,
            "caches_left": len(triton_layers._rms_norm_kernel.device_caches),
        }))
        """
    )
    proc = _run(["-c", script, str(tmp_path)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["error"] and got["error"].startswith("CompilationError"), got
    assert "Loop-carried variable acc" in got["error"], got
    assert got["captured"] == ["_rms_norm_kernel"]
    assert got["restored"] is True
    assert got["caches_left"] == 0, "the fake target's binder and kernels stayed in the JIT's device-0 cache"


def test_refuses_interpreted_kernels(tmp_path: Path) -> None:
    proc = _run(["-m", "inference.triton_aot", "--model", "qwen3-0.6b"], tmp_path, TRITON_INTERPRET="1")
    assert proc.returncode == 2
    assert "TRITON_INTERPRET" in proc.stderr
    script = (
        "import torch\n"
        "from inference import triton_aot\n"
        "try:\n"
        "    with triton_aot.compile_only(90):\n"
        "        pass\n"
        "except triton_aot.AotError as exc:\n"
        "    print('AotError:', exc)\n"
    )
    proc = _run(["-c", script], tmp_path, TRITON_INTERPRET="1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("AotError:") and "TRITON_INTERPRET" in proc.stdout


def test_check_flags_launches_the_gpu_would_refuse() -> None:
    from inference.triton_aot import CompiledLaunch, check

    def launch(shared: int, regs: int) -> CompiledLaunch:
        return CompiledLaunch("_k", "prefill", {}, 4, 3, shared, regs, 0, 0.1)

    assert check([launch(232_448, 255)], "sm_90") == []
    problems = check([launch(232_449, 64), launch(1024, 256)], "sm_90")
    assert len(problems) == 2
    assert "232449 bytes of shared memory" in problems[0] and "at most 232448" in problems[0]
    assert "256 registers" in problems[1]
    assert check([launch(200_000, 64)], "sm_80")  # fits an H100, not an A100
