"""Tool output made safe to show and to feed a model: control/ANSI characters stripped, size capped,
truncation marked in the observation itself."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mcp_types import CallToolResult, TextContent


_MCP_TYPES: Any = None


def _mt() -> Any:
    """The MCP types module, imported on first use: it costs ~0.1 s and CLI paths that never call a tool
    should not pay for it."""
    global _MCP_TYPES
    if _MCP_TYPES is None:
        import mcp_types

        _MCP_TYPES = mcp_types
    return _MCP_TYPES


DEFAULT_MAX_OUTPUT_CHARS = 64 * 1024

# CSI (ESC [ ... final), OSC (ESC ] ... BEL or ST), DCS/SOS/PM/APC strings, other two-byte escapes,
# and the 8-bit C1 forms (CSI = 0x9b, OSC = 0x9d).
_ANSI = re.compile(
    r"(?:\x1b\[|\x9b)[0-?]*[ -/]*[@-~]"
    r"|(?:\x1b\]|\x9d)[^\x07\x1b\x9c]*(?:\x07|\x1b\\|\x9c)?"
    r"|(?:\x1b[PX^_]|[\x90\x98\x9e\x9f])[^\x1b\x9c]*(?:\x1b\\|\x9c)?"
    r"|\x1b[ -/]*[0-~]?"
)
# C0 except tab and newline, DEL, C1, and bidi overrides (they reorder what a reader sees).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def sanitize_text(text: str) -> str:
    if text.isascii() and text.isprintable():
        return text  # the common case costs one scan
    text = _ANSI.sub("", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def truncation_note(shown: int, total: int) -> str:
    return f"\n[output truncated: {shown} of {total} characters shown]"


def cap_result(
    result: CallToolResult, max_chars: int = DEFAULT_MAX_OUTPUT_CHARS
) -> tuple[CallToolResult, bool]:
    """Sanitise every text and cap the whole result at about `max_chars` characters.

    Binary blocks (images, audio, blobs) count by their base64 size and are dropped whole when they do
    not fit. Returns the new result and whether anything was cut.
    """
    if _small_and_clean(result, max_chars):
        return result, False  # the common case: small and printable, nothing to copy
    total = _size(result)
    budget = max_chars
    content: list[Any] = []
    truncated = False
    for block in result.content:
        if budget <= 0:
            truncated = True
            break
        if isinstance(block, _mt().TextContent):
            text = sanitize_text(block.text)
            if len(text) > budget:
                text, truncated = text[:budget], True
            budget -= len(text)
            content.append(block if text == block.text else block.model_copy(update={"text": text}))
        elif isinstance(block, _mt().EmbeddedResource) and isinstance(
            block.resource, _mt().TextResourceContents
        ):
            text = sanitize_text(block.resource.text)
            if len(text) > budget:
                text, truncated = text[:budget], True
            budget -= len(text)
            if text == block.resource.text:
                content.append(block)
            else:
                resource = block.resource.model_copy(update={"text": text})
                content.append(block.model_copy(update={"resource": resource}))
        else:
            size = _block_size(block)
            if size > budget:
                truncated = True
                continue
            budget -= size
            content.append(block)
    structured = result.structured_content
    if structured is not None:
        structured = _sanitize_json(structured)
        if len(json.dumps(structured, ensure_ascii=False)) > max_chars:
            structured, truncated = None, True
    if truncated:
        shown = max_chars - max(budget, 0)
        content.append(_mt().TextContent(type="text", text=truncation_note(shown, total)))
    elif structured == result.structured_content and all(
        a is b for a, b in zip(content, result.content, strict=True)
    ):
        return result, False
    return result.model_copy(update={"content": content, "structured_content": structured}), truncated


def _small_and_clean(result: CallToolResult, max_chars: int) -> bool:
    """Whether the result fits the cap and needs no sanitising. One pass for the common result (plain
    text blocks of printable ASCII); anything else takes the general check."""
    text_type: type[TextContent] = _mt().TextContent
    total = 0
    for block in result.content:
        if type(block) is not text_type or not (block.text.isascii() and block.text.isprintable()):
            return _size(result) <= max_chars and _clean(result, max_chars)
        total += len(block.text)
    if total > max_chars:
        return False
    return result.structured_content is None or _json_clean(result.structured_content, max_chars)


def _clean(result: CallToolResult, max_chars: int) -> bool:
    for block in result.content:
        if isinstance(block, _mt().TextContent):
            if (
                not (block.text.isascii() and block.text.isprintable())
                and sanitize_text(block.text) != block.text
            ):
                return False
        elif isinstance(block, _mt().EmbeddedResource) and isinstance(
            block.resource, _mt().TextResourceContents
        ):
            return False
    if result.structured_content is not None:
        return _json_clean(result.structured_content, max_chars)
    return True


def _json_clean(value: Any, budget: int) -> bool:
    """True when every string in `value` is printable ASCII and the whole is roughly within `budget`."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            budget -= len(node) + 3
            if not (node.isascii() and node.isprintable()):
                return False
        elif isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str) or not (k.isascii() and k.isprintable()):
                    return False
                budget -= len(k) + 4
                stack.append(v)
        elif isinstance(node, list):
            budget -= 2
            stack.extend(node)
        else:
            budget -= 24
        if budget < 0:
            return False
    return True


def _block_size(block: Any) -> int:
    if isinstance(block, _mt().ImageContent | _mt().AudioContent):
        return len(block.data)
    if isinstance(block, _mt().EmbeddedResource) and isinstance(block.resource, _mt().BlobResourceContents):
        return len(block.resource.blob)
    return 256  # links and unknown blocks: small, fixed


def _size(result: CallToolResult) -> int:
    total = 0
    for block in result.content:
        if isinstance(block, _mt().TextContent):
            total += len(block.text)
        elif isinstance(block, _mt().EmbeddedResource) and isinstance(
            block.resource, _mt().TextResourceContents
        ):
            total += len(block.resource.text)
        else:
            total += _block_size(block)
    return total


def _sanitize_json(value: Any) -> Any:
    if isinstance(value, str):
        return sanitize_text(value)
    if isinstance(value, dict):
        return {sanitize_text(str(k)): _sanitize_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_sanitize_json(v) for v in value]
    return value
