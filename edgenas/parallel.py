"""Data parallelism over a `jax.sharding.Mesh` of all devices: batch sharded, state replicated.

Every process feeds only its own rows of each global batch (`process_rows`); `global_batch` assembles them into
one array sharded over the mesh's "batch" axis, so the same code runs on one CPU, on 4 forced host devices, on a
GPU, and across hosts after `jax.distributed.initialize()`.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXIS = "batch"


class ParallelError(ValueError):
  pass


def initialize_multihost(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> None:
  """Joins a multi-process run through JAX's distributed runtime. Left as None, the three settings are detected
  by JAX on the clusters it knows (Slurm, Open MPI, Kubernetes, Cloud TPU pods); the coordinator address may also
  come from the environment variable JAX_COORDINATOR_ADDRESS. Processes started by hand must pass all three."""
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)


def make_mesh() -> Mesh:
  """All devices on one "batch" axis. Auto axis type: XLA's sharding propagation places every intermediate, so
  model code (reshapes, scans over chunks) needs no sharding annotations; jax.make_mesh's default (Explicit)
  would demand them."""
  return jax.make_mesh((jax.device_count(),), (BATCH_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXIS))


def check_batch_size(global_batch: int) -> None:
  n = jax.device_count()
  if global_batch % n:
    raise ParallelError(f"batch_size {global_batch} is not divisible by the {n} devices of the mesh; choose a "
                        f"multiple of {n}")


def process_shard() -> tuple[int, int]:
  """(shard index, number of shards) of this process's rows in every global batch."""
  return jax.process_index(), jax.process_count()


def replicate(tree, mesh: Mesh):
  """Places a host-identical pytree on every device of the mesh."""
  sharding = replicated(mesh)
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree)


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Assembles this process's rows into global arrays sharded along the batch axis."""
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
