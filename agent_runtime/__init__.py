"""agent-runtime: tool-using agents on a local model, with MCP servers kept alive behind policies."""

__version__ = "0.1.0"
