"""The test suite; it mirrors the packages (agent_runtime, inference, policies, transports)."""

import inference  # noqa: F401 - sets OMP_WAIT_POLICY (inference/envs.py) before any test imports torch
