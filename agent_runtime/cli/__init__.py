"""The `agent-runtime` command line: `main` and one module per command; what several share is in `common`.

The top layer: may import anything in `agent_runtime`. Heavy packages (torch, the MCP SDK, rich) load inside
the commands that need them, so every command's parser stays cheap.
"""
