"""Tool-definition pinning against rug pulls, and signs of poisoning in tool descriptions.

A definition's pin is the SHA-256 of the canonical JSON (sorted keys, no spaces, UTF-8) of everything of it
that reaches a model or a host: its name, title, description, input and output schemas and annotations. A pinned tool whose pin changes, or a tool new to
an already-pinned server, is quarantined until a user approves it.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

PINNED_FIELDS = ("name", "title", "description", "inputSchema", "outputSchema", "annotations")

PinStatus = Literal["new", "pinned", "changed"]


def canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def pinned_view(definition: Mapping[str, Any]) -> dict[str, Any]:
    """The fields that are pinned, from a tool definition in wire form (camelCase keys)."""
    return {k: definition[k] for k in PINNED_FIELDS if definition.get(k) is not None}


def definition_hash(definition: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(pinned_view(definition)).encode("utf-8")).hexdigest()


def changed_fields(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    a, b = pinned_view(old), pinned_view(new)
    return [k for k in PINNED_FIELDS if canonical_json(a.get(k)) != canonical_json(b.get(k))]


@dataclass(frozen=True, slots=True)
class PinCheck:
    tool: str
    status: PinStatus
    sha256: str
    changed: tuple[str, ...] = ()  # fields that differ from the pinned definition

    @property
    def quarantined(self) -> bool:
        return self.status != "pinned"


def check_pins(
    pinned: Mapping[str, Mapping[str, Any]], definitions: Mapping[str, Mapping[str, Any]]
) -> dict[str, PinCheck]:
    """Compare a server's current definitions with its pinned ones (tool -> {"sha256", "definition"})."""
    out: dict[str, PinCheck] = {}
    for name, definition in definitions.items():
        digest = definition_hash(definition)
        entry = pinned.get(name)
        if entry is None:
            out[name] = PinCheck(name, "new", digest)
        elif entry.get("sha256") == digest:
            out[name] = PinCheck(name, "pinned", digest)
        else:
            old = entry.get("definition") or {}
            out[name] = PinCheck(
                name, "changed", digest, tuple(changed_fields(old, definition)) or ("unknown",)
            )
    return out


# --- poisoning signs -------------------------------------------------------------------------------

_INVISIBLE = re.compile("[\u200b-\u200f\u2060-\u2064\ufeff\u00ad\u180e]")
_BIDI = re.compile("[\u202a-\u202e\u2066-\u2069]")
_TAGS = re.compile("[\U000e0000-\U000e007f]")
_ANSI = re.compile("[\x1b\x9b]")
_HIDDEN = [
    (
        re.compile(r"<\s*/?\s*(important|system|secret|instructions?|hidden|admin)\b[^>]*>", re.I),
        "a hidden-instruction tag",
    ),
    (re.compile(r"<!--.*?-->", re.S), "an HTML comment"),
    (
        re.compile(
            r"\b(ignore|disregard|forget)\b.{0,40}\b(previous|prior|above|earlier|all)\b.{0,20}\b(instructions?|rules|prompts?)",
            re.I | re.S,
        ),
        "an instruction override",
    ),
    (
        re.compile(
            r"\b(do not|don't|never)\b.{0,30}\b(tell|inform|mention|reveal|show)\b.{0,30}\b(user|human)",
            re.I | re.S,
        ),
        "an instruction to hide something from the user",
    ),
    (
        re.compile(
            r"(~/\.ssh|id_rsa|id_ed25519|\.aws/credentials|\.env\b|mcp\.json|claude_desktop_config|/etc/passwd|\.netrc)",
            re.I,
        ),
        "a reference to a secret file",
    ),
    (
        re.compile(
            r"\b(before|prior to) (using|calling) (this|any) tool\b.{0,60}\b(read|call|send|pass|include)",
            re.I | re.S,
        ),
        "a pre-call instruction",
    ),
    (
        re.compile(r"\b(system prompt|conversation history|previous messages)\b", re.I),
        "a request for the conversation",
    ),
    (re.compile(r"[A-Za-z0-9+/]{120,}={0,2}"), "a long encoded blob"),
]
MAX_DESCRIPTION_CHARS = 4000


def poisoning_signs(definition: Mapping[str, Any]) -> list[str]:
    """Suspicious things in a tool's description and the descriptions inside its schemas."""
    signs: list[str] = []
    for where, text in _texts(definition):
        found = []
        if _INVISIBLE.search(text):
            found.append("zero-width or invisible characters")
        if _BIDI.search(text):
            found.append("bidirectional control characters")
        if _TAGS.search(text):
            found.append("Unicode tag characters (invisible text)")
        if _ANSI.search(text):
            found.append("terminal escape sequences")
        folded = unicodedata.normalize("NFKC", _INVISIBLE.sub("", _TAGS.sub("", text)))
        for pattern, label in _HIDDEN:
            if pattern.search(folded):
                found.append(label)
        if len(text) > MAX_DESCRIPTION_CHARS:
            found.append(f"an unusually long text ({len(text)} characters)")
        signs.extend(f"{where}: {f}" for f in found)
    return signs


def _texts(definition: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    for key in ("name", "title", "description"):
        if isinstance(definition.get(key), str):
            yield key, definition[key]
    for key in ("inputSchema", "outputSchema"):
        stack: list[tuple[Any, str]] = [(definition.get(key), key)]
        while stack:
            node, where = stack.pop()
            if isinstance(node, Mapping):
                for k, v in node.items():
                    if k in ("description", "title") and isinstance(v, str):
                        yield f"{where}.{k}", v
                    elif k in ("default", "examples", "enum", "const") and isinstance(v, str):
                        yield f"{where}.{k}", v
                    else:
                        stack.append((v, f"{where}.{k}"))
            elif isinstance(node, list):
                stack.extend((v, f"{where}[{i}]") for i, v in enumerate(node))
