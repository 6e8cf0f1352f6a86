"""The engine's environment defaults: the OpenMP wait settings reach libgomp (it prints what it read with
OMP_DISPLAY_ENV), and a user's own settings are left alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from inference import envs

ROOT = Path(__file__).resolve().parents[2]


def libgomp_settings(**env: str) -> dict[str, str]:
    """What libgomp read at load, in a fresh process that imports `inference` first and then torch."""
    clean = {k: v for k, v in os.environ.items() if k not in (envs.OMP_WAIT_POLICY, envs.GOMP_SPINCOUNT)}
    clean.update(env, OMP_DISPLAY_ENV="VERBOSE", PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, "-c", "import inference, torch; torch.ones(4).sum()"],
        env=clean,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    settings = {}
    for line in done.stderr.splitlines():
        name, sep, value = line.strip().partition(" = ")
        if sep and name in (envs.OMP_WAIT_POLICY, envs.GOMP_SPINCOUNT):
            settings[name] = value.strip("'")
    return settings


def test_default_is_a_short_spin_then_sleep() -> None:
    settings = libgomp_settings()
    if not settings:
        pytest.skip("this torch build does not use libgomp (no OMP_DISPLAY_ENV output)")
    assert settings == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": str(envs.DEFAULT_SPIN_COUNT)}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),
        ({"OMP_WAIT_POLICY": "PASSIVE"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),
        ({"GOMP_SPINCOUNT": "0"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),
        ({"GOMP_SPINCOUNT": "50000"}, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "50000"}),
    ],
)
def test_the_users_settings_win(env: dict[str, str], expected: dict[str, str]) -> None:
    settings = libgomp_settings(**env)
    if not settings:
        pytest.skip("this torch build does not use libgomp (no OMP_DISPLAY_ENV output)")
    for name, value in expected.items():
        assert settings[name] == value
