#!/usr/bin/env bash
# The GPU checks, as one script for a machine with a CUDA GPU (about 5 minutes on one H200):
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# (1) fp16 / bf16 vs fp32: images/s, peak memory, predicted pixels as fp32;
# (2) a VOC21-val-sized run (1449 synthetic VOC-sized images) end to end with the DataLoader
#     (target: under 30 s of evaluation on one H200);
# (3) the evaluation-path benchmark at fp16 (windows batched vs a batch-1 loop);
# (4) the encoder cost per window of every backbone preset at fp16 (bench_backbones.py).
# Numbers go to stdout and OUT_DIR/bench_gpu.json; paste them into the README's
# performance section with the GPU's name.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-benchmarks/out}}"
mkdir -p "$OUT"
if ! python -c "import sclip_lab" 2>/dev/null; then
  # an environment that has torch and the dependencies already: add the package itself
  python -m pip install --no-deps -q -e . || export PYTHONPATH="$PWD/src:${PYTHONPATH:-}"
fi
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible'"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled
python benchmarks/bench_gpu.py --device cuda --images 1449 --out "$OUT" 2>&1 | tee "$OUT/bench_gpu.txt"
python benchmarks/bench_eval.py --device cuda --precision fp16 --images 16 2>&1 \
  | tee "$OUT/bench_eval_fp16.txt"
python benchmarks/bench_backbones.py --device cuda --precision fp16 --windows 16 --out "$OUT" 2>&1 \
  | tee "$OUT/bench_backbones.txt"
