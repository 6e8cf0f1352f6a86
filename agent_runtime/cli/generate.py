"""`agent-runtime generate [--model M] [--adapter NAME=PATH] [--max-tokens N] [--temperature T] [--chat] PROMPT`:
stream a completion (under the LoRA adapter, when one is given)."""

from __future__ import annotations

import argparse
import sys

from agent_runtime.cli.common import (
    add_adapter_argument,
    add_compile_argument,
    add_device_argument,
    add_quantize_argument,
    parse_adapters,
)

# torch and the engine are imported inside run(): building the parser must stay cheap for every command.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text (use '-' to read it from stdin)")
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="builtin name, model folder, .gguf file or hub id (default: smollm2-135m-instruct)",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    parser.add_argument("--seed", type=int, default=None, help="sampling seed for reproducible output")
    parser.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message in the chat template"
    )
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where fast), bf16, fp16 or fp32")
    add_device_argument(parser, from_config=False)
    add_adapter_argument(parser)  # the prompt runs under the last one given
    add_quantize_argument(parser, from_config=False)
    add_compile_argument(parser, from_config=False)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--stats", action="store_true", help="print timing figures to stderr at the end")


def run(args: argparse.Namespace) -> int:
    import time

    from inference.config import EngineConfig
    from inference.engine import LLMEngine
    from inference.loader import load_model
    from inference.params import OutputKind, SamplingParams

    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    adapters = parse_adapters(args.adapter)
    loaded = load_model(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        quantize_group_size=args.quantize_group_size,
        progress=sys.stderr.isatty(),
    )
    engine = LLMEngine(loaded, EngineConfig(max_num_seqs=1, compile=args.compile), adapters=adapters)
    if args.chat:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        prompt: str | list[dict[str, str]] = [*messages, {"role": "user", "content": prompt_text}]
    else:
        prompt = prompt_text
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        output_kind=OutputKind.DELTA,  # only deltas and the final counts are read
        adapter=list(adapters)[-1] if adapters else None,
    )
    started = time.perf_counter()
    engine.add_request("cli", prompt, params)
    final = None
    out = sys.stdout
    while engine.has_unfinished():
        for o in engine.step():
            if o.delta_text:
                out.write(o.delta_text)
                out.flush()
            final = o
    out.write("\n")
    out.flush()
    if args.stats and final is not None:
        m = engine.metrics()
        elapsed = time.perf_counter() - started
        print(
            f"[{final.prompt_tokens} prompt + {final.completion_tokens} completion tokens, "
            f"finish={final.finish_reason}, ttft={m.ttft.mean * 1000:.0f} ms, "
            f"{final.completion_tokens / elapsed:.1f} tok/s]",
            file=sys.stderr,
        )
        quant = loaded.quantization
        print(f"[{quant.describe() if quant is not None else 'float weights'}]", file=sys.stderr)
    return 0
