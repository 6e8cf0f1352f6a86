"""Engine benchmark: our paged, continuously batched engine against Hugging Face transformers on SmolLM2-135M.

Run `python -m benchmarks.engine [--dtype auto|bf16|fp32] [--quick] [--cb-requests N] [--llama-python PATH]`.
Greedy, EOS ignored, one run per figure, every transformers peer measured in the same process at the same dtype.
Prints a table of figures and ratios; exits 0. `--device cuda` runs the GPU benchmark instead
(benchmarks/engine_cuda.py), `--adapters N` the LoRA benchmark (benchmarks/engine_lora.py).

llama.cpp is the second peer when a Python with `llama-cpp-python` is at hand (`--llama-python`, by default
/work/peers/llama-venv/bin/python when it exists; never a dependency of this project): benchmarks/llama_cpp_peer.py
runs in a subprocess on the same GGUF file, with torch's thread count as its `n_threads`, on the same token ids:
the single stream (a 100-token prompt, greedy, alternating with ours in each round) and the mixed workload one
request after another (llama-cpp-python has no continuous batching) against our engine batched, in
`--peer-rounds` alternating rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_LLAMA_PYTHON = "/work/peers/llama-venv/bin/python"
PEER_SCRIPT = Path(__file__).resolve().parent / "llama_cpp_peer.py"


@dataclass(slots=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.max_tokens)

    def head(self, n: int) -> Workload:
        return Workload(self.prompts[:n], self.max_tokens[:n])

    def __len__(self) -> int:
        return len(self.prompts)


def make_workload(
    n: int, prompt_range: tuple[int, int], out_range: tuple[int, int], vocab: int, seed: int = 0
) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(rng.randint(*prompt_range))] for _ in range(n)]
    return Workload(prompts, [rng.randint(*out_range) for _ in range(n)])


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


# ---- our engine ------------------------------------------------------------------------------------------
@dataclass(slots=True)
class KVPeaks:
    """Peak KV bytes over a run, each measured after every step: blocks held by our engine, the bytes of the
    tokens actually cached (the floor any paged cache could reach), and contiguous per-request slabs."""

    paged: int = 0
    tokens: int = 0
    contiguous: int = 0


def engine_throughput(engine: Any, work: Workload) -> tuple[float, KVPeaks]:
    """Seconds for the workload and the peak KV bytes held (ours, the token-exact floor, contiguous slabs)."""
    from inference.params import OutputKind, SamplingParams

    per_token = engine.model_config.kv_bytes_per_token()
    block_bytes = per_token * engine.block_manager.block_size
    bm = engine.block_manager
    t0 = time.perf_counter()
    for i, (p, n) in enumerate(zip(work.prompts, work.max_tokens, strict=True)):
        params = SamplingParams(
            temperature=0, max_tokens=n, ignore_eos=True, output_kind=OutputKind.FINAL_ONLY
        )
        engine.add_request(f"tp-{i}", p, params)
    peaks = KVPeaks()
    while engine.has_unfinished():
        engine.step()
        # all measured at the same point: without paging, every admitted request holds a slab for
        # prompt + max_tokens from admission to its end
        running = engine.scheduler.running
        held = sum(s.num_prompt_tokens + s.params.max_tokens for s in running)
        peaks.contiguous = max(peaks.contiguous, held * per_token)
        peaks.tokens = max(peaks.tokens, sum(s.num_computed_tokens for s in running) * per_token)
        peaks.paged = max(peaks.paged, bm.num_used_blocks * block_bytes)
    elapsed = time.perf_counter() - t0
    return elapsed, peaks


def engine_single(engine: Any, prompt: list[int], n: int) -> float:
    from inference.params import SamplingParams

    t0 = time.perf_counter()
    out = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))[0]
    assert out.completion_tokens == n
    return time.perf_counter() - t0


def engine_ttft(engine: Any, prompt: list[int]) -> float:
    from inference.params import OutputKind, SamplingParams

    t0 = time.perf_counter()
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True, output_kind=OutputKind.DELTA)
    engine.add_request(None, prompt, params)
    while engine.has_unfinished():
        if any(o.delta_token_ids for o in engine.step()):
            break
    return time.perf_counter() - t0


# ---- peers -----------------------------------------------------------------------------------------------
def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of `prompts` left-padded to the longest, as `generate` wants them."""
    longest = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, longest - len(p) :] = torch.tensor(p)
        mask[r, longest - len(p) :] = 1
    return ids, mask


