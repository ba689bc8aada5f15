"""The device mesh and the sharding table: batch rows over "data"; params replicated or FSDP over "data".

At 30-300M parameters, params + Muon/Adam state fit on one device, so the default replicates them and shards only
the batch (no all-gathers inside Newton-Schulz). `mesh.fsdp=True` shards every state leaf along its largest
dimension divisible by the data-axis size (ZeRO-3 style, as Levanter's FSDP over all devices); GSPMD inserts the
gathers.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

DATA = "data"


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The data-parallel mesh of config.mesh over `devices` (default: this process's JAX devices; a target's
  topology devices for a deviceless compile): mesh.data of them, -1 for all."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices) if mesh_cfg.data == -1 else mesh_cfg.data
  # Auto axes: classic GSPMD propagation (jax >= 0.10 defaults make_mesh to Explicit axes).
  return Mesh(np.asarray(devices[:n]), (DATA,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows of a [B, ...] batch split over the data axis."""
  return NamedSharding(mesh, P(DATA))


def leaf_spec(shape: tuple[int, ...], data_size: int, fsdp: bool) -> P:
  """Replicated, or (fsdp) split along the largest dimension that the data axis divides."""
  if not fsdp or data_size == 1:
    return P()
  dims = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in dims:
    if shape[i] % data_size == 0 and shape[i] >= data_size:
      return P(*([None] * i + [DATA]))
  return P()


def state_shardings(state_shapes, mesh: Mesh, fsdp: bool):
  """A NamedSharding for every leaf of a (shape-only) train state."""
  size = mesh.shape[DATA]
  return jax.tree.map(lambda x: NamedSharding(mesh, leaf_spec(x.shape, size, fsdp)), state_shapes)


def abstract(shapes, shardings):
  """ShapeDtypeStructs carrying their shardings: what a step is compiled for, and what a restore lands on."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def to_global(local_rows: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """This process's rows of the global batch -> one global jax.Array (multi-host safe)."""
  return jax.make_array_from_process_local_data(sharding, local_rows)


def describe(mesh: Mesh, fsdp: bool) -> dict:
  return {"axes": dict(mesh.shape), "fsdp": fsdp, "num_devices": mesh.size,
          "device_kind": mesh.devices.flat[0].device_kind, "process_count": jax.process_count()}
