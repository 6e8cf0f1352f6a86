"""Errors a transport can raise to its user: each carries a one-line reason and a hint."""

from __future__ import annotations


class TransportError(Exception):
    """Base of the transport errors; same shape as agent_runtime.errors.AgentRuntimeError."""

    user_facing = True

    def __init__(self, reason: str, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint

    def __str__(self) -> str:
        return self.reason if not self.hint else f"{self.reason} (hint: {self.hint})"


class ConnectError(TransportError):
    """The server could not be spawned, reached, or initialized."""

    def __init__(self, reason: str, hint: str | None = None, *, stderr_tail: list[str] | None = None) -> None:
        tail = [line for line in (stderr_tail or []) if line.strip()]
        if tail:
            # The last stderr lines are usually the real cause (a traceback, a missing module).
            reason = f"{reason}; server stderr: {' | '.join(tail[-5:])}"
        super().__init__(reason, hint)
        self.stderr_tail = list(stderr_tail or [])


class StartupTimeout(ConnectError):
    """Spawning/connecting plus the MCP handshake did not finish within the startup timeout."""


class ConnectionLost(TransportError):
    """The transport died (process exit, HTTP session lost, WebSocket closed).

    `sent` is False only when the request provably never left this process, which makes a retry safe
    for any tool; True means the server may have received (and acted on) it.
    """

    def __init__(self, reason: str, hint: str | None = None, *, sent: bool) -> None:
        super().__init__(reason, hint)
        self.sent = sent


class CallTimeout(TransportError):
    """No reply arrived within the per-call timeout (the request was sent)."""


class ServerRequestError(TransportError):
    """The server answered a request with a JSON-RPC error (not a tool error result)."""

    def __init__(self, code: int, message: str, data: object = None) -> None:
        super().__init__(f"server error {code}: {message}", None)
        self.code = code
        self.message = message
        self.data = data


# In the message of every oversize failure, whichever layer reports it (our stdio and WebSocket readers, our
# HTTP body cap through the SDK, httpx's SSE event cap): how `connect` recognises it.
TOO_LARGE_MARK = "exceeds the message size limit"
_SSE_TOO_LARGE = "Server-sent event exceeded the"


def too_large_reason(size: int | None, limit: int) -> str:
    what = f"a message of {size} bytes" if size is not None else "a message"
    return f"{what} from the server {TOO_LARGE_MARK} of {limit} bytes (max_message_bytes)"


def is_too_large(message: str) -> bool:
    return TOO_LARGE_MARK in message or _SSE_TOO_LARGE in message


class MessageTooLarge(TransportError):
    """The server sent a message (the answer to this request) larger than the transport accepts; it was
    dropped while it streamed in, never held in memory whole."""


class CapabilityMissing(TransportError):
    """The server did not advertise the capability a request needs (resources, prompts, completions,
    resource subscriptions): the request is refused here, never sent."""


class ResourceTooLarge(TransportError):
    """A resource's contents arrived within max_message_bytes but exceed what we keep of one read."""
