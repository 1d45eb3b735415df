#!/usr/bin/env bash
# The whole pipeline through the CLI on whatever device torch finds (a GPU machine: the CUDA paths of
# precompute, the trainer — bf16 autocast, full and LoRA students, gradient checkpointing — and eval),
# on the embedded toy teacher; ~1 minute. Packages as in bench/gpu.sh (bench/wheels/, carried).
#   bash bench/gpu_train_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import diffusers" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        bench/wheels/*.whl
    export PYTHONPATH="$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
W=$(mktemp -d)
python3 -m ladd toy prompts --n 48 --split train --out "$W/prompts.txt"
python3 -m ladd precompute --pipeline toy --prompts "$W/prompts.txt" --out "$W/data" --dtype bf16 --decode-first 48
for student in full lora; do
    python3 -m ladd train --config configs/toy.toml --set data.path="$W/data" --set train.out="$W/run-$student" \
        --set train.steps=12 --set validation.every=6 --set train.checkpoint_every=6 \
        --set model.student="$student" --set model.gradient_checkpointing=true 2>&1 | grep -v "it/s\]" | tail -4
    python3 -m ladd eval --data "$W/data" --run "$W/run-$student" --features random-conv --subset-size 24 \
        --subsets 5 --out "$W/eval-$student.json" | tail -4
done
echo "gpu_train_smoke: ok ($(python3 -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'))"
