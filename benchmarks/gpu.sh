#!/usr/bin/env bash
# The GPU benchmark as one short script for a lent device machine (it has torch, no network):
#   bash benchmarks/gpu.sh            # results appended to benchmarks/RESULTS.md, or under $OUT when set
# Peers (sparsify, SAELens) are timed only where they are installed; otherwise their rows say so.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${OUT:+$OUT/RESULTS-gpu.md}
results=${results:-benchmarks/RESULTS.md}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. python -m sae_pipeline.bench --device cuda --compile --rounds 7 --steps 10 --results "$results"
