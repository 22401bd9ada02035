"""Mesh construction from `config.mesh` and multi-host initialisation."""

from __future__ import annotations

import os

from absl import logging
import jax
from jax.experimental import mesh_utils
import numpy as np

import errors
from sharding import rules


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
  """Axis sizes in `rules.MESH_AXES` order; one size may be -1 to absorb the rest."""
  sizes = [int(mesh_config[a]) for a in rules.MESH_AXES]
  if sizes.count(-1) > 1:
    raise errors.ConfigError(f'config.mesh: at most one axis may be -1, got {dict(zip(rules.MESH_AXES, sizes))}')
  if any(s == 0 or s < -1 for s in sizes):
    raise errors.ConfigError(f'config.mesh sizes must be positive or -1, got {dict(zip(rules.MESH_AXES, sizes))}')
  known = int(np.prod([s for s in sizes if s != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise errors.ConfigError(f'config.mesh: {num_devices} devices do not divide by the fixed axes ({known})')
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise errors.ConfigError(f'config.mesh {dict(zip(rules.MESH_AXES, sizes))} needs {int(np.prod(sizes))} '
                     f'devices, but {num_devices} are present')
  return tuple(sizes)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  return jax.sharding.Mesh(grid, rules.MESH_AXES)


def maybe_initialize_distributed() -> None:
  """Starts JAX's multi-controller runtime when the environment describes several processes.

  Covers an explicit coordinator (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID), SLURM (jax detects it) and TPU pods (jax detects the metadata). A single
  process with none of these runs without it.
  """
  if jax.distributed.is_initialized():
    return
  env = os.environ
  if 'JAX_COORDINATOR_ADDRESS' in env:
    jax.distributed.initialize(
        coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
        num_processes=int(env['JAX_NUM_PROCESSES']),
        process_id=int(env['JAX_PROCESS_ID']))
  elif (int(env.get('SLURM_NTASKS', '1')) > 1 or 'TPU_WORKER_HOSTNAMES' in env
        or 'MEGASCALE_COORDINATOR_ADDRESS' in env or _tpu_chips_attached()):
    # On a Cloud TPU VM jax finds the slice's hosts from the metadata server (one host is
    # fine too); orbax's asynchronous multi-host checkpoints need the distributed runtime.
    jax.distributed.initialize()
  else:
    return
  logging.info('distributed: process %d of %d, %d local / %d global devices',
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())


def _tpu_chips_attached() -> bool:
  """True on a TPU VM (TPU chips on the PCI bus), by jax's own check."""
  try:
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except (ImportError, AttributeError, OSError):  # a private helper: if it moves, rely on env
    return False


def check_batch_split(batch_sharding, batch_size: int, process_count: int) -> None:
  """Checks that the batch axes give each process its own batch_size / process_count rows.

  The input pipeline has each process read a distinct share of every global batch, and
  `jax.make_array_from_process_local_data` places it on the process's devices; a mesh whose
  batch is replicated across processes (e.g. a `tensor` axis spanning hosts) would silently
  mix different rows into one "replicated" array, so it is refused here.
  """
  if process_count == 1:
    return
  rows = {}
  for device, index in batch_sharding.devices_indices_map((batch_size, 1)).items():
    rows.setdefault(device.process_index, set()).update(range(*index[0].indices(batch_size)))
  share = batch_size // process_count
  if len(rows) != process_count or any(len(r) != share for r in rows.values()) or (
      len(set().union(*rows.values())) != batch_size):
    raise errors.ConfigError(f'config.mesh {dict(batch_sharding.mesh.shape)}: the batch axes (data, '
                     f'fsdp, expert) must split train.batch_size={batch_size} into '
                     f'{process_count} distinct shares of {share} rows, one per process; keep '
                     f'`tensor` within a host')
