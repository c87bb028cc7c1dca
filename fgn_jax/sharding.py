"""The device mesh, the sharding rules of the simulation, and multi-host start-up.

Implements DESIGN.md section 3 ("the client axis is sharded over a device
mesh") and style guideline 7: one :class:`jax.sharding.Mesh` whose axis
:data:`CLIENT_AXIS` splits every per-client leaf (``[C, ...]`` ->
``P("clients")``) while the server state is replicated (``P()``). A sweep may
add a second axis, :data:`SWEEP_AXIS`, that splits its leading
configuration axis. Programs are compiled with ``jax.jit(in_shardings=...,
out_shardings=...)`` (:mod:`fgn_jax.simulate` assembles the rules per state
field); XLA's SPMD partitioner inserts the collectives, e.g. the all-reduce of
the server's weighted sum over clients.

Multi-host (:func:`initialize_distributed`): every process runs the same
program on a global mesh over all processes' devices. What is host-local:

* client-axis arrays (client ids, tasks, data ranges, masks, and the client
  state built from them) are placed with :func:`put`, so each process only
  transfers the shards of its own devices;
* the example arrays too: :func:`fgn_jax.simulate.make_env` lays them out in
  per-device blocks (block ``d``: the examples of device ``d``'s clients, all
  blocks padded to one length, ``P("clients")``), each process building and
  transferring only its own devices' blocks, and the client update and
  evaluation run under ``jax.shard_map``, so a device only ever reads its own
  block. Every process still generates or loads the whole dataset on the host
  (deterministically from ``--data_seed``) to cut its blocks from it.

Results do not depend on the mesh: client randomness is
``fold_in(fold_in(key, round), client_id)``, and padding clients
(:func:`padded_num_clients`) are masked out of every mean. Only the order of
floating-point sums over clients changes (all-reduce), i.e. ~1e-7 relative.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from fgn_jax.types import PyTree

CLIENT_AXIS = "clients"
SWEEP_AXIS = "sweep"


def make_mesh(num_devices: int = 0, sweep_devices: int = 1) -> Mesh:
    """A mesh over the first ``num_devices`` devices (0: all, over all processes).

    Args:
      num_devices: devices to use; 0 means every device of every process.
      sweep_devices: devices along a leading :data:`SWEEP_AXIS` (sweeps only);
        1 gives a one-axis mesh ``("clients",)``, more gives
        ``("sweep", "clients")`` of shape ``(sweep_devices, n // sweep_devices)``.

    Returns:
      The mesh, with ``AxisType.Auto`` axes: jax.make_mesh defaults to
      explicit axes, under which every matmul that contracts the sharded
      client axis (the server's weighted sum) would need an ``out_sharding``.
    """
    devices = jax.devices()
    n = num_devices or len(devices)
    if not 1 <= n <= len(devices):
        raise ValueError(f"num_devices={num_devices}: {len(devices)} devices are available")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"num_devices={num_devices}: a multi-process run must use all {len(devices)} devices")
    if sweep_devices < 1 or n % sweep_devices:
        raise ValueError(f"sweep_devices={sweep_devices} must divide the {n} devices")
    if sweep_devices == 1:
        shape, names = (n,), (CLIENT_AXIS,)
    else:
        shape, names = (sweep_devices, n // sweep_devices), (SWEEP_AXIS, CLIENT_AXIS)
    auto = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices[:n])


def axis_size(mesh: Mesh | None, axis: str) -> int:
    """Devices along ``axis`` (1 without a mesh or without that axis)."""
    return 1 if mesh is None or axis not in mesh.axis_names else mesh.shape[axis]


def padded_num_clients(num_clients: int, mesh: Mesh | None) -> int:
    """Client slots: ``num_clients`` rounded up to a multiple of the client-axis devices."""
    d = axis_size(mesh, CLIENT_AXIS)
    return math.ceil(num_clients / d) * d


def _lead(mesh: Mesh, batch_dims: int) -> tuple:
    # A sweep's leading axis goes over SWEEP_AXIS when the mesh has one.
    if batch_dims == 0:
        return ()
    return (SWEEP_AXIS if SWEEP_AXIS in mesh.axis_names else None,) + (None,) * (batch_dims - 1)


def clients(mesh: Mesh, batch_dims: int = 0) -> NamedSharding:
    """Sharding of per-client leaves ``[*batch, C, ...]``: C split over the client axis."""
    return NamedSharding(mesh, P(*_lead(mesh, batch_dims), CLIENT_AXIS))


def replicated(mesh: Mesh, batch_dims: int = 0) -> NamedSharding:
    """Sharding of server leaves ``[*batch, ...]``: replicated over the client axis."""
    return NamedSharding(mesh, P(*_lead(mesh, batch_dims)))


def put(tree: PyTree, shardings: PyTree) -> PyTree:
    """Places host (numpy) leaves as global arrays, each process only its own shards.

    Args:
      tree: numpy leaves, identical on every process.
      shardings: a sharding per leaf, or a prefix tree of ``tree`` (one
        sharding for a whole subtree).

    Returns:
      ``tree`` with ``jax.Array`` leaves. ``jax.make_array_from_callback``
      asks only for the slices of this process's devices, so in a
      multi-process run nothing of the other processes' shards is transferred.
    """

    def place(sharding, subtree):
        def one(x):
            x = np.asarray(x)
            return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

        return jax.tree.map(one, subtree)

    return jax.tree.map(place, shardings, tree)


def bytes_per_device(tree: PyTree) -> dict[jax.Device, int]:
    """Bytes of ``tree``'s shards on each of this process's devices (a replicated leaf counts on every one)."""
    out: dict[jax.Device, int] = {}
    for leaf in jax.tree.leaves(tree):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
) -> None:
    """Joins a multi-process JAX run (call before anything else touches JAX's devices).

    With no arguments JAX auto-detects the cluster (SLURM, Open MPI, TPU pod
    slices, ...); otherwise the first three name the coordinator ``host:port``
    (process 0's), the process count and this process's index. See
    docs/scaling.md for launch commands.

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: number of processes.
      process_id: this process's index in ``[0, num_processes)``.
      local_device_ids: the local GPUs this process drives. Under SLURM, JAX
        otherwise gives each process only the GPU numbered by its
        ``SLURM_LOCALID`` (one process per GPU); one process per host needs
        all of them, e.g. ``[0, 1, 2, 3, 4, 5, 6, 7]``.
    """
    # CPU collectives across processes need gloo; the setting only affects the
    # CPU backend, so it is harmless on GPU and TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids or None,
    )
