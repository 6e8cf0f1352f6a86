"""The in-process inference engine: models, paged KV cache, scheduler, sampler, async front."""
