#!/usr/bin/env bash
# One-GPU (H100/H200) measurements for docs/performance.md, under 8 minutes. The GPU machine has
# PyTorch, transformers, peft and safetensors but no network and no diffusers: the packages travel in
# the git-ignored bench/wheels/ (carry that folder). Fill it here first:
#   pip download --no-deps -d bench/wheels diffusers==0.42.1 importlib_metadata
#   bitsandbytes (8-bit AdamW), unpacked to bench/wheels/site/ with only its CUDA 13 libraries:
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_24_x86_64 \
#       -d /tmp/bnb bitsandbytes && unzip /tmp/bnb/*.whl -d bench/wheels/site \
#       && rm bench/wheels/site/bitsandbytes/libbitsandbytes_{cuda1[12]?,rocm*,xpu*}.so
# then run, from the repo root on the GPU machine:   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    bench/wheels/*.whl
export PYTHONPATH="$PWD:$PWD/bench/wheels/site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
timeout 460 python3 bench/gpu_bench.py --what lora full sampling sampling@8 lora-nockpt lora@8 \
    --resolution 512 --batch 2 \
    "$@" 2>&1 | grep -v "should be kept in float32" | tee "${OUT:-/tmp}/gpu_bench.jsonl"
