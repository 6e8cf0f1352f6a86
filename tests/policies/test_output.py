"""Output sanitising and caps."""

from __future__ import annotations

from mcp_types import CallToolResult, EmbeddedResource, ImageContent, TextContent, TextResourceContents

from policies.output import cap_result, sanitize_text


def text(*parts: str, **kw: object) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=p) for p in parts], **kw)  # type: ignore[arg-type]  # kw: CallToolResult's other fields (structured_content here)


def test_sanitize_strips_ansi_and_controls() -> None:
    assert sanitize_text("plain text") == "plain text"
    assert sanitize_text("\x1b[31mred\x1b[0m") == "red"
    assert sanitize_text("a\x1b]0;evil title\x07b") == "ab"
    assert sanitize_text("a\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\b") == "alinkb"
    assert sanitize_text("x\x9b2Jy") == "xy"
    assert sanitize_text("bell\x07 nul\x00 bs\x08 del\x7f") == "bell nul bs del"
    assert sanitize_text("line1\r\nline2\roverwritten\ttab") == "line1\nline2\noverwritten\ttab"
    assert sanitize_text("abc\u202egnp.exe") == "abcgnp.exe"
    assert sanitize_text("héllo wörld ✓") == "héllo wörld ✓"


def test_small_clean_result_is_returned_as_is() -> None:
    r = text("hello")
    out, truncated = cap_result(r, 100)
    assert out is r and not truncated


def test_cap_truncates_and_marks_it() -> None:
    r = text("a" * 60, "b" * 60, "c" * 60)
    out, truncated = cap_result(r, 100)
    assert truncated
    texts = [b.text for b in out.content if isinstance(b, TextContent)]
    assert texts[0] == "a" * 60 and texts[1] == "b" * 40
    assert "output truncated: 100 of 180 characters shown" in texts[-1]


def test_dirty_text_is_cleaned_even_without_truncation() -> None:
    out, truncated = cap_result(text("\x1b[1mbold\x1b[0m"), 100)
    assert not truncated and out.content[0].text == "bold"  # type: ignore[union-attr]  # cap_result keeps a text block a TextContent


def test_binary_blocks_count_and_are_dropped_whole() -> None:
    img = ImageContent(type="image", data="A" * 500, mime_type="image/png")
    r = CallToolResult(content=[TextContent(type="text", text="hi"), img])
    out, truncated = cap_result(r, 100)
    assert truncated and not any(isinstance(b, ImageContent) for b in out.content)
    out, truncated = cap_result(r, 1000)
    assert not truncated and out.content[1] is img


def test_embedded_text_resources_and_structured_content() -> None:
    res = EmbeddedResource(
        type="resource", resource=TextResourceContents(uri="file:///x", text="\x1b[2Jdata")
    )
    out, _ = cap_result(CallToolResult(content=[res]), 100)
    assert out.content[0].resource.text == "data"  # type: ignore[union-attr]  # a sanitised embedded text resource stays an EmbeddedResource of text
    out, truncated = cap_result(text("ok", structured_content={"k": "\x1b[31mv"}), 100)
    assert out.structured_content == {"k": "v"} and not truncated
    out, truncated = cap_result(text("ok", structured_content={"k": "v" * 500}), 100)
    assert out.structured_content is None and truncated


def test_is_error_is_preserved() -> None:
    out, _ = cap_result(text("x" * 10, is_error=True), 5)
    assert out.is_error
