#!/usr/bin/env bash
# Run the GPU checks on a machine with CUDA, torch, triton and transformers but no package index, from the
# repository root, with the kit from `make gpu-kit` in .gpu-kit/ (docs/cuda.md):
#
#   bash benchmarks/gpu_session.sh env tests     # what the machine has; the GPU tests (a few minutes)
#   bash benchmarks/gpu_session.sh bench [ARGS]  # python -m benchmarks.engine --device cuda ARGS (under 10 minutes)
#   bash benchmarks/gpu_session.sh quant [ARGS]  # the same with --quantized: bf16 vs int8 vs int4 weights, decode
#   bash benchmarks/gpu_session.sh lora [ARGS]   # python -m benchmarks.engine --adapters 4 --device cuda ARGS
#   bash benchmarks/gpu_session.sh profile [ARGS] # python -m benchmarks.engine_profile: where a step's time goes
#   bash benchmarks/gpu_session.sh tiles [ARGS]  # python -m benchmarks.triton_tiles: time the attention tile choices
#   bash benchmarks/gpu_session.sh aot [ARGS]    # python -m inference.triton_aot ARGS: compiled resources, this triton
#
# Each phase's log goes to $OUT/<phase>.log when OUT is set (the device tool's result folder), else to
# /tmp/gpu-session/. Exits non-zero when a phase fails; later phases still run.
set -uo pipefail
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-.gpu-kit}  # relative to the repository root
LOGS=${OUT:-/tmp/gpu-session}
mkdir -p "$LOGS"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE
unset TRITON_INTERPRET

if [ ! -d "$KIT" ]; then
  echo "no $KIT/ here: build it with 'make gpu-kit' and carry it along" >&2
  exit 2
fi
if ls "$KIT"/wheels/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpu-kit-site \
    "$KIT"/wheels/*.whl || exit 2
fi
export PYTHONPATH="$PWD:/tmp/gpu-kit-site${PYTHONPATH:+:$PYTHONPATH}"

status=0
phase() {  # phase NAME COMMAND...: run it, log it, remember a failure
  local name=$1
  shift
  echo "=== $name: $*"
  local t0=$SECONDS
  "$@" 2>&1 | tee "$LOGS/$name.log"
  local rc=$?
  echo "=== $name: exit $rc after $((SECONDS - t0)) s"
  [ "$rc" -eq 0 ] || status=1
}

what=("$@")
[ ${#what[@]} -gt 0 ] || what=(env tests)
while [ ${#what[@]} -gt 0 ]; do
  case ${what[0]} in
    env)
      phase env bash -c "nvidia-smi; \"$PY\" -c 'import sys, torch, triton, transformers; \
print(sys.version.split()[0], \"torch\", torch.__version__, \"triton\", triton.__version__, \
\"transformers\", transformers.__version__); print(torch.cuda.get_device_name(), torch.cuda.mem_get_info())'"
      what=("${what[@]:1}")
      ;;
    tests)
      phase tests "$PY" -m pytest -q -p no:cacheprovider \
        tests/inference/test_triton_attention.py tests/inference/test_triton_layers.py \
        tests/inference/test_cuda_graphs.py tests/inference/test_memory_profile.py \
        tests/inference/test_engine.py tests/inference/test_loader_device.py tests/inference/test_triton_quant.py \
        tests/inference/test_triton_lora.py tests/inference/test_triton_lora_engine.py
      what=("${what[@]:1}")
      ;;
    aot)
      # everything after "aot" is inference.triton_aot's own arguments (default: Qwen3-0.6B and its LoRA kernels, H100)
      args=("${what[@]:1}")
      [ ${#args[@]} -gt 0 ] || args=(--target sm_90 --model qwen3-0.6b --lora qwen3-0.6b)
      phase aot "$PY" -m inference.triton_aot "${args[@]}"
      what=()
      ;;
    tiles)
      # everything after "tiles" is benchmarks.triton_tiles's own arguments
      phase tiles "$PY" -m benchmarks.triton_tiles --model "$KIT/qwen3-0.6b/config.json" "${what[@]:1}"
      what=()
      ;;
    profile)
      # everything after "profile" is benchmarks.engine_profile's own arguments
      phase profile "$PY" -m benchmarks.engine_profile --model "$KIT/qwen3-0.6b/config.json" "${what[@]:1}"
      what=()
      ;;
    bench)
      # everything after "bench" is the benchmark's own arguments
      phase bench "$PY" -m benchmarks.engine --device cuda --model "$KIT/qwen3-0.6b/config.json" "${what[@]:1}"
      what=()
      ;;
    quant)
      # everything after "quant" is the benchmark's own arguments
      phase quant "$PY" -m benchmarks.engine --device cuda --quantized --model "$KIT/qwen3-0.6b/config.json" \
        "${what[@]:1}"
      what=()
      ;;
    lora)
      # everything after "lora" is the LoRA benchmark's own arguments: Triton LoRA kernels and LoRA decode graphs
      phase lora "$PY" -m benchmarks.engine --adapters 4 --device cuda --model "$KIT/qwen3-0.6b/config.json" \
        "${what[@]:1}"
      what=()
      ;;
    *)
      echo "unknown phase ${what[0]}: env, tests, then aot, tiles, profile, bench, quant or lora [ARGS]" >&2
      exit 2
      ;;
  esac
done
exit $status
