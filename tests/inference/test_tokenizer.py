"""The tokenizer wrapper on SmolLM2's real tokenizer: chat templates, tool templates, incremental detokenising."""

from __future__ import annotations

import copy

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


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_emits_broken_utf8(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    # The test only means something if some token is a partial character on its own.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok = tok.detokenizer()
    deltas = [detok.add(i) for i in ids]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == text


def test_detokenizer_flush_releases_an_incomplete_character(tok: Tokenizer) -> None:
    ids = tok.encode("👋")
    assert len(ids) > 1
    detok = tok.detokenizer()
    assert detok.add(ids[0]) == ""  # held back: half an emoji
    assert detok.flush() == tok.decode(ids[:1])
    assert detok.flush() == ""


def test_detokenizer_skips_special_tokens_and_keeps_spacing(tok: Tokenizer) -> None:
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "a b  c"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=False)
    detok = tok.detokenizer()
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == tok.decode(ids) == "system\nS\nuser\na b  c\n"


def test_chat_template_errors_are_request_errors(tok: Tokenizer) -> None:
    hf = copy.deepcopy(tok.hf)
    hf.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(RequestError, match="roles must alternate"):
        Tokenizer(hf).apply_chat_template([{"role": "user", "content": "x"}])
    hf.chat_template = None
    with pytest.raises(RequestError, match="no chat template"):
        Tokenizer(hf).render_chat([{"role": "user", "content": "x"}])
