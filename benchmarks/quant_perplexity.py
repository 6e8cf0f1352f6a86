"""Perplexity of SmolLM2-135M per weight format: fp32, bf16, ISQ int8/int4 and GGUF files of each type we load.

Run `python -m benchmarks.quant_perplexity [--types Q8_0,Q5_1,Q5_0,Q4_1,Q4_0] [--isq int8,int4] [--tokens N]
[--k-quants Q4_K_M,Q5_K_M,Q6_K] [--llama-python PATH] [--keep DIR]`. Only the packaged SmolLM2 GGUF (Q4_1 layers, Q8_0 embedding) is on disk, so each GGUF type is made
here with the `gguf` package: every linear layer of the packaged file dequantized to float32 and quantized again
to the type (`gguf.quants.quantize`; it has no K-quant quantizer), the Q8_0 embedding (the tied head) copied as
its bytes, all metadata and the tokenizer copied. Each file is then loaded by our loader with `quantize="auto"` on
a bf16 model (its blocks kept: Q4_x as int4, Q5_x and Q8_0 as int8) and scored by one prefill of
benchmarks/perplexity_sample.txt, against bf16 of the same source (the packaged file dequantized). Since every
copy starts from Q4_1's dequantized values, a type's figure is its added loss on top of Q4_1, not its loss from
the original float model.

K-quants come from llama.cpp's own quantizer when a Python with llama-cpp-python is at hand (`--llama-python`,
default /work/peers/llama-venv/bin/python when it exists; benchmarks/llama_cpp_peer.py `--quantize-to`), run on a
float32 copy (the linears dequantized, the Q8_0 embedding as it was). They are llama-quantize's mixes: on SmolLM2,
whose 576-wide inputs are not multiples of K-quants' 256, llama.cpp falls back to Q5_0/Q5_1/Q8_0 for those tensors
(Q4_K/Q5_K/Q6_K land on the 1536-wide `ffn_down`), which is what such a file downloaded for SmolLM2 holds too; the
weights column gives the per-type count. The files go to a temporary folder removed at the end (or `--keep DIR`), and each
file's conversion cache entry is removed after it is scored. Exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks.quant_decode import load_variant, perplexity, sample_ids

TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0")  # what gguf.quants can write and our loader keeps quantized
ISQ = ("int8", "int4")
K_QUANTS = ("Q4_K_M", "Q5_K_M", "Q6_K")  # written by llama.cpp's quantizer (llama_cpp_peer.QUANTIZE_TYPES)


def requantized_copy(source: Path, qtype: str, out: Path) -> Path:
    """A copy of the GGUF `source` whose quantized linear weights are re-quantized to `qtype` (from their float32
    dequantization); the embedding, float tensors, metadata and tokenizer are copied unchanged."""
    import gguf
    from gguf.quants import dequantize, quantize

    target = gguf.GGMLQuantizationType[qtype]
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields["general.architecture"].contents()
    tmp = out.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for key, field in reader.fields.items():
        # the writer sets the header counts and the architecture itself
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub_type = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.name == "token_embd.weight" or tensor.tensor_type in (
            gguf.GGMLQuantizationType.F32,
            gguf.GGMLQuantizationType.F16,
            gguf.GGMLQuantizationType.BF16,
        ):
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
            continue
        values = dequantize(data, tensor.tensor_type)
        writer.add_tensor(tensor.name, quantize(values, target), raw_dtype=target)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(out)
    return out


def llama_quantized(python: str, f32: Path, ftype: str, out: Path, threads: int) -> Path:
    """`f32` quantized to the llama.cpp file type `ftype` by llama_cpp_peer.py in the peer's Python."""
    from benchmarks.engine import PEER_SCRIPT

    cmd = [python, str(PEER_SCRIPT), "--model", str(f32), "--quantize-to", ftype, "--out", str(out)]
    done = subprocess.run(
        [*cmd, "--threads", str(threads)], capture_output=True, text=True, timeout=900, check=True
    )
    json.loads(done.stdout.strip().splitlines()[-1])  # its report: the run ended as it should
    return out


@dataclass(slots=True)
class Row:
    variant: str
    perplexity: float
    weights: str  # the loader's report line
    file_mib: float = 0.0
    dequantized: float | None = None  # the same file loaded as float (bf16), for GGUF rows


