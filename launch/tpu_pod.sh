#!/usr/bin/env bash
# Run on every host of a TPU pod slice (e.g. with `gcloud compute tpus tpu-vm ssh --worker=all`).
# jax.distributed.initialize() finds the pod topology itself (MIDOG_DISTRIBUTED=auto).
# Usage: launch/tpu_pod.sh WORKDIR --config=configs/retina.py [--config.key=value ...]
set -euo pipefail
workdir=$1; shift
MIDOG_DISTRIBUTED=auto python -m midog_jax.main --workdir="$workdir" "$@"
