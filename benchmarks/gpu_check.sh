#!/usr/bin/env bash
# One prepared GPU session (device tool): the pre-training stage on CUDA, then
# the throughput benchmark for ViT-B/16 and ViT-L/16, plain path vs fast path.
# Results land in $OUT (or reports/benchmarks when run by hand).
set -uo pipefail
OUT=${OUT:-reports/benchmarks}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:src
else
  export PYTHONPATH=src
fi
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__)"

if [ "${SKIP_STAGE:-0}" = 0 ]; then
# 1. the stage itself on the GPU (bf16, torch.compile, fused AdamW by default)
python3 -m mae_ops.cli prepare && \
python3 -m mae_ops.cli pretrain --set pretrain.epochs=8 --set pretrain.save_every=4 2>&1 | grep -v "it/s"
cp reports/pretrain/metrics.json "$OUT/gpu_pretrain_metrics.json"
cp reports/pretrain/reconstruction.png "$OUT/gpu_reconstruction.png"
fi

# 2. throughput, batch 256, 224 px: plain (fp16 autocast, eager, unfused AdamW) vs fast
for preset in mae_vit_base_patch16 mae_vit_large_patch16; do
  python3 benchmarks/pretrain_throughput.py --preset "$preset" --batch-size 256 --device cuda \
      --amp fp16 --compile off --fused off --steps 20 --peak-tflops 790 --out "$OUT/${preset}-plain.json" | tail -25
  python3 benchmarks/pretrain_throughput.py --preset "$preset" --batch-size 256 --device cuda \
      --steps 30 --peak-tflops 790 --out "$OUT/${preset}-fast.json" | tail -25
done
