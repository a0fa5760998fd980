#!/usr/bin/env bash
# The device benchmark suite (issue 13): JSON lines, one per measurement, on
# whatever devices JAX finds (GPU, TPU or CPU).
#
#   bash benchmarks/device_suite.sh            # the full settings (meant for one GPU)
#   bash benchmarks/device_suite.sh --quick    # small settings: a CPU smoke run
#
# Full: whole-ROI RetinaNet inference on a 7215x5412 image (read, decode,
# infer, merge; plus compute alone); the training step of the full RetinaNet
# (batch 30 of 512 px) and of the full 70-layer P4 ResNet (batch 128), in
# float32 and bfloat16, with XLA's FLOP count (and utilisation when PEAK_TFLOPS
# is set, e.g. PEAK_TFLOPS=989 on an H100/H200 in bf16); the host input
# pipeline's patches/s with all host cores. Not yet in it (not built yet):
# bf16 inference, augmentation on the device, region-based inference.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PEAK=${PEAK_TFLOPS:-0}
if [[ "${1:-}" == "--quick" ]]; then
  $PY benchmarks/train_step.py --method retina --config quick,tiny --batch 2 --size 128 --steps 2
  $PY benchmarks/train_step.py --method p4 --config tiny --batch 8 --steps 2
  $PY benchmarks/p4_exact_rotation.py --config tiny --tile_size 128 --tile_batch 2 --repeats 2
  exit 0
fi
$PY benchmarks/inference.py
for dtype in float32 bfloat16; do
  $PY benchmarks/train_step.py --method retina --batch 30 --size 512 --steps 5 --dtype "$dtype" \
      --peak_tflops "$PEAK"
  $PY benchmarks/train_step.py --method p4 --batch 128 --steps 5 --dtype "$dtype" --peak_tflops "$PEAK"
done
$PY benchmarks/input_pipeline.py --images 4 --workers "$(nproc)"