def hf_padded(model: Any, work: Workload, batch: int, pad_id: int) -> float:
    """`generate` in left-padded batches; each batch runs to its longest requested output."""
    t0 = time.perf_counter()
    for i in range(0, len(work.prompts), batch):
        ids, mask = left_padded(work.prompts[i : i + batch], pad_id)
        n = max(work.max_tokens[i : i + batch])
        with torch.inference_mode():
            model.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad_id,
            )
    return time.perf_counter() - t0


def hf_continuous(model: Any, work: Workload) -> float:
    """transformers' own continuous batching (paged attention), each request with its own max_new_tokens."""
    from transformers import GenerationConfig

    gc = GenerationConfig(
        do_sample=False, max_new_tokens=max(work.max_tokens), eos_token_id=None, pad_token_id=0
    )
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(generation_config=gc, block=True, timeout=30) as manager:
        for i, (p, n) in enumerate(zip(work.prompts, work.max_tokens, strict=True)):
            manager.add_request(p, request_id=f"cb-{i}", max_new_tokens=n)
        done = 0
        deadline = time.monotonic() + 1800
        while done < len(work.prompts):
            if time.monotonic() > deadline:
                raise TimeoutError("transformers continuous batching did not finish")
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                done += 1
    return time.perf_counter() - t0


def hf_single(model: Any, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt])
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] - len(prompt) == n
    return time.perf_counter() - t0


# ---- llama.cpp (a subprocess in its own virtual environment) ---------------------------------------------
@dataclass(slots=True)
class LlamaPeer:
    """A Python that imports llama_cpp, and the version it reported."""

    python: str
    version: str


