#!/usr/bin/env bash
# One-GPU (H100/H200) measurements for docs/performance.md, eager vs compiled blocks side by side, one
# JSON line per measurement, under 8 minutes (each part gets what is left of a 470 s budget; a part that
# gets too little prints a "skipped" line). Parts, in this order:
#   sampling lora1024 ladd cards   bench/gpu_bench.py (see its docstring)
#   bnb                            bench/bnb_fsdp2.py: bitsandbytes' 8-bit AdamW on FSDP2 (DTensor) parameters
#   fsdp                           bench/fsdp_resume.py: torchrun + `ladd train`, SIGKILL, resume, compare
#   fsdpcompile                    bench/fsdp_compile.py: a LADD step of FSDP2-sharded roles, compiled == eager
#   bash bench/gpu.sh                       # all parts, from the repo root on the GPU machine
#   bash bench/gpu.sh ladd --profile        # some parts; other arguments go to gpu_bench.py
#   PYTHON=.venv/bin/python bash bench/gpu.sh --tiny --device cpu     # the dry run on a CPU (minutes)
# The GPU machine has PyTorch, transformers, peft and safetensors but no network and no diffusers: the
# packages travel in the git-ignored bench/wheels/ (carry that folder). Fill it here first:
#   pip download --no-deps -d bench/wheels diffusers==0.42.1 importlib_metadata
#   bitsandbytes (8-bit AdamW), unpacked to bench/wheels/site/ with only its CUDA 13 libraries:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#       -d /tmp/bnb bitsandbytes && unzip /tmp/bnb/*.whl -d bench/wheels/site \
#       && rm bench/wheels/site/bitsandbytes/libbitsandbytes_{cuda1[12]?,rocm*,xpu*}.so
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
parts=() rest=()
for a in "$@"; do
    case $a in sampling|lora1024|ladd|cards|bnb|fsdp|fsdpcompile) parts+=("$a") ;; *) rest+=("$a") ;; esac
done
[ ${#parts[@]} -gt 0 ] || parts=(sampling lora1024 ladd cards bnb fsdp fsdpcompile)
if compgen -G "bench/wheels/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        bench/wheels/*.whl
    export PYTHONPATH="$PWD:$PWD/bench/wheels/site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))")
for a in "${rest[@]}"; do [ "$a" = cpu ] && cuda=0; done
if [ "$cuda" = 1 ]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
else  # the CPU dry run: one intra-op thread (on a shared 2-core machine two threads made every op ~6 ms)
    export OMP_NUM_THREADS=1
fi
out="${OUT:-/tmp}/gpu_bench.jsonl"
: >"$out"
start=$SECONDS
for part in "${parts[@]}"; do
    left=$((470 - (SECONDS - start)))
    if [ "$left" -lt 30 ]; then
        echo "{\"what\": \"$part\", \"skipped\": \"$left s left of the 470 s budget\"}" | tee -a "$out"
        continue
    fi
    case $part in
        bnb) if [ "$cuda" = 1 ]; then cmd=("$PY" -m torch.distributed.run --nproc_per_node 1 bench/bnb_fsdp2.py)
             else cmd=("$PY" -m torch.distributed.run --nproc_per_node 2 bench/bnb_fsdp2.py); fi ;;
        # One GPU: one NCCL rank (the trainer does not shard a world of 1); CPU: two gloo ranks, FSDP2.
        fsdp) if [ "$cuda" = 1 ]; then cmd=("$PY" bench/fsdp_resume.py --nproc 1 --optimizer adamw adamw8bit)
              else cmd=("$PY" bench/fsdp_resume.py --nproc 2); fi ;;
        fsdpcompile) cmd=("$PY" -m torch.distributed.run --nproc_per_node $((cuda == 1 ? 1 : 2)) bench/fsdp_compile.py) ;;
        *) cmd=("$PY" bench/gpu_bench.py --what "$part" "${rest[@]}") ;;
    esac
    { timeout "$left" "${cmd[@]}" 2>&1 || echo "{\"what\": \"$part\", \"error\": \"exit $? (124: out of time)\"}"; } \
        | { grep -v -E "should be kept in float32|Warning|warnings.warn|it/s\]|^USDT:|^  " || true; } | tee -a "$out"
done
echo "{\"what\": \"gpu.sh\", \"wall_s\": $((SECONDS - start))}" | tee -a "$out"
