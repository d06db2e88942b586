#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py) under a hard 8-minute limit; results in $OUT (default gpu-results).
# Run it from the repository root on a machine with an NVIDIA GPU and torch with CUDA installed.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu-results}"
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
nvidia-smi > /dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT.nvidia-smi.txt" || echo "nvidia-smi not found"
mkdir -p "$OUT"
[ -f "$OUT.nvidia-smi.txt" ] && mv "$OUT.nvidia-smi.txt" "$OUT/nvidia-smi.txt"
export FERSTREAM_SHARED="${FERSTREAM_SHARED:-../shared}"
exec timeout 480 "$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@"
