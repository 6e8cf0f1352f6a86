"""The transports' per-message cap, piece by piece: stdout lines split without holding an oversized line,
and the request an oversized reply answered found from its first and last bytes."""

from __future__ import annotations

import mcp_types as types

from transports.errors import MessageTooLarge, is_too_large, too_large_reason
from transports.pending import PendingRequests
from transports.stdio import LineSplitter, Oversized


def test_lines_over_the_limit_are_dropped_as_they_stream_in() -> None:
    lines = LineSplitter(10, keep=4)
    out: list[bytes | Oversized] = []
    for chunk in [b"abc\n0123456789", b"X\nshort\n", b"a" * 25, b"bbb\nend"]:
        out += list(lines.feed(chunk))
    assert out == [
        b"abc",
        Oversized(11, b"0123", b"789X"),
        b"short",
        Oversized(28, b"aaaa", b"abbb"),
    ]
    assert lines.flush() == b"end" and lines.flush() is None
    # Memory: a line of any length is held at most up to the limit.
    lines = LineSplitter(1000)
    assert list(lines.feed(b"y" * 999)) == [] and lines.buffered == 999
    for _ in range(10_000):
        assert list(lines.feed(b"z" * 65536)) == []
        assert lines.buffered == 0
    (big,) = list(lines.feed(b"\n"))
    assert isinstance(big, Oversized) and big.size == 999 + 10_000 * 65536


def request(i: int | str) -> types.JSONRPCRequest:
    return types.JSONRPCRequest(jsonrpc="2.0", id=i, method="tools/call", params={"name": "x"})


def test_the_request_an_oversized_reply_answered() -> None:
    pending = PendingRequests()
    for i in (1, 2, 3):
        pending.sent(request(i))
    reason = too_large_reason(99, 10)
    # Python servers put the id first; TypeScript servers last; nested ids inside the result do not confuse it.
    (reply,) = pending.fail_oversized(b'{"jsonrpc":"2.0","id":2,"result":{"content":[{"id":3', b"...", reason)
    assert isinstance(reply.message, types.JSONRPCError) and reply.message.id == 2
    assert is_too_large(reply.message.error.message)
    (reply,) = pending.fail_oversized(
        b'{"result":{"content":[{"text":"', b'xxx"}]},"jsonrpc":"2.0","id":3}', reason
    )
    assert reply.message.id == 3
    # A server's own notification that is too big fails none of our requests.
    assert pending.fail_oversized(b'{"jsonrpc":"2.0","method":"notifications/message"', b"}", reason) == []
    # Cannot tell: every request still waiting fails rather than hanging until its timeout.
    pending.sent(request("s-4"))
    assert {r.message.id for r in pending.fail_oversized(b"xxxx", b"yyyy", reason)} == {1, "s-4"}
    assert len(pending) == 0
    # Answered and cancelled requests are forgotten.
    pending.sent(request(5))
    pending.sent(request(6))
    pending.answered(types.JSONRPCResponse(jsonrpc="2.0", id=5, result={}))
    pending.sent(
        types.JSONRPCNotification(jsonrpc="2.0", method="notifications/cancelled", params={"requestId": 6})
    )
    assert len(pending) == 0


def test_the_typed_error() -> None:
    reason = too_large_reason(None, 2048)
    assert "2048 bytes (max_message_bytes)" in reason and is_too_large(reason)
    assert is_too_large("SSE stream failed: Server-sent event exceeded the 2048 byte limit.")
    assert issubclass(MessageTooLarge, Exception) and not is_too_large("tool failed")
