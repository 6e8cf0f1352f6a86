"""The MCP side: the runtime's lifespan (`Runtime`), the supervisor that keeps one session per server, the tool
registry, the executor (the policy pipeline every call goes through), the resource monitor, the tool pin store,
the audit log and local (Python) tools.

May import `agent_runtime.config`, `agent_runtime.errors`/`logging`, `policies` and `transports`; never torch,
`inference` or the agent code (`agent-runtime tools ...` stays fast).
"""