def gguf_row(label: str, path: Path, ids: list[int], *, temporary: bool = True) -> Row:
    """Perplexity of `ids` under the file kept quantized (quantize auto, bf16) and dequantized (quantize none,
    bf16): the difference is our loader's own loss on that type; the latter's distance to bf16 is the format's."""
    from inference.cpu_linear import pack_linear_weights
    from inference.loader import _gguf_cache_dir, load_model

    try:
        scores: list[float] = []
        weights = "float weights"
        for mode in ("auto", "none"):
            loaded = load_model(path, dtype="bfloat16", quantize=mode)
            pack_linear_weights(loaded.model)  # as the model runner does
            scores.append(perplexity(loaded.model, ids))
            if mode == "auto" and loaded.quantization is not None:
                weights = loaded.quantization.describe()
            del loaded
        return Row(label, scores[0], weights, path.stat().st_size / 2**20, scores[1])
    finally:
        if (
            temporary
        ):  # the loader's cache entry (config, tokenizer, float copy) of a file about to be deleted
            shutil.rmtree(_gguf_cache_dir(path), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument(
        "--types", default=",".join(TYPES), help=f"GGUF types to write and score, of {', '.join(TYPES)}"
    )
    ap.add_argument(
        "--isq", default=",".join(ISQ), help="in-situ quantized variants of the float model ('' none)"
    )
    ap.add_argument("--tokens", type=int, default=0, help="only the sample's first N tokens (default all)")
    ap.add_argument(
        "--k-quants",
        default=None,
        help=f"llama.cpp file types to write with its quantizer (default {','.join(K_QUANTS)} when the peer is "
        "found; '' none)",
    )
    ap.add_argument(
        "--llama-python", default=None, help="a python with llama-cpp-python (the K-quants' writer)"
    )
    ap.add_argument("--keep", type=Path, default=None, help="write the GGUF files here and keep them")
    args = ap.parse_args(argv)
    types = [t.strip() for t in args.types.split(",") if t.strip()]
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        ap.error(f"unknown GGUF types {', '.join(unknown)}; known: {', '.join(TYPES)}")
    isq = [v.strip() for v in args.isq.split(",") if v.strip()]
    if any(v not in ISQ for v in isq):
        ap.error(f"--isq takes {', '.join(ISQ)}")

    from benchmarks.engine import find_llama_python
    from benchmarks.llama_cpp_peer import QUANTIZE_TYPES
    from inference.loader import smollm2_gguf_path
    from inference.model_runner import configure_threads

    peer, peer_line = find_llama_python(args.llama_python)
    k_quants = [
        k.strip() for k in (args.k_quants if args.k_quants is not None else ",".join(K_QUANTS)).split(",")
    ]
    k_quants = [k for k in k_quants if k]
    if any(k not in QUANTIZE_TYPES for k in k_quants):
        ap.error(f"--k-quants takes {', '.join(sorted(QUANTIZE_TYPES))}")
    if k_quants and peer is None:
        print(f"{peer_line}: no K-quant rows (the gguf package cannot write them)")
        k_quants = []
    threads = configure_threads()
    source = smollm2_gguf_path()
    ids = sample_ids(args.tokens)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    rows: list[Row] = []
    for name in ("fp32", "bf16", *isq):
        model, what = load_variant(name)
        rows.append(Row(name if name in ("fp32", "bf16") else f"ISQ {name}", perplexity(model, ids), what))
        del model
    rows.append(gguf_row("GGUF Q4_1 as shipped", source, ids, temporary=False))
    with tempfile.TemporaryDirectory(prefix="quant-ppl-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for qtype in types:
            t0 = time.perf_counter()
            path = requantized_copy(source, qtype, folder / f"SmolLM2-135M-from-Q4_1.{qtype}.gguf")
            rows.append(gguf_row(f"GGUF {qtype} (gguf package, {time.perf_counter() - t0:.0f} s)", path, ids))
            if args.keep is None:
                path.unlink()
        if k_quants and peer is not None:
            f32 = requantized_copy(source, "F32", folder / "SmolLM2-135M-from-Q4_1.F32.gguf")
            for ftype in k_quants:
                out = folder / f"SmolLM2-135M-from-Q4_1.{ftype}.gguf"
                t0 = time.perf_counter()
                try:
                    llama_quantized(peer.python, f32, ftype, out, threads)
                except (subprocess.SubprocessError, OSError, ValueError, IndexError) as exc:
                    print(f"llama.cpp could not write {ftype}: {exc}")
                    continue
                label = f"GGUF {ftype} (llama.cpp's quantizer, {time.perf_counter() - t0:.0f} s)"
                rows.append(gguf_row(label, out, ids))
                if args.keep is None:
                    out.unlink()
            if args.keep is None:
                f32.unlink()
    bf16 = next(r.perplexity for r in rows if r.variant == "bf16")
    print(
        f"perplexity of benchmarks/perplexity_sample.txt ({len(ids)} SmolLM2 tokens, one prefill), {threads} threads, "
        f"{time.perf_counter() - started:.0f} s, load average {load_start:.1f}-{os.getloadavg()[0]:.1f}; GGUF rows: "
        "kept quantized (quantize auto, bf16), and the same file dequantized (quantize none, bf16)"
    )
    print(
        f"{'variant':46s} {'ppl':>7s} {'vs bf16':>8s} {'dequant.':>8s} {'vs bf16':>8s} {'MiB':>6s}  weights"
    )

    def rel(p: float) -> str:
        return f"{(p / bf16 - 1) * 100:+.2f}%"

    for r in rows:
        deq = (
            f"{r.dequantized:8.2f} {rel(r.dequantized):>8s}"
            if r.dequantized is not None
            else f"{'':8s} {'':8s}"
        )
        mib = f"{r.file_mib:6.1f}" if r.file_mib else f"{'':6s}"
        print(f"{r.variant:46s} {r.perplexity:7.2f} {rel(r.perplexity):>8s} {deq} {mib}  {r.weights}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
