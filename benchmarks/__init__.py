"""Benchmarks: side-by-side against peers measured in the same run, printing ratios (never timed asserts)."""

import inference  # noqa: F401 - sets OMP_WAIT_POLICY (inference/envs.py) before any benchmark imports torch
