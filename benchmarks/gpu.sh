#!/usr/bin/env bash
# What runs on a lent GPU machine (the device tool): kernel parity compiled on CUDA, the kernel
# benchmarks and the trainer's samples/s + MFU at the paper grid. That machine has torch, triton and
# transformers but not DeepSpeed or MONAI: their wheels travel in .whl/ (see benchmarks/RESULTS.md).
# Ray's wheel is larger than what travels, so the trainer benchmark runs the product's train step in one
# process (benchmarks.train_step), not under Ray Train.
# The timeouts sum to 540 s (9 min), inside one 10-minute device call and a 15-minute budget.
set -uo pipefail
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
timeout 120 python3 -m pytest -p no:cacheprovider --noconftest -q -o addopts="" tests/trainer/test_kernels.py 2>&1 | tee "$OUT/kernel_tests.log"
# no host sync inside an accumulation window (torch.cuda.set_sync_debug_mode("error"), issue #31 item 1)
timeout 90 python3 -m pytest -p no:cacheprovider --noconftest -q -o addopts="" tests/trainer/test_step.py \
  -k "cuda_sync" 2>&1 | tee "$OUT/sync_test.log"
timeout 90 python3 -m benchmarks.kernels 2>&1 | tee "$OUT/kernels.log"
timeout 240 python3 -m benchmarks.train_step --config configs/t3d.yaml --runs ${RUNS:-0 2 3 2+triton 2+nobench} 2>&1 \
  | grep -v "FutureWarning\|return func" | tee "$OUT/train_step.log"
