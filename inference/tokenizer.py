"""Tokenizer wrapper: encode/decode, chat templates (with tools), and an incremental UTF-8-safe detokenizer."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, cast

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from inference.errors import RequestError

_DecodeStream: type[DecodeStream] | None
try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream

    _DecodeStream = DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the Python detokenizer does the work
    _DecodeStream = None

_PROBE_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "zz_probe_tool_7f3a",
        "description": "probe",
        "parameters": {"type": "object", "properties": {}},
    },
}


_MAX_PENDING = 8


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas without ever cutting a UTF-8 sequence in half.

    A short window of earlier tokens is re-decoded with each new one (as vLLM does) so tokenizers that drop a
    leading space at a decode boundary still produce the right text; text ending in U+FFFD is held back until a
    later token completes it (or `flush` gives up on it). Three paths emit the same deltas, cheapest first:
    byte-level BPE tokenizers (GPT-2 style: SmolLM2, Qwen, Llama 3) decode each token to its bytes from a cached
    table and join them in Python, since their whole-text decode is exactly the UTF-8 decode of those bytes;
    other fast tokenizers run the windowed algorithm in Rust (`tokenizers.decoders.DecodeStream`); the Python
    windowed path is the fallback, and also takes over when more than _MAX_PENDING tokens are held back (which
    DecodeStream would hold forever) or when the bytes are not valid UTF-8.
    """

    __slots__ = (
        "_fast",
        "_ids",
        "_pending",
        "_pieces",
        "_prefix",
        "_read",
        "_rust",
        "_stream",
        "_texts",
        "_tok",
    )

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window re-decoded with new tokens
        self._read = 0  # tokens before this index are already emitted
        tables = tokenizer.piece_tables()  # None unless the tokenizer is byte-level
        self._pieces: dict[int, bytes] | None
        self._texts: dict[int, str] | None
        self._pieces, self._texts = tables if tables is not None else (None, None)
        self._fast = self._pieces is not None  # the byte path has the stream
        self._pending = b""  # the byte path: the bytes of the held-back tokens (ids[read:])
        self._stream = None if self._fast else tokenizer.decode_stream()  # None while another path has it
        self._rust = self._stream is not None

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        ids = self._ids
        ids.append(token_id)
        if self._fast:
            n = len(ids)
            if n - self._read > _MAX_PENDING:
                self._fast = False
                return self._add_slowly()
            if not self._pending:  # most tokens: whole characters on their own, text cached by id
                text = self._texts.get(token_id)  # type: ignore[union-attr]  # _fast: the tables are set
                if text is not None:
                    if text:
                        self._prefix, self._read = self._read, n
                    return text  # "" for special tokens and ids past the vocabulary
            piece = self._pieces.get(token_id)  # type: ignore[union-attr]  # _fast: the tables are set
            if piece is None:
                piece = self._tok.piece_bytes(token_id)
            if not piece:  # special tokens and ids past the vocabulary decode to nothing
                return ""
            pending = self._pending + piece
            try:
                text = pending.decode()
            except UnicodeDecodeError as exc:
                if exc.reason != "unexpected end of data":  # invalid bytes: the windowed path decides
                    self._fast = False
                    return self._add_slowly()
                self._pending = pending  # an incomplete character at the end: wait for its other bytes
                return ""
            if text.endswith("\ufffd"):  # a literal U+FFFD is held back too, as the other paths do
                self._pending = pending
                return ""
            self._pending = b""
            self._prefix, self._read = self._read, n
            return text
        stream = self._stream
        if stream is not None and len(ids) - self._read <= _MAX_PENDING:
            if not 0 <= token_id < self._tok.vocab_limit:
                return ""  # decodes to nothing, as in Tokenizer.decode
            try:
                chunk = stream.step(self._tok.backend, token_id)
            except Exception:  # the Rust decoder refused: the Python path decides from here on
                self._stream = None
                self._rust = False
                return self._add_slowly()
            if chunk is None:
                return ""
            self._prefix, self._read = self._read, len(ids)
            return chunk
        return self._add_slowly()

    def _add_slowly(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        # One character is at most 4 bytes, so text still broken after _MAX_PENDING tokens is genuinely invalid.
        pending = len(self._ids) - self._read
        if len(new_text) > len(prefix_text) and (not new_text.endswith("\ufffd") or pending > _MAX_PENDING):
            self._prefix, self._read = self._read, len(self._ids)
            # Carry on in Rust (or on the byte path) from the same context window, once it decodes cleanly:
            # DecodeStream treats a context that ends in U+FFFD as not yet emitted and would send it again.
            clean = not new_text.endswith("\ufffd")
            if self._pieces is not None:
                self._fast, self._pending = clean, b""
            else:
                self._stream = (
                    self._tok.decode_stream(self._ids[self._prefix :]) if self._rust and clean else None
                )
            return new_text[len(prefix_text) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete sequence decodes to U+FFFD here)."""
        if self._read == len(self._ids):
            return ""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        self._fast, self._pending = self._pieces is not None, b""
        self._stream = self._tok.decode_stream() if self._rust else None
        return new_text[len(prefix_text) :]


def _byte_level_chars() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted: the character each byte is spelled with in a byte-level vocab."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


def _is_byte_level(backend: Any) -> bool:
    """True when the Rust tokenizer's decoder is a plain ByteLevel one (its decode is then a UTF-8 decode of the
    tokens' bytes, special tokens skipped)."""
    try:
        decoder = json.loads(backend.to_str()).get("decoder") or {}
    except Exception:
        return False
    return decoder.get("type") == "ByteLevel"


_BYTE_OF_CHAR = _byte_level_chars()


class Tokenizer:
    """A Hugging Face tokenizer plus the model's end-of-sequence ids."""

    def __init__(self, hf: PreTrainedTokenizerBase, eos_token_ids: Sequence[int] = ()) -> None:
        self.hf = hf
        ids = [int(i) for i in eos_token_ids]
        if not ids and hf.eos_token_id is not None:
            ids = [int(hf.eos_token_id)]
        self.eos_token_ids: tuple[int, ...] = tuple(ids)
        # Ids past the tokenizer's vocabulary (models whose embedding is padded, random dummy models) decode to "".
        self._vocab_limit = len(hf)
        self._has_tools: bool | None = None
        # The Rust tokenizer behind a fast HF tokenizer decodes exactly as `hf.decode` does, unless the HF side
        # post-processes the text (clean_up_tokenization_spaces), which the Rust side knows nothing of.
        backend = getattr(hf, "backend_tokenizer", None)
        cleans_up = bool(getattr(hf, "clean_up_tokenization_spaces", False))
        self.backend: Any = None if cleans_up or _DecodeStream is None else backend
        # The byte path of IncrementalDetokenizer: same conditions, plus a plain ByteLevel decoder.
        self.byte_level: bool = self.backend is not None and _is_byte_level(self.backend)
        self._pieces: dict[int, bytes] = {}  # token id -> its bytes, filled on first use
        self._texts: dict[int, str] = {}  # token id -> its text, for pieces that are whole characters
        self._special_ids: frozenset[int] | None = None

    @property
    def vocab_limit(self) -> int:
        return self._vocab_limit

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        limit = self._vocab_limit
        valid = [int(i) for i in ids if 0 <= int(i) < limit]
        # a list of ids decodes to one str (a batch of lists would give a list)
        return cast(str, self.hf.decode(valid, skip_special_tokens=skip_special_tokens))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template's text for `messages` (and `tools` when the template has a tools section)."""
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt}
        if tools:
            kwargs["tools"] = tools
        if not self.hf.chat_template:
            raise RequestError("this model's tokenizer has no chat template", hint="send a plain text prompt")
        try:
            return str(self.hf.apply_chat_template(messages, **kwargs))
        except TemplateError as exc:
            # Templates raise on conversations they do not accept (roles out of order, missing fields).
            raise RequestError(
                f"the chat template rejected the messages: {exc}", hint="check the message roles"
            ) from exc

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools)
        # The template already wrote any BOS/special tokens it wants.
        return self.encode(text, add_special_tokens=False)

    def has_tool_template(self) -> bool:
        """Whether the chat template renders tool definitions (SmolLM2's does not; Qwen's do)."""
        if self._has_tools is None:
            msgs = [{"role": "user", "content": "hi"}]
            try:
                with_tools = self.render_chat(msgs, tools=[_PROBE_TOOL])
            except Exception:
                with_tools = ""
            self._has_tools = _PROBE_TOOL["function"]["name"] in with_tools
        return self._has_tools

    def piece_tables(self) -> tuple[dict[int, bytes], dict[int, str]] | None:
        """A byte-level tokenizer's growing caches, filled by `piece_bytes`: id -> bytes, and id -> text for the
        tokens that are whole characters on their own ("" for those that decode to nothing). None when the
        tokenizer is not byte-level."""
        return (self._pieces, self._texts) if self.byte_level and self.backend is not None else None

    def piece_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for in a byte-level vocabulary (b"" for special tokens and ids
        past the vocabulary, which decode to nothing); cached, with the text of whole-character pieces."""
        if self._special_ids is None:
            added = self.backend.get_added_tokens_decoder()
            self._special_ids = frozenset(i for i, t in added.items() if t.special)
        piece = b""
        if 0 <= token_id < self._vocab_limit and token_id not in self._special_ids:
            token = self.backend.id_to_token(token_id)
            if token is not None:
                try:
                    piece = bytes(map(_BYTE_OF_CHAR.__getitem__, token))
                except KeyError:
                    # a token with any character outside the byte alphabet (a plain-text added token) stands for
                    # its own UTF-8 as a whole, as the ByteLevel decoder reads it
                    piece = token.encode()
        self._pieces[token_id] = piece
        try:
            text = piece.decode()
        except UnicodeDecodeError:  # part of a character (or invalid alone): decoded with its neighbours
            return piece
        if not text.endswith("\ufffd"):
            self._texts[token_id] = text
        return piece

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)

    def decode_stream(self, context: Sequence[int] = ()) -> DecodeStream | None:
        """A Rust incremental decoder that has already seen `context` (None without a fast backend)."""
        if self.backend is None or _DecodeStream is None:
            return None
        limit = self._vocab_limit
        ids = [i for i in context if 0 <= i < limit]
        return _DecodeStream(ids=ids, skip_special_tokens=True)
