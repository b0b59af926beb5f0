#!/usr/bin/env bash
# GPU benchmark of the pruning step (LLaMA-2-7B shape) and continued pretraining (Sheared-LLaMA-2.7B shape): bf16,
# sequences of 4096, FSDP2 on one GPU, eager and compiled, for each attention kernel; tokens/s, MFU and peak memory.
# At most 9.5 minutes on one H200 (rows not started after 8.5 are skipped); results in bench/results/gpu.json after
# every row. Extra arguments go to bench/gpu.py (e.g. --steps 3 --seq 2048).
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  PY=.venv/bin/python
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 570 $PY -m torch.distributed.run --standalone --nproc_per_node=1 bench/gpu.py "$@"
