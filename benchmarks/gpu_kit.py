"""Pack what the GPU tests and benchmark need on a machine with a GPU, torch and transformers but no package index.

`python -m benchmarks.gpu_kit` (or `make gpu-kit`) writes `.gpu-kit/`: wheels of the runtime's pure-Python needs
that such machines lack (structlog), and the benchmark's model folder: the Qwen3-0.6B config.json with the embedded
SmolLM2 tokenizer beside it (dummy weights need a tokenizer, and the 98 MB SmolLM2 GGUF is too big to carry).
`benchmarks/gpu_session.sh` runs there from the repository root with the kit beside it. See docs/cuda.md.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIT = ROOT / ".gpu-kit"
# Imported by the inference package, its GPU tests and the benchmark, and missing from a plain CUDA + PyTorch +
# transformers image (checked against one: torch 2.11, triton 3.6, transformers 5.17, Python 3.12).
WHEELS = ("structlog",)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def download_wheels(dest: Path, python_version: str) -> list[Path]:
    """The installed version of each package in WHEELS as a wheel for `python_version`, without dependencies."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WHEELS:
        spec = f"{name}=={metadata.version(name)}"
        pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        target = ["--python-version", python_version, "--implementation", "py", "--dest", str(dest)]
        subprocess.run([*pip, *target, spec], check=True, timeout=300)
    return sorted(dest.glob("*.whl"))


def model_folder(dest: Path, config: str) -> Path:
    """`dest/<config>/`: a builtin config.json and the embedded model's tokenizer files."""
    from inference.loader import _dummy_config_path, converted_gguf, smollm2_gguf_path

    folder = dest / config
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_dummy_config_path(config), folder / "config.json")
    converted = converted_gguf(smollm2_gguf_path(), progress=True)
    for name in TOKENIZER_FILES:
        if (converted / name).is_file():
            shutil.copyfile(converted / name, folder / name)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_kit", description=__doc__.splitlines()[0])
    parser.add_argument("--dest", type=Path, default=KIT)
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's Python (default 3.12)")
    parser.add_argument("--model", default="qwen3-0.6b", help="builtin config of the benchmark's model")
    args = parser.parse_args(argv)
    wheels = download_wheels(args.dest / "wheels", args.python_version)
    folder = model_folder(args.dest, args.model)
    size = sum(p.stat().st_size for p in args.dest.rglob("*") if p.is_file())
    print(f"{args.dest}: {len(wheels)} wheel(s), model folder {folder.name}/, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
