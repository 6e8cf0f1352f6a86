"""Serving: the OpenAI-compatible HTTP API, the MCP server mode for desktop hosts, and Prometheus metrics.

May import `agent_runtime.agents` and below, `policies` and `inference`; never `cli`.
"""
