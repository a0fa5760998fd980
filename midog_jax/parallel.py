"""Device mesh and sharding helpers: ``jax.jit`` + ``NamedSharding`` only.

One 1-D mesh over all devices of all processes, axis ``"data"``: batches are
sharded on it, parameters and optimizer state are replicated. Multi-host
runs call ``initialize_distributed`` first (``launch/`` scripts set the
coordinator through the usual ``JAX_COORDINATOR_ADDRESS`` etc.).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA = "data"


# XLA options for the heavy programs (the train step, the tile functions) on
# CPU. XLA:CPU hands convolutions to YNNPACK by default; on a 2-core AVX-512
# Xeon the ResNet-50 RetinaNet took 188 s per 7215x5412 image that way (51% of
# a float32 matmul's FLOP/s) and 138 s with XLA's own (Eigen) convolutions
# (75-83%; compute alone, tile batches ran 1.4-1.6x faster;
# benchmarks/inference.py); the training step is faster with them too
# (benchmarks/train_step.py, whose --xla_defaults times the other).
# Set to {} to keep XLA's defaults. Ignored on other platforms.
CPU_COMPILER_OPTIONS: dict[str, str] = {"xla_cpu_experimental_ynn_fusion_type": ""}


def compiler_options() -> dict[str, str] | None:
  """``jax.jit(..., compiler_options=)`` for this platform: :data:`CPU_COMPILER_OPTIONS`
  on CPU, None (XLA's defaults) elsewhere."""
  if jax.default_backend() != "cpu" or not CPU_COMPILER_OPTIONS:
    return None
  return dict(CPU_COMPILER_OPTIONS)


def initialize_distributed() -> None:
  """Starts JAX's multi-host runtime when the environment asks for it.

  Reads ``MIDOG_COORDINATOR`` (host:port), ``MIDOG_NUM_PROCESSES`` and
  ``MIDOG_PROCESS_ID``; on TPU pods and SLURM, ``jax.distributed.initialize()``
  with no arguments finds them itself (``MIDOG_DISTRIBUTED=auto``).
  """
  if os.environ.get("MIDOG_DISTRIBUTED") == "auto":
    jax.distributed.initialize()
  elif os.environ.get("MIDOG_COORDINATOR"):
    jax.distributed.initialize(
        coordinator_address=os.environ["MIDOG_COORDINATOR"],
        num_processes=int(os.environ["MIDOG_NUM_PROCESSES"]),
        process_id=int(os.environ["MIDOG_PROCESS_ID"]))


def make_mesh() -> jax.sharding.Mesh:
  """A 1-D ``data`` mesh over every device (Auto axis: jit propagates shardings)."""
  return jax.make_mesh((jax.device_count(),), (DATA,),
                       axis_types=(jax.sharding.AxisType.Auto,))


def local_mesh() -> jax.sharding.Mesh:
  """A ``data`` mesh over this process's devices only.

  Whole-image inference runs per process (each host can score its own
  images); a global mesh would make every process take part in every call.
  """
  devices = np.asarray(jax.local_devices())
  return jax.sharding.Mesh(devices, (DATA,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def to_host(tree: Any) -> Any:
  """numpy copy of a tree of replicated (possibly multi-host) arrays."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0))
                      if isinstance(x, jax.Array) else x, tree)


def data_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over ``data``."""
  return NamedSharding(mesh, P(DATA))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def replicate(tree: Any, mesh) -> Any:
  """Places every leaf of ``tree`` on all devices of the mesh."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local: dict[str, np.ndarray], mesh) -> dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays.

  Each process passes its own ``batch_size / process_count`` examples; the
  result is one array of the global batch, sharded over ``data``.
  """
  sharding = data_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local.items()}


def any_process(flag: bool) -> bool:
  """True on every process when ``flag`` is True on any (a stop at one step)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
