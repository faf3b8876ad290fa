#!/usr/bin/env bash
# The benchmark grid we run on one GPU, most important cases first, each with torchvision beside
# it on the same card: densenet121 and DenseNet-BC-100 at batch 64, standard and memory-efficient,
# float32 (TF32 convolutions, both frameworks' default) and bfloat16, then the unrolled blocks.
#
#   bash benchmarks/gpu.sh OUTDIR [more throughput.py flags]
#
# Writes OUTDIR/gpu.json after every case and OUTDIR/gpu.md at the end. Needs a CUDA jax
# (jax[cuda12] or jax[cuda13]) and, for the comparison, a CUDA torch with torchvision.
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUTDIR [flags]}
shift
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv \
  | tee "$out/gpu.txt" || true
cases=densenet121:64:float32:std-scan1,densenet_bc100_k12:64:float32:std-scan1
cases+=,densenet121:64:float32:eff-scan1,densenet_bc100_k12:64:float32:eff-scan1
cases+=,densenet121:64:bfloat16:std-scan1,densenet_bc100_k12:64:bfloat16:std-scan1
cases+=,densenet121:64:float32:std,densenet_bc100_k12:64:float32:std
"${PYTHON:-python3}" "$root/benchmarks/throughput.py" --cases="$cases" --steps=20 \
  --case_timeout=150 --json="$out/gpu.json" --markdown="$out/gpu.md" "$@"
