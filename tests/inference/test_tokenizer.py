"""The tokenizer wrapper on SmolLM2's real tokenizer: chat templates, tool templates, incremental detokenising."""

from __future__ import annotations

import copy
import random

import pytest

from inference.errors import RequestError
from inference.loader import load_model
from inference.tokenizer import Tokenizer

TEXTS = [
    "Hello 👋 world 🌍! Emoji with joiners: 🧑‍💻👩‍👩‍👧 and flags 🇯🇵.",
    "你好，世界。東京の天気は晴れです。한국어도 됩니다.",
    "Ünïcödé — “quotes”, math ∑∫√ and a tab\tnewline\n end",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_model("smollm2-135m-instruct", dtype="float32").tokenizer


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


@pytest.fixture(params=["rust", "python"])
def detok_tok(request: pytest.FixtureRequest, tok: Tokenizer) -> Tokenizer:
    """The tokenizer with its Rust incremental decoder, or without one (the Python fallback path)."""
    if request.param == "rust":
        assert tok.backend is not None
        return tok
    slow = copy.copy(tok)
    slow.backend = None
    return slow


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


def test_both_paths_emit_the_same_deltas_on_random_streams(tok: Tokenizer) -> None:
    """Ordinary tokens, lone pieces of multi-byte characters, special tokens and ids past the vocabulary (random
    dummy models produce those), shuffled: the Rust and the Python paths emit the same delta at every step."""
    slow = copy.copy(tok)
    slow.backend = None
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
        assert _deltas(tok, ids) == _deltas(slow, ids)


def test_text_broken_past_eight_tokens_is_emitted_then_decoding_goes_on(detok_tok: Tokenizer) -> None:
    tok = detok_tok
    lead = tok.encode("🎉")[0]  # the first byte of a 4-byte character: never valid alone
    ids = [lead] * 10 + tok.encode(" ok then")
    deltas, tail = _deltas(tok, ids)
    assert deltas[:8] == [""] * 8  # held back while it might still become a character
    assert deltas[8] == tok.decode([lead] * 9) and "\ufffd" in deltas[8]  # then given up on
    assert "".join(deltas) + tail == tok.decode(ids)
    assert deltas[9:] == ["", "\ufffd ok", " then"]  # and decoding carries on with the context intact


def test_the_rust_path_does_not_decode_in_python(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
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
