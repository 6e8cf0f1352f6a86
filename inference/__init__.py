"""The in-process inference engine: models, paged KV cache, scheduler, sampler, async front."""

import os

# Spinning OpenMP workers steal the cores that the event loop, MCP servers and other processes need;
# with passive waiting 2 threads stay fast when the CPU is shared (measured 3-8x on 2 busy cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
