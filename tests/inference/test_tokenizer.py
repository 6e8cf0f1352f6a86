"""The tokenizer wrapper on SmolLM2's real tokenizer: chat templates, tool templates, incremental detokenising."""

from __future__ import annotations

import copy
import random
from typing import Any

import pytest

from inference.errors import RequestError
from inference.tokenizer import Tokenizer

TEXTS = [
    "Hello 👋 world 🌍! Emoji with joiners: 🧑‍💻👩‍👩‍👧 and flags 🇯🇵.",
    "你好，世界。東京の天気は晴れです。한국어도 됩니다.",
    "Ünïcödé — “quotes”, math ∑∫√ and a tab\tnewline\n end",
]


@pytest.fixture(scope="module")
def tok(smollm2_fp32: Any) -> Tokenizer:
    return smollm2_fp32.tokenizer


def test_encode_decode_round_trip(tok: Tokenizer) -> None:
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids and tok.decode(ids) == text
    assert tok.encode("hi", add_special_tokens=False) == tok.encode("hi")
    assert tok.eos_token_ids == (tok.hf.convert_tokens_to_ids("<|im_end|>"),)


def test_chat_template_round_trip(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    text = tok.render_chat(msgs)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(msgs)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")  # specials are single tokens, not text
    no_prompt = tok.render_chat(msgs, add_generation_prompt=False)
    assert text.startswith(no_prompt) and not no_prompt.endswith("assistant\n")


def test_smollm2_template_has_no_tool_section(tok: Tokenizer) -> None:
    assert tok.has_tool_template() is False
    tool = {"type": "function", "function": {"name": "get_time", "description": "now", "parameters": {}}}
    msgs = [{"role": "user", "content": "time?"}]
    assert tok.render_chat(msgs, tools=[tool]) == tok.render_chat(msgs)


def test_template_with_tools_is_detected(tok: Tokenizer) -> None:
    hf = copy.deepcopy(tok.hf)
    hf.chat_template = (
        "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with_tools = Tokenizer(hf, tok.eos_token_ids)
    assert with_tools.has_tool_template() is True
    tool = {"type": "function", "function": {"name": "get_time", "description": "now", "parameters": {}}}
    text = with_tools.render_chat([{"role": "user", "content": "time?"}], tools=[tool])
    assert text.startswith("<tools>get_time;</tools>\n")


def _path(tok: Tokenizer, name: str) -> Tokenizer:
    """The tokenizer on one detokenizer path: "bytes" (SmolLM2 is byte-level BPE), "rust" (DecodeStream) or
    "python" (the windowed fallback)."""
    if name == "bytes":
        assert tok.byte_level and tok.backend is not None
        return tok
    other = copy.copy(tok)
    other.byte_level = False
    if name == "python":
        other.backend = None
    return other


@pytest.fixture(params=["bytes", "rust", "python"])
def detok_tok(request: pytest.FixtureRequest, tok: Tokenizer) -> Tokenizer:
    return _path(tok, request.param)


def _deltas(tok: Tokenizer, ids: list[int]) -> tuple[list[str], str]:
    detok = tok.detokenizer()
    return [detok.add(i) for i in ids], detok.flush()


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_emits_broken_utf8(detok_tok: Tokenizer, text: str) -> None:
    tok = detok_tok
    ids = tok.encode(text)
    # The test only means something if some token is a partial character on its own.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.detokenizer()
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == text


def test_detokenizer_flush_releases_an_incomplete_character(detok_tok: Tokenizer) -> None:
    tok = detok_tok
    ids = tok.encode("👋")
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert detok.add(ids[0]) == ""  # held back: half an emoji
    assert detok.flush() == tok.decode(ids[:1])
    assert detok.flush() == ""


def test_detokenizer_skips_special_tokens_and_keeps_spacing(detok_tok: Tokenizer) -> None:
    tok = detok_tok
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a b  c"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=False)
    detok = tok.detokenizer()
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tok.decode(ids) == "system\nS\nuser\na b  c\n"


def test_all_paths_emit_the_same_deltas_on_random_streams(tok: Tokenizer) -> None:
    """Ordinary tokens, lone pieces of multi-byte characters, special tokens and ids past the vocabulary (random
    dummy models produce those), shuffled: the byte, Rust and Python paths emit the same delta at every step."""
    rust, slow = _path(tok, "rust"), _path(tok, "python")
    pieces = sorted({i for text in TEXTS for i in tok.encode(text)})
    specials = [tok.hf.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
    rng = random.Random(5)
    for _ in range(100):
        ids = [
            rng.choice(specials)
            if r < 0.05
            else tok.vocab_limit + rng.randrange(9)
            if r < 0.1
            else rng.choice(pieces)
            for r in (rng.random() for _ in range(60))
        ]
        # Not compared with tok.decode(ids): once broken bytes are given up on (past eight tokens), bytes that a
        # whole-text decode would join across that point are U+FFFD on both paths.
        want = _deltas(slow, ids)
        assert _deltas(tok, ids) == want
        assert _deltas(rust, ids) == want


def test_byte_pieces_decode_like_the_tokenizer(tok: Tokenizer) -> None:
    """The byte path's premise: a byte-level tokenizer's decode of any ids (special and added tokens, ids past
    the vocabulary, broken UTF-8 included) is the UTF-8 decode of the tokens' bytes joined."""
    specials = sorted(tok.backend.get_added_tokens_decoder())
    rng = random.Random(11)
    for i in [*specials, *rng.sample(range(tok.vocab_limit), 2000), tok.vocab_limit, tok.vocab_limit + 7]:
        assert tok.piece_bytes(i).decode("utf-8", "replace") == tok.decode([i]), i
    for _ in range(300):
        ids = [
            rng.choice(specials) if rng.random() < 0.1 else rng.randrange(tok.vocab_limit + 3)
            for _ in range(rng.randint(1, 30))
        ]
        assert b"".join(map(tok.piece_bytes, ids)).decode("utf-8", "replace") == tok.decode(ids)


def test_added_plain_text_tokens_decode_as_the_tokenizer_decodes_them(tok: Tokenizer) -> None:
    """Non-special added tokens are stored as plain text. The ByteLevel decoder reads a token whose characters are
    all in the byte alphabet as bytes (so "café" decodes to "caf\ufffd"), and any other token (with a space or an
    arrow) as its own UTF-8. The byte path must give exactly the tokenizer's text."""
    hf = copy.deepcopy(tok.hf)
    hf.add_tokens(["café", "café au lait", "naïve→ ok", "→"])
    added = Tokenizer(hf, tok.eos_token_ids)
    assert added.byte_level
    new = list(range(len(hf) - 4, len(hf)))
    ids = [*added.encode("Hello "), new[0], *added.encode(" and "), new[1], new[2], new[3], new[0]]
    for i in new:
        assert added.piece_bytes(i).decode("utf-8", "replace") == added.decode([i]), i
    got, tail = _deltas(added, ids)  # the last "café" ends in half a character: held back until the flush
    assert "".join(got) + tail == added.decode(ids)
    assert added.decode([new[3]]) == "→"


def test_a_literal_replacement_character_is_held_back_like_on_the_other_paths(tok: Tokenizer) -> None:
    ids = tok.encode("a\ufffd b")
    for name in ("bytes", "rust", "python"):
        assert _deltas(_path(tok, name), ids) == _deltas(_path(tok, "python"), ids), name


def test_text_broken_past_eight_tokens_is_emitted_then_decoding_goes_on(detok_tok: Tokenizer) -> None:
    tok = detok_tok
    lead = tok.encode("🎉")[0]  # the first byte of a 4-byte character: never valid alone
    ids = [lead] * 10 + tok.encode(" ok then")
    deltas, tail = _deltas(tok, ids)
    assert deltas[:8] == [""] * 8  # held back while it might still become a character
    assert deltas[8] == tok.decode([lead] * 9) and "\ufffd" in deltas[8]  # then given up on
    assert "".join(deltas) + tail == tok.decode(ids)
    assert deltas[9:] == ["", "\ufffd ok", " then"]  # and decoding carries on with the context intact


@pytest.mark.parametrize("name", ["bytes", "rust"])
def test_the_fast_paths_do_not_decode_in_python(
    tok: Tokenizer, name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = _path(tok, name)
    ids = tok.encode(TEXTS[1])
    detok = tok.detokenizer()

    def refuse(*_a: object, **_k: object) -> str:
        raise AssertionError("Tokenizer.decode called on the Rust path")

    monkeypatch.setattr(tok, "decode", refuse)
    text = "".join(detok.add(i) for i in ids)
    monkeypatch.undo()
    assert text + detok.flush() == TEXTS[1]


def test_chat_template_errors_are_request_errors(tok: Tokenizer) -> None:
    hf = copy.deepcopy(tok.hf)
    hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RequestError, match="roles must alternate"):
        Tokenizer(hf).apply_chat_template([{"role": "user", "content": "x"}])
    hf.chat_template = None
    with pytest.raises(RequestError, match="no chat template"):
        Tokenizer(hf).render_chat([{"role": "user", "content": "x"}])
