#!/bin/bash
# The measurements of docs/quality.md: every recipe (and q3/q2 with an imatrix) on the tiny preset and
# on the demo model, each compared with its source on the packaged evaluation text.
# Usage: benchmarks/quality.sh WORKDIR   (writes WORKDIR/out/<model>-<recipe>.json)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:?usage: benchmarks/quality.sh WORKDIR}
mkdir -p "$work/out"
cd "$work"
dsv4 synth tiny tiny --seed 0 --force >/dev/null
python -c "from pathlib import Path; import shutil; from dsv4cli.demo.model import demo_model_dir; \
shutil.rmtree('demo', ignore_errors=True); shutil.copytree(demo_model_dir(Path('cache')), 'demo')"
cal="$repo/docs/design.md"
for m in tiny demo; do
  for r in q4 q4-dense4 q3 q3-dense4 q2; do
    dsv4 quantize $m out/$m-$r --recipe $r --force --eval --json > out/$m-$r.json
  done
  for r in q3 q2; do
    dsv4 quantize $m out/$m-$r-im --recipe $r --force --calibration-text "$cal" --boost-layers 0 --eval --json \
      > out/$m-$r-im.json
    dsv4 quantize $m out/$m-$r-imb --recipe $r --force --imatrix out/$m-$r-im/imatrix.safetensors \
      --boost-layers 0.25 --eval --json > out/$m-$r-imb.json
  done
done
