"""Agents: the ReAct loop, its events and results, observations, the agent host (configs, one shared backend)
and the LLM backends (the in-process engine, any OpenAI-compatible server).

May import `agent_runtime.tools` and below, `policies` and `inference`; never `server` or `cli`.
"""
