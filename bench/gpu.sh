#!/usr/bin/env bash
# One-GPU (H100/H200) measurements for docs/performance.md, under 8 minutes. The GPU machine has
# PyTorch, transformers, peft and safetensors but no network and no diffusers: the diffusers wheel
# travels along (fetch it here first, into the git-ignored bench/wheels/, and carry that folder):
#   pip download --no-deps -d bench/wheels diffusers==0.42.1
# then run, from the repo root on the GPU machine:   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
pip install --quiet --no-deps bench/wheels/diffusers-*.whl
pip install --quiet --no-deps -e .
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 460 python bench/gpu_bench.py --what sampling lora full --resolution 512 --batch 2
