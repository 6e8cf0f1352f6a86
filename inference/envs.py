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


def default_passive_omp() -> None:
    """Make OpenMP workers wait passively unless the user chose otherwise. Spinning workers steal the cores
    that the event loop, MCP servers and other processes need; with passive waiting 2 threads stay fast when
    the CPU is shared (measured 3-8x on 2 busy cores). It only takes effect before torch loads libgomp, so the
    `inference` package calls it when it is imported, before any of its modules imports torch."""
    os.environ.setdefault(OMP_WAIT_POLICY, "PASSIVE")