def find_llama_python(given: str | None) -> tuple[LlamaPeer | None, str]:
    """The llama.cpp peer to run, or None and why there is none: `given` (or the default venv's python when it
    exists) must be a file whose python imports llama_cpp."""
    python = given if given is not None else DEFAULT_LLAMA_PYTHON
    if not python:
        return None, "no llama.cpp row: --llama-python is empty"
    if not Path(python).is_file():
        why = "" if given is not None else " (the default; pass --llama-python PATH)"
        return None, f"no llama.cpp row: {python} does not exist{why}"
    try:
        probe = subprocess.run(
            [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"no llama.cpp row: {python} did not run ({exc})"
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return None, f"no llama.cpp row: {python} cannot import llama_cpp ({last})"
    version = probe.stdout.strip()
    return LlamaPeer(python, version), f"llama.cpp peer: llama-cpp-python {version} ({python})"


# how llama.cpp's OpenMP workers wait: libgomp's default (spinning, its users' experience and fastest on idle
# cores) or PASSIVE (fastest on loaded ones); each figure is the faster of the two
PEER_OMP_WAITS = ("default", "passive")


def peer_env(wait: str) -> dict[str, str]:
    """The peer's environment: ours without the OpenMP settings `import inference` made for our engine, and
    PASSIVE for `wait` "passive"."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if wait == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    return env


def llama_run(peer: LlamaPeer, gguf: Path, threads: int, options: list[str], payload: Any) -> dict[str, Any]:
    """llama_cpp_peer.py with `payload` written to a JSON file for `options`' last flag, once per OpenMP wait
    policy (`PEER_OMP_WAITS`); the JSON of the faster run."""
    runs = [_llama_run_once(peer, gguf, threads, options, payload, wait) for wait in PEER_OMP_WAITS]
    return min(runs, key=_peer_seconds)


def _peer_seconds(result: dict[str, Any]) -> float:
    if "workload" in result:
        return float(result["workload"]["seconds"])
    return float(sum(run["seconds"] for run in result["single"]["runs"]))


def _llama_run_once(
    peer: LlamaPeer, gguf: Path, threads: int, options: list[str], payload: Any, wait: str
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="llama-peer-") as tmp:
        data = Path(tmp) / "input.json"
        data.write_text(json.dumps(payload))
        cmd = [
            peer.python,
            str(PEER_SCRIPT),
            "--model",
            str(gguf),
            "--threads",
            str(threads),
            *options,
            str(data),
        ]
        # the full workload one request after another takes minutes on 2 shared cores
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=3600, check=True, env=peer_env(wait)
        )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["omp_wait"] = wait
    return result


def llama_single(peer: LlamaPeer, gguf: Path, threads: int, prompt: list[int], n: int) -> float:
    """Seconds for `n` greedy tokens after `prompt` (prompt and decode, as engine_single)."""
    options = ["--repeats", "1", "--ttft-tokens", "0", "--new-tokens", str(n), "--prompts"]
    result = llama_run(peer, gguf, threads, options, [prompt])
    return float(result["single"]["runs"][0]["seconds"])


def llama_workload(peer: LlamaPeer, gguf: Path, threads: int, work: Workload) -> float:
    """Seconds for the workload's requests one after another."""
    requests = [{"prompt": p, "max_tokens": n} for p, n in zip(work.prompts, work.max_tokens, strict=True)]
    result = llama_run(peer, gguf, threads, ["--workload"], requests)
    if result["workload"]["output_tokens"] != work.output_tokens:
        raise RuntimeError(
            f"llama.cpp made {result['workload']['output_tokens']} tokens, not {work.output_tokens}"
        )
    return float(result["workload"]["seconds"])


def peer_failed(exc: Exception) -> str:
    detail = exc.stderr.strip().splitlines()[-1:] if isinstance(exc, subprocess.CalledProcessError) else []
    return f"llama.cpp peer failed: {exc}" + (f": {detail[0]}" if detail else "")


# ---- main ------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--dtype",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: what the engine picks on this CPU (bf16 with AVX512-BF16 or AMX, else fp32)",
    )
    parser.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda runs the GPU benchmark (benchmarks/engine_cuda.py: Qwen3-0.6B dummy weights, 256 requests)",
    )
    parser.add_argument(
        "--quantize",
        choices=["auto", "none", "int8", "int4"],
        default="auto",
        help="our weights (load_model's quantize): auto keeps the GGUF's int4/int8 blocks in bf16; none is float, "
        "as the transformers peer",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="our decode steps of up to 8 rows through torch.compile (EngineConfig.compile; compiled before timing) "
        "instead of the fused C++ decode step",
    )
    parser.add_argument(
        "--no-fused",
        action="store_true",
        help="our decode steps op by op in eager torch, without the fused C++ decode step (EngineConfig.fused_decode)",
    )
    parser.add_argument("--quick", action="store_true", help="16 requests and shorter outputs")
    parser.add_argument("--skip-cb", action="store_true", help="leave out transformers' continuous batching")
    parser.add_argument(
        "--cb-requests",
        type=int,
        default=None,
        help="run the continuous-batching comparison on the first N requests only (both sides); default all",
    )
    parser.add_argument(
        "--llama-python",
        default=None,
        metavar="PATH",
        help=f"a python with llama-cpp-python for the llama.cpp rows (default: {DEFAULT_LLAMA_PYTHON} when it "
        "exists; '' leaves them out)",
    )
    parser.add_argument(
        "--peer-rounds",
        type=int,
        default=1,
        help="alternating rounds of ours batched and llama.cpp one after another on the workload (median)",
    )
    parser.add_argument(
        "--adapters",
        type=int,
        default=0,
        help="N > 0 runs the LoRA benchmark instead (benchmarks/engine_lora.py: the workload over N adapters)",
    )
    args, rest = parser.parse_known_args(argv)
    if args.adapters:
        from benchmarks import engine_lora

        return engine_lora.main(argv if argv is not None else sys.argv[1:])
    if args.device == "cuda":
        from benchmarks import engine_cuda

        return engine_cuda.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    from rich.console import Console
    from rich.table import Table
    from transformers import LlamaForCausalLM

    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import _gguf_cache_dir, load_model, resolve_dtype, smollm2_gguf_path
    from inference.model_runner import configure_threads

    console = Console()
    threads = configure_threads()
    peer, peer_line = find_llama_python(args.llama_python)
    dtype = resolve_dtype(args.dtype, torch.device("cpu"))
    dtype_label = "bf16" if dtype == torch.bfloat16 else "fp32"
    n_req = 16 if args.quick else 64
    out_range = (16, 64) if args.quick else (16, 256)
    single_n = 64 if args.quick else 128

    console.print(
        f"[bold]engine benchmark[/] SmolLM2-135M, {dtype_label}, {threads} threads, {n_req} requests, "
        f"load average {os.getloadavg()[0]:.1f} (other processes share the cores)"
    )
    console.print(peer_line)
    loads = [os.getloadavg()[0]]
    gguf = smollm2_gguf_path()
    loaded = load_model(gguf, dtype=dtype, quantize=args.quantize)
    if loaded.quantization is not None:
        dtype_label += f", ours {loaded.quantization.describe()}"
    vocab = loaded.config.vocab_size
    work = make_workload(n_req, (32, 512), out_range, vocab)
    engine = LLMEngine(
        loaded,
        EngineConfig(
            kv_cache_memory=640 * 2**20,
            max_model_len=2048,
            max_num_seqs=64,
            compile=args.compile,
            fused_decode=not (args.compile or args.no_fused),
        ),
    )
    rng = random.Random(1)
    single_prompt = [rng.randrange(100, vocab - 100) for _ in range(100)]
    prefix = [rng.randrange(100, vocab - 100) for _ in range(1000)]

    # warm up the code paths once (first calls pay for lazy initialisation)
    engine_single(engine, single_prompt[:8], 4)

    eng_tp, kv = engine_throughput(engine, work)
    loads.append(os.getloadavg()[0])
    # ours batched next to llama.cpp one after another on the same requests, alternating when asked
    eng_rounds, llama_rounds = [eng_tp], []
    peer_errors: list[str] = []
    for i in range(args.peer_rounds):
        if peer is None or peer_errors:
            break
        if i:
            eng_rounds.append(engine_throughput(engine, work)[0])
        try:
            llama_rounds.append(llama_workload(peer, gguf, threads, work))
        except (subprocess.SubprocessError, OSError, RuntimeError, ValueError, KeyError) as exc:
            peer_errors.append(peer_failed(exc))
        loads.append(os.getloadavg()[0])
    # both sides of the continuous-batching comparison run the same requests
    n_cb = min(args.cb_requests or n_req, n_req)
    cb_work = work.head(n_cb)
    eng_cb = engine_throughput(engine, cb_work)[0] if cb_work.prompts != work.prompts else eng_tp
    cold = engine_ttft(engine, prefix + [rng.randrange(100, 1000) for _ in range(16)])
    warm = engine_ttft(engine, prefix + [rng.randrange(1000, 2000) for _ in range(16)])
    engine_rss = peak_rss_bytes()
    per_token_bytes = engine.model_config.kv_bytes_per_token()

    path = _gguf_cache_dir(gguf)
    hf = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").eval()
    hf_single(hf, single_prompt[:8], 4)
    # single stream is short and the cores are shared: alternate the two and keep each one's best of three
    eng_single = hf_one = llama_one = float("inf")
    for _ in range(3):
        eng_single = min(eng_single, engine_single(engine, single_prompt, single_n))
        hf_one = min(hf_one, hf_single(hf, single_prompt, single_n))
        if peer is not None and not peer_errors:
            try:
                llama_one = min(llama_one, llama_single(peer, gguf, threads, single_prompt, single_n))
            except (subprocess.SubprocessError, OSError, ValueError, KeyError) as exc:
                peer_errors.append(peer_failed(exc))
    loads.append(os.getloadavg()[0])
    metrics = engine.metrics()
    del engine, loaded
    hf_pad = hf_padded(hf, work, 16, pad_id=2)
    del hf
    cb: float | None = None
    if not args.skip_cb:
        hf_cb = LlamaForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="paged|sdpa").eval()
        cb = hf_continuous(hf_cb, cb_work)
        del hf_cb

    loads.append(os.getloadavg()[0])
    toks = work.output_tokens
    peers = "transformers and llama.cpp" if llama_rounds else "transformers"
    table = Table(title=f"engine vs {peers} (SmolLM2-135M, {dtype_label}, CPU x{threads})")
    for col in ("figure", "ours", "peer", "ratio", "target"):
        table.add_column(col, justify="right" if col != "figure" else "left")

    def mark(ok: bool) -> str:
        return "[green]ok[/]" if ok else "[red]miss[/]"

    r = (toks / eng_tp) / (toks / hf_pad)
    table.add_row(
        f"{n_req} req throughput (out tok/s) vs HF generate pad16",
        f"{toks / eng_tp:.1f}",
        f"{toks / hf_pad:.1f}",
        f"{r:.2f}x",
        f">= 2x {mark(r >= 2)}",
    )
    if cb is not None:
        r = cb / eng_cb
        cb_toks = cb_work.output_tokens
        table.add_row(
            f"{len(cb_work.prompts)} req throughput (out tok/s) vs HF continuous batching",
            f"{cb_toks / eng_cb:.1f}",
            f"{cb_toks / cb:.1f}",
            f"{r:.2f}x",
            f">= 1.2x {mark(r >= 1.2)}",
        )
    if llama_rounds:
        ours_s, llama_s = statistics.median(eng_rounds), statistics.median(llama_rounds)
        r = llama_s / ours_s
        table.add_row(
            f"{n_req} req throughput (out tok/s) vs llama.cpp one after another"
            + (f" (median of {len(llama_rounds)})" if len(llama_rounds) > 1 else ""),
            f"{toks / ours_s:.1f}",
            f"{toks / llama_s:.1f}",
            f"{r:.2f}x",
            f">= 3x {mark(r >= 3)}",
        )
    r = hf_one / eng_single
    table.add_row(
        f"single stream {len(single_prompt)}+{single_n} tok (tok/s, best of 3) vs HF",
        f"{single_n / eng_single:.1f}",
        f"{single_n / hf_one:.1f}",
        f"{r:.2f}x",
        f">= 1.0x {mark(r >= 1.0)}",
    )
    if llama_one != float("inf"):
        r = llama_one / eng_single
        table.add_row(
            f"single stream {len(single_prompt)}+{single_n} tok (tok/s, best of 3) vs llama.cpp",
            f"{single_n / eng_single:.1f}",
            f"{single_n / llama_one:.1f}",
            f"{r:.2f}x",
            f">= 1.0x {mark(r >= 1.0)}",
        )
    r = cold / warm
    table.add_row(
        "TTFT, 1000-token shared prefix (ms): warm vs cold",
        f"{warm * 1000:.0f}",
        f"{cold * 1000:.0f}",
        f"{r:.1f}x",
        f">= 5x {mark(r >= 5)}",
    )
    saving = 1 - kv.paged / kv.contiguous if kv.contiguous else 0.0
    table.add_row(
        "peak KV held (MiB) vs contiguous prompt+max_tokens slabs",
        f"{kv.paged / 2**20:.0f}",
        f"{kv.contiguous / 2**20:.0f}",
        f"{saving:.0%} lower",
        f">= 30% {mark(saving >= 0.30)}",
    )
    # the floor for any paged cache on this workload: only the tokens whose KV exists at that moment; the
    # saving against the slabs cannot exceed this row's, whatever the block size or scheduler
    floor = 1 - kv.tokens / kv.contiguous if kv.contiguous else 0.0
    table.add_row(
        "  floor: KV of the tokens cached at peak vs the same slabs (info)",
        f"{kv.tokens / 2**20:.0f}",
        f"{kv.contiguous / 2**20:.0f}",
        f"{floor:.0%} lower",
        "",
    )
    # what a padded batch cache ([requests, longest prompt + longest output]) for the same workload would hold
    padded = len(work.prompts) * (max(map(len, work.prompts)) + max(work.max_tokens)) * per_token_bytes
    table.add_row(
        "peak KV held (MiB) vs one padded batch cache (info)",
        f"{kv.paged / 2**20:.0f}",
        f"{padded / 2**20:.0f}",
        f"{1 - kv.paged / padded:.0%} lower",
        "",
    )
    table.add_row(
        "peak RSS after the engine runs (MiB)",
        f"{engine_rss / 2**20:.0f}",
        "",
        "",
        f"< 2048 {mark(engine_rss < 2 * 2**30)}",
    )
    console.print(table)
    for line in peer_errors:
        console.print(f"[red]{line}[/]")
    if llama_rounds:
        console.print(
            f"llama.cpp: {gguf.name}, n_threads {threads}, the same token ids; workload wall "
            + ", ".join(f"{t:.1f}s" for t in llama_rounds)
            + " (ours "
            + ", ".join(f"{t:.1f}s" for t in eng_rounds)
            + ")"
        )
    console.print(f"load average during the run: {min(loads):.1f}-{max(loads):.1f}")
    console.print(
        f"engine: {metrics.steps} steps, mean batch {metrics.batch_size_mean:.1f} seqs / "
        f"{metrics.batched_tokens_mean:.0f} tokens, max running {metrics.max_running_seqs}, "
        f"preemptions {metrics.preemptions}, prefix hit rate {metrics.prefix_cache_hit_rate:.1%}; "
        f"wall: engine {eng_tp:.1f}s, HF pad16 {hf_pad:.1f}s"
        + (f", HF CB {cb:.1f}s" if cb is not None else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
