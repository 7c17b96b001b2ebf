#!/usr/bin/env bash
# The GPU checks, as one script for a lent GPU (the device tool: `bash scripts/gpu_check.sh`, about 6 minutes on an
# H100 / H200; everything it prints and writes goes to $OUT):
#   1. the GPU, its memory, torch's version, whether torch.nn.attention.varlen exists;
#   2. the tests that need CUDA (the packed layout's fused variable-length attention against the padded layout);
#   3. scripts/bench_real.py: the SupCon branch's workload on the ESM-2 650M architecture (8 anchors x (1 + 3 + 9)
#      proteins; full, last_k 2, LoRA, adapters, full + activation checkpointing; bf16; packed against padded):
#      seconds per step, tokens/s, MFU, peak GPU memory, the share of the step outside the backbone; then
#      predict.py on 10,000 proteins of the real length distribution, packed against padded: proteins/s.
set -euo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,memory.total --format=csv; python -c "import importlib.util, torch; print('torch', torch.__version__, 'varlen_attn:', importlib.util.find_spec('torch.nn.attention.varlen') is not None)"; } | tee "$OUT/gpu.txt"
python -m pytest -q -p no:cacheprovider tests/test_packing.py 2>&1 | tail -5 | tee "$OUT/tests.txt"
python scripts/bench_real.py --device cuda --dir "${BENCH_DIR:-bench_weights}" --json "$OUT/bench_real_cuda.json" \
    --modes full last_k lora adapter full_checkpointing --precisions bf16 --layouts packed padded --predict 10000 \
    2>&1 | tee "$OUT/bench_real.txt"
