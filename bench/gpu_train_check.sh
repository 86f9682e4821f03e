#!/usr/bin/env bash
# GPU training check in one go, under 10 minutes: ViT-L/14 bf16 step throughput, MFU and peak memory with
# FSDP2 (with and without activation checkpointing) on one GPU, then a 2-GPU DDP run where two GPUs exist.
# Without CUDA it prints one line saying so and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)" 2>/dev/null || echo 0)
if [ "$NGPU" -lt 1 ]; then
  echo "gpu_train_check: skipped, no CUDA device"
  exit 0
fi
timeout 360 "$PY" bench/gpu_train_check.py --config vitl14 --steps 10 --batch 32 --strategies fsdp,fsdp+ac "$@"
if [ "$NGPU" -ge 2 ]; then
  timeout 200 "$PY" -m torch.distributed.run --standalone --nproc_per_node 2 bench/gpu_train_check.py \
    --config vitl14 --steps 10 --batch 32 --strategies ddp,fsdp "$@"
else
  echo "gpu_train_check: 2-GPU DDP run skipped, only one GPU"
fi
