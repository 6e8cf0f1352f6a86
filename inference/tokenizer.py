"""Tokenizer wrapper: encode/decode, chat templates (with tools), and an incremental UTF-8-safe detokenizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError
from transformers import PreTrainedTokenizerBase

from inference.errors import RequestError

try:  # tokenizers >= 0.21
    from tokenizers.decoders import DecodeStream as _DecodeStream
except ImportError:  # pragma: no cover - older tokenizers: the Python detokenizer does the work
    _DecodeStream = None

_PROBE_TOOL = {
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
    later token completes it (or `flush` gives up on it). Fast tokenizers run that same algorithm in Rust
    (`tokenizers.decoders.DecodeStream`, about 10x cheaper per token); the Python path below is the fallback, and
    also takes over when more than _MAX_PENDING tokens are held back, which DecodeStream would hold forever.
    """

    __slots__ = ("_ids", "_prefix", "_read", "_rust", "_stream", "_tok")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window re-decoded with new tokens
        self._read = 0  # tokens before this index are already emitted
        self._stream = tokenizer.decode_stream()  # None while the Python path has the stream
        self._rust = self._stream is not None

    def add(self, token_id: int) -> str:
        token_id = int(token_id)
        self._ids.append(token_id)
        stream = self._stream
        if stream is not None and len(self._ids) - self._read <= _MAX_PENDING:
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
            self._prefix, self._read = self._read, len(self._ids)
            return chunk
        return self._add_slowly()

    def _add_slowly(self) -> str:
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        # One character is at most 4 bytes, so text still broken after _MAX_PENDING tokens is genuinely invalid.
        pending = len(self._ids) - self._read
        if len(new_text) > len(prefix_text) and (not new_text.endswith("\ufffd") or pending > _MAX_PENDING):
            self._prefix, self._read = self._read, len(self._ids)
            # Carry on in Rust from the same context window, once it decodes cleanly: DecodeStream treats a
            # context that ends in U+FFFD as not yet emitted and would send it again.
            clean = not new_text.endswith("\ufffd")
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
        self._stream = self._tok.decode_stream() if self._rust else None
        return new_text[len(prefix_text) :]


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

    @property
    def vocab_limit(self) -> int:
        return self._vocab_limit

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        limit = self._vocab_limit
        valid = [int(i) for i in ids if 0 <= int(i) < limit]
        return self.hf.decode(valid, skip_special_tokens=skip_special_tokens)

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

    def detokenizer(self) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self)

    def decode_stream(self, context: Sequence[int] = ()) -> Any:
        """A Rust incremental decoder that has already seen `context` (None without a fast backend)."""
        if self.backend is None or _DecodeStream is None:
            return None
        limit = self._vocab_limit
        ids = [i for i in context if 0 <= i < limit]
        return _DecodeStream(ids=ids, skip_special_tokens=True)
