#!/usr/bin/env bash
# N processes on this machine, as a multi-host run would be (CPU: gloo collectives).
# Usage: launch/local_multiprocess.sh N WORKDIR [--config... overrides]
#   launch/local_multiprocess.sh 2 runs/mp --config=configs/retina.py:quick
set -euo pipefail
n=$1; workdir=$2; shift 2
port=${MIDOG_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < n; i++)); do
  MIDOG_COORDINATOR=127.0.0.1:$port MIDOG_NUM_PROCESSES=$n MIDOG_PROCESS_ID=$i \
    JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo \
    python -m midog_jax.main --workdir="$workdir" "$@" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
exit $status
