#!/usr/bin/env bash
# The device benchmark suite (issue 13): JSON lines, one per measurement, on
# whatever devices JAX finds (GPU, TPU or CPU). Each line comes from one of
# the scripts beside this one; their docstrings define the fields.
#
#   bash benchmarks/device_suite.sh            # full settings (meant for one GPU, < 5 min)
#   bash benchmarks/device_suite.sh --quick    # small settings: a CPU smoke run (8 min on 2 busy cores)
#
# Full settings:
#  1. whole-ROI RetinaNet inference on one 7215x5412 image (read, decode,
#     infer, merge end to end, and compute alone), in regions (infer.plan) and
#     512 px tiles, float32 and bfloat16 (benchmarks/inference.py);
#  2. training steps/s and images/s of the full RetinaNet (batch 30 of 512 px)
#     and the full 70-layer P4 ResNet (batch 128), float32 and bfloat16, with
#     XLA's FLOP count and, when PEAK_TFLOPS is set (e.g. PEAK_TFLOPS=989 for
#     an H100/H200 in bf16), the fraction of that peak (benchmarks/train_step.py);
#  3. the host input pipeline's patches/s (and per CPU-second) with every host
#     core as workers, augmentation on the host and on the device, plus the
#     device augmentation itself (benchmarks/input_pipeline.py).
# The full-size image is generated into data/bench_midog21 on first use
# (about 25 s); run once beforehand to keep it out of the timing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK_TFLOPS:-0}
DATA=${DATA:-data/bench_midog21}
if [[ "${1:-}" == "--quick" ]]; then
  for mode in regions tiles; do
    $PY benchmarks/inference.py --data "$DATA" --quick --mode "$mode" --no-breakdown
  done
  $PY benchmarks/inference.py --data "$DATA" --quick --mode regions --dtype bfloat16 --no-breakdown
  for dtype in float32 bfloat16; do
    $PY benchmarks/train_step.py --method retina --config quick,tiny --batch 2 --size 128 \
        --steps 2 --dtype "$dtype"
  done
  $PY benchmarks/train_step.py --method p4 --config tiny --batch 8 --steps 2
  $PY benchmarks/input_pipeline.py --data "$DATA" --images 1 --workers 0 --batches 2 \
      --sizes 128 --augment_on both --device_batch 8 --device_repeats 1
  exit 0
fi
for dtype in float32 bfloat16; do
  for mode in regions tiles; do
    $PY benchmarks/inference.py --data "$DATA" --mode "$mode" --dtype "$dtype"
  done
done
for dtype in float32 bfloat16; do
  $PY benchmarks/train_step.py --method retina --batch 30 --size 512 --steps 5 --dtype "$dtype" \
      --peak_tflops "$PEAK"
  $PY benchmarks/train_step.py --method p4 --batch 128 --steps 5 --dtype "$dtype" --peak_tflops "$PEAK"
done
$PY benchmarks/input_pipeline.py --data "$DATA" --images 4 --workers "$(nproc)" --sizes 512 \
    --augment_on both --device_batch 128
