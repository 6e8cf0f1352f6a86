"""The in-process inference engine: models, loading, paged KV cache, block manager, scheduler, attention
backends, sampler, chat/tool formats, constrained decoding (grammars) and the async front.

Knows nothing of MCP or of `agent_runtime`: it imports only torch, its model libraries and itself. Engine
settings are one frozen `EngineConfig` (inference/config.py); environment variables are read in `envs`.
"""

from inference import envs

envs.default_omp_wait()  # must run before any module of this package imports torch (see envs)
