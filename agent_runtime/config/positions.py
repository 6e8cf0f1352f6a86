"""Where each value of a JSON config text sits (line and column by JSON path), JSONC comment stripping, and
the `a.b[1]` path notation that errors use."""

from __future__ import annotations

import json
import re
from json.decoder import scanstring  # type: ignore[attr-defined]  # typeshed omits json.decoder.scanstring
from json.scanner import NUMBER_RE

JsonPath = tuple[str | int, ...]

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
_WS = re.compile(r"[ \t\n\r]*")


def _skip_ws(text: str, i: int) -> int:
    """The offset of the first non-whitespace character at or after `i`."""
    m = _WS.match(text, i)
    return m.end() if m is not None else i  # the pattern matches the empty string: always a match


def strip_jsonc(text: str) -> str:
    """Blank out // and /* */ comments and trailing commas (VS Code files are JSONC), keeping offsets."""
    if "/" not in text and "," not in text:
        return text
    out = list(text)
    i, n = 0, len(text)
    last_comma = -1  # offset of a comma seen since the last significant character
    while i < n:
        c = text[i]
        if c == '"':
            last_comma = -1
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            i += 1
        elif c == "/" and i + 1 < n and text[i + 1] == "/":
            while i < n and text[i] != "\n":
                out[i] = " "
                i += 1
        elif c == "/" and i + 1 < n and text[i + 1] == "*":
            end = text.find("*/", i + 2)
            end = n if end < 0 else end + 2
            for j in range(i, end):
                if text[j] != "\n":
                    out[j] = " "
            i = end
        elif c == ",":
            last_comma = i
            i += 1
        elif c in "}]" and last_comma >= 0:
            out[last_comma] = " "
            last_comma = -1
            i += 1
        else:
            if not c.isspace():
                last_comma = -1
            i += 1
    return "".join(out)


class Positions:
    """Offsets of every value and object key by JSON path, from a scan of (already valid) JSON text."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.values: dict[JsonPath, int] = {}
        self.keys: dict[JsonPath, int] = {}
        self.duplicates: list[JsonPath] = []
        self._scan(_skip_ws(text, 0), ())

    def _scan(self, i: int, path: JsonPath) -> int:
        text = self.text
        self.values[path] = i
        c = text[i]
        if c == "{":
            i = _skip_ws(text, i + 1)
            if text[i] == "}":
                return i + 1
            while True:
                key_at = i
                key, i = scanstring(text, i + 1)
                child = (*path, key)
                if child in self.keys:
                    self.duplicates.append(child)
                self.keys[child] = key_at
                i = _skip_ws(text, i) + 1  # the ':'
                i = self._scan(_skip_ws(text, i), child)
                i = _skip_ws(text, i)
                if text[i] == "}":
                    return i + 1
                i = _skip_ws(text, i + 1)
        if c == "[":
            i = _skip_ws(text, i + 1)
            if text[i] == "]":
                return i + 1
            index = 0
            while True:
                i = self._scan(i, (*path, index))
                i = _skip_ws(text, i)
                if text[i] == "]":
                    return i + 1
                i = _skip_ws(text, i + 1)
                index += 1
        if c == '"':
            return scanstring(text, i + 1)[1]
        m = NUMBER_RE.match(text, i)
        if m is not None and m.end() > i:
            return m.end()
        for word in ("true", "false", "null"):
            if text.startswith(word, i):
                return i + len(word)
        raise ValueError(f"unexpected character at offset {i}")  # json.loads accepted it: cannot happen

    def line_col(self, path: JsonPath, *, key: bool = False) -> tuple[int | None, int | None]:
        """Line and column (1-based) of the value at `path`, its key, or its nearest existing ancestor."""
        if key and path in self.keys:
            return _offset_line_col(self.text, self.keys[path])
        while path not in self.values and path:
            path = path[:-1]
        if path not in self.values:
            return None, None
        return _offset_line_col(self.text, self.values[path])


def _offset_line_col(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - text.rfind("\n", 0, offset)


def format_path(path: JsonPath) -> str:
    """`('mcpServers', 'time', 'args', 1)` -> `mcpServers.time.args[1]`; odd keys are quoted: `x["a b"]`."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _IDENT.match(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part)}]"
    return out


_PATH_TOKEN = re.compile(r'\.?([A-Za-z_$][A-Za-z0-9_$-]*)|\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]')


def parse_path(text: str) -> JsonPath:
    """Inverse of `format_path`; raises ValueError on text it did not produce."""
    parts: list[str | int] = []
    i = 0
    while i < len(text):
        m = _PATH_TOKEN.match(text, i)
        if m is None or (m.group(0).startswith(".") and not parts):
            raise ValueError(f"not a JSON path: {text!r}")
        if m.group(1) is not None:
            parts.append(m.group(1))
        elif m.group(2) is not None:
            parts.append(int(m.group(2)))
        else:
            parts.append(json.loads(m.group(3)))
        i = m.end()
    return tuple(parts)
