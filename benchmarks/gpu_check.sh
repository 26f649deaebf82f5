#!/bin/bash
# The prepared GPU check on the device machine (docs/gpu-check.md):
#   bash benchmarks/gpu_check.sh [--only STEP,...] [--budget-s N] [--dry-run]
# Runs benchmarks/gpu_check.py with the device's python3, the wheels of `make gpu-wheels` (carry build/gpu-wheels)
# and its output folder $OUT (build/gpu-check outside the device tool): summary.json, report.md, gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" benchmarks/gpu_check.py --out "${OUT:-build/gpu-check}" --wheels build/gpu-wheels "$@"
