"""Tool outcomes rendered as observations for the model: compact text, media summarised, truncated to a
token budget with the truncation stated, and every failure kind worded so the model can react to it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TokenCounter = Callable[[str], list[int]]
Decoder = Callable[[list[int]], str]


@dataclass(frozen=True, slots=True)
class Observation:
    text: str
    is_error: bool
    truncated: bool
    tokens: int  # after truncation (estimated when no tokenizer was given)


_FAILURE_WORDS = {
    "tool_error": "the tool reported an error",
    "denied": "the call was denied by policy",
    "timeout": "the call timed out",
    "breaker_open": "the tool's server is failing and temporarily blocked (circuit breaker open)",
    "transport_failure": "the tool's server could not be reached",
    "budget_exhausted": "the tool-call budget is used up",
    "unknown_tool": "there is no such tool",
    "invalid_arguments": "the arguments were invalid",
    "cancelled": "the call was cancelled",
}


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)


def render_block(block: Any) -> str:
    """One MCP content block as short text; binary content is described, never inlined."""
    kind = getattr(block, "type", None)
    if kind == "text":
        return str(block.text)
    if kind in ("image", "audio"):
        data = getattr(block, "data", "") or ""
        size = len(data) * 3 // 4  # base64
        return f"[{kind}: {getattr(block, 'mime_type', None) or getattr(block, 'mimeType', '?')}, about {size} bytes]"
    if kind == "resource":
        res = block.resource
        uri = str(getattr(res, "uri", ""))
        text = getattr(res, "text", None)
        mime = getattr(res, "mime_type", None) or getattr(res, "mimeType", None)
        if text is not None:
            return f"[resource {uri}{f' ({mime})' if mime else ''}]\n{text}"
        blob = getattr(res, "blob", "") or ""
        return f"[resource {uri}: binary{f' {mime}' if mime else ''}, about {len(blob) * 3 // 4} bytes]"
    if kind == "resource_link":
        name = getattr(block, "name", "") or ""
        return f"[link {getattr(block, 'uri', '')}{f' {name}' if name else ''}]"
    dump = getattr(block, "model_dump", None)
    return _compact_json(dump(mode="json", exclude_none=True)) if dump else str(block)


def render_result(result: Any) -> str:
    """A CallToolResult as text: its content blocks, else its structured content as compact JSON."""
    parts = [render_block(b) for b in (getattr(result, "content", None) or [])]
    text = "\n".join(p for p in parts if p)
    structured = getattr(result, "structured_content", None)
    if structured is None:
        structured = getattr(result, "structuredContent", None)
    if not text and structured is not None:
        text = _compact_json(structured)
    return _compact_text(text)


def _compact_text(text: str) -> str:
    """Pretty-printed JSON text is re-serialised compactly: fewer tokens, same facts."""
    stripped = text.strip()
    if stripped[:1] in "{[" and "\n" in stripped:
        try:
            return _compact_json(json.loads(stripped))
        except ValueError:
            pass
    return stripped


def flat_lines(text: str, *, max_lines: int = 60) -> str:
    """A JSON object or array result as `key: value` lines (`target.datetime: 2026-...`): a small model copies
    a value from a line far more reliably than from nested JSON. Other text is returned as it is."""
    stripped = text.strip()
    if stripped[:1] not in "{[":
        return text
    try:
        value = json.loads(stripped)
    except ValueError:
        return text
    lines: list[str] = []
    stack: list[tuple[str, Any]] = [("", value)]
    while stack and len(lines) < max_lines:
        key, node = stack.pop()
        if isinstance(node, dict) and node:
            stack.extend((f"{key}.{k}" if key else str(k), v) for k, v in reversed(list(node.items())))
        elif isinstance(node, list) and node and any(isinstance(v, dict | list) for v in node):
            stack.extend((f"{key}[{i}]", v) for i, v in reversed(list(enumerate(node))))
        else:
            rendered = node if isinstance(node, str) else _compact_json(node)
            lines.append(f"{key}: {rendered}" if key else str(rendered))
    if stack:
        lines.append("...")
    return "\n".join(lines)


def truncate(
    text: str, max_tokens: int, encode: TokenCounter | None = None, decode: Decoder | None = None
) -> tuple[str, bool, int]:
    """`text` cut to `max_tokens` tokens (about 4 characters each without a tokenizer), the cut stated."""
    if encode is not None and decode is not None:
        ids = encode(text)
        if len(ids) <= max_tokens:
            return text, False, len(ids)
        head = decode(ids[:max_tokens])
        return f"{head}\n[truncated: showing {max_tokens} of {len(ids)} tokens]", True, max_tokens
    limit = max_tokens * 4
    if len(text) <= limit:
        return text, False, (len(text) + 3) // 4
    return f"{text[:limit]}\n[truncated: showing {limit} of {len(text)} characters]", True, max_tokens


def observe(
    kind: str,
    body: str,
    reason: str | None,
    *,
    max_tokens: int,
    encode: TokenCounter | None = None,
    decode: Decoder | None = None,
) -> Observation:
    """The observation for one call's outcome (`kind` as in executor.ToolOutcome plus our own kinds)."""
    if kind == "result":
        text, cut, n = truncate(body or "(the tool returned no content)", max_tokens, encode, decode)
        return Observation(text, False, cut, n)
    headline = _FAILURE_WORDS.get(kind, kind.replace("_", " "))
    detail = body or reason or ""
    text = f"Error: {headline}" + (f": {detail}" if detail else "") + "."
    if kind in ("breaker_open", "transport_failure", "timeout"):
        text += " Try another tool or answer with what you know."
    elif kind in ("unknown_tool", "invalid_arguments", "denied"):
        text += " Check the tool list and the arguments."
    text, cut, n = truncate(text, max_tokens, encode, decode)
    return Observation(text, True, cut, n)
