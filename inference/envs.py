"""Every environment variable the engine reads, parsed by one rule.

A flag is on for `1`, `true`, `yes`, `on` or `y` and off for unset, empty, `0`, `false`, `no`, `off` or `n`
(any case, surrounding spaces ignored), the same words Triton accepts for its own TRITON_INTERPRET; any other
value is a typed error naming the variable, never a silent guess.
"""

from __future__ import annotations

import os
from pathlib import Path

from inference.errors import EngineError

TRITON_INTERPRET = "TRITON_INTERPRET"  # Triton's own: run kernels under its interpreter (CPU tensors, tests)
TRITON_TILES = (
    "AGENT_RUNTIME_TRITON_TILES"  # attention tile sizes, e.g. "decode_block_n=64,prefill_block_m=32"
)
CPU_PACKED_LINEAR = "AGENT_RUNTIME_CPU_PACKED_LINEAR"  # 0 keeps a bf16 model's CPU weights plain
CACHE_DIR = "AGENT_RUNTIME_CACHE"  # converted GGUF folders and other caches (default ~/.cache/agent-runtime)
EXAMPLES_DIR = "AGENT_RUNTIME_EXAMPLES"  # remembered worked examples (default: the cache/examples)
HF_HUB_OFFLINE = "HF_HUB_OFFLINE"  # Hugging Face's own: never reach the hub
OMP_WAIT_POLICY = "OMP_WAIT_POLICY"  # OpenMP's own, read once when torch loads libgomp
GOMP_SPINCOUNT = (
    "GOMP_SPINCOUNT"  # libgomp's: how long an idle worker spins before it sleeps, read with the above
)
# About 30 us at libgomp's own estimate of 100,000 spins a millisecond: long enough to bridge the gaps between
# the parallel regions of one decode step, short enough that an idle engine sleeps at once.
DEFAULT_SPIN_COUNT = 3000

_ON = frozenset({"1", "true", "yes", "on", "y"})
_OFF = frozenset({"", "0", "false", "no", "off", "n"})


def flag(name: str, default: bool = False) -> bool:
    """The boolean value of environment variable `name` (`default` when unset)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise EngineError(
        f"environment variable {name}={raw!r} is not a boolean",
        "use 1/true/yes/on to turn it on, 0/false/no/off (or unset it) to turn it off",
    )


def text(name: str) -> str:
    """The stripped value of `name`, empty when unset."""
    return os.environ.get(name, "").strip()


def cache_dir() -> Path:
    """Where the engine caches converted models: $AGENT_RUNTIME_CACHE, else ~/.cache/agent-runtime."""
    value = text(CACHE_DIR)
    return Path(value).expanduser() if value else Path.home() / ".cache" / "agent-runtime"


def examples_dir() -> Path:
    """Where agents remember successful calls as worked examples: $AGENT_RUNTIME_EXAMPLES, else the cache's
    `examples` folder."""
    value = text(EXAMPLES_DIR)
    return Path(value).expanduser() if value else cache_dir() / "examples"


def default_omp_wait() -> None:
    """Unless the user set `OMP_WAIT_POLICY` or `GOMP_SPINCOUNT`, make OpenMP workers spin briefly, then sleep.

    Each matmul of a decode step is a parallel region; a worker that sleeps between them must be woken for the
    next, which cost about 80 us a region here (a SmolLM2 step at one row has ~125 of them): passive waiting
    alone ran 35 tok/s, a spin of `DEFAULT_SPIN_COUNT` 52 tok/s. libgomp's own default (3 ms of spinning) gained
    nothing over that, and long spins steal the cores that the event loop, MCP servers and other processes need
    (3-8x slower under contention). The policy is PASSIVE; an explicit spin count overrides its zero spin. Only
    takes effect before torch loads libgomp, so the `inference` package calls it when it is imported, before any
    of its modules imports torch.
    """
    if OMP_WAIT_POLICY not in os.environ and GOMP_SPINCOUNT not in os.environ:
        os.environ[GOMP_SPINCOUNT] = str(DEFAULT_SPIN_COUNT)
    os.environ.setdefault(OMP_WAIT_POLICY, "PASSIVE")
