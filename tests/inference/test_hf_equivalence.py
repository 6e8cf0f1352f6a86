"""Greedy output of our engine equals Hugging Face transformers `generate` on the same weights (fp32)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from inference.config import EngineConfig
from inference.engine import LLMEngine
from inference.loader import load_model
from inference.params import SamplingParams

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, how are you today? I am fine, thank you.",
    "What time is it in Tokyo? Call the tool get_current_time.",
    "Paged attention keeps the KV cache in fixed-size blocks.",
]
PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "Hello world, how are you?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What time is it in Tokyo?"},
    ],
    [{"role": "user", "content": "The quick brown fox"}],
]
NEW_TOKENS = 24


def build_tokenizer(folder: Path) -> Any:
    """A small byte-level BPE tokenizer with a ChatML template, trained in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", bos_token="<|endoftext|>")
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(folder)
    return hf


def build_tiny_model(folder: Path, arch: str, *, seed: int = 0) -> Any:
    """A random tiny HF model of `arch` (llama, qwen2, qwen3) saved with its tokenizer; returns the HF model."""
    import transformers

    tok = build_tokenizer(folder)
    common: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 1024,
        "initializer_range": 0.2,  # large weights give varied (non-degenerate) greedy continuations
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=True)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=False)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "qwen3":
        cfg = transformers.Qwen3Config(**common, head_dim=32, tie_word_embeddings=True)
        cls = transformers.Qwen3ForCausalLM
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    if arch == "qwen2":  # give the q/k/v biases non-zero values so that they are exercised
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model


def hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids], device=model.device),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(tmp_path: Path, arch: str) -> None:
    hf = build_tiny_model(tmp_path, arch)
    hf.generation_config.eos_token_id = None
    loaded = load_model(str(tmp_path), dtype="float32")
    engine = LLMEngine(loaded, EngineConfig(num_blocks=80, block_size=16))
    outs = engine.generate(PROMPTS, greedy())
    for messages, out in zip(PROMPTS, outs, strict=True):
        ids = loaded.tokenizer.apply_chat_template(messages)
        expected = hf_greedy(hf, ids, NEW_TOKENS)
        assert len(set(expected)) > 3, "degenerate reference; the test would prove little"
        assert out.token_ids == expected, f"{arch}: {messages[-1]['content']!r}"
        assert out.finish_reason == "length"


@pytest.mark.smollm2
def test_smollm2_matches_transformers(smollm2: Any) -> None:
    from transformers import LlamaForCausalLM

    from inference.loader import _gguf_cache_dir, smollm2_gguf_path

    hf = LlamaForCausalLM.from_pretrained(_gguf_cache_dir(smollm2_gguf_path()), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None
    engine = LLMEngine(smollm2, EngineConfig(num_blocks=96, max_model_len=1024))
    prompts = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a haiku about the sea."}],
    ]
    outs = engine.generate(prompts, greedy(16))
    for messages, out in zip(prompts, outs, strict=True):
        ids = smollm2.tokenizer.apply_chat_template(messages)
        assert out.token_ids == hf_greedy(hf, ids, 16)
    assert "Paris" in outs[0].text


@pytest.fixture(scope="module")
def smollm2(smollm2_fp32: Any) -> Any:
    return smollm2_fp32
