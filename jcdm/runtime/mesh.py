"""Device mesh and partition specs (system code: no math here).

The mesh has two named axes. `data` spans hosts (pure data parallelism over the slower DCN /
inter-node network); `fsdp` stays inside a host's fast interconnect and shards parameters,
optimizer state and EMA when the `fsdp` strategy is chosen. The batch is sharded over both.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)
STRATEGIES = ("replicated", "fsdp")


class MeshError(ValueError):
    """A mesh, batch or sharding rule that cannot fit the devices; raised before compiling."""


def resolve_axis_sizes(sizes: Sequence[int], num_devices: int) -> tuple[int, ...]:
    """Replace the one -1 ("the rest") by what the device count leaves; check the product."""
    sizes = tuple(int(s) for s in sizes)
    if sum(s == -1 for s in sizes) > 1:
        raise MeshError(f"mesh {dict(zip(AXES, sizes))}: at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh {dict(zip(AXES, sizes))}: sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise MeshError(
                f"mesh {dict(zip(AXES, sizes))} cannot fill {num_devices} devices: {known} does "
                f"not divide {num_devices}. Set make_mesh.fsdp to a divisor of {num_devices}."
            )
        sizes = tuple(num_devices // known if s == -1 else s for s in sizes)
    if math.prod(sizes) != num_devices:
        raise MeshError(
            f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices but "
            f"{num_devices} are present. Use -1 for one axis (e.g. make_mesh.data = -1)."
        )
    return sizes


@gin.configurable(module="jcdm")
def make_mesh(*, data: int = -1, fsdp: int = 1, devices: Sequence | None = None) -> Mesh:
    """Build the ("data", "fsdp") mesh over all devices of all processes.

    Devices are ordered by (process, local id) so that each `fsdp` group lies within one host
    whenever `fsdp` divides the per-host device count, and consecutive `data` rows walk across
    hosts. The batch rows a process owns are then one contiguous block, which is what
    `jax.make_array_from_process_local_data` expects.
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = resolve_axis_sizes((data, fsdp), len(devices))
    local = jax.local_device_count()
    if jax.process_count() > 1 and local % fsdp and fsdp % local:
        raise MeshError(
            f"fsdp={fsdp} neither divides nor is a multiple of the {local} devices per host; "
            "an fsdp group would straddle hosts unevenly."
        )
    if jax.process_count() > 1 or devices[0].platform == "cpu":
        ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
        grid = np.asarray(ordered, dtype=object).reshape(data, fsdp)
    else:
        # On one TPU/GPU host, let JAX pick an order that follows the physical topology.
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices=devices)
    return Mesh(grid, AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(AXES))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def check_batch(global_batch_size: int, mesh: Mesh) -> None:
    """The global batch must split evenly over devices and over processes, and each process's
    devices must hold exactly the rows its input pipeline reads.

    The pipeline gives process p rows [p*L, (p+1)*L) of the global batch (L = G / processes);
    `jax.make_array_from_process_local_data` would silently accept a mesh whose devices put
    other rows on this process, and the run would then train on a reordered batch (images paired
    with other noise draws) that differs from the one-process run.
    """
    n = mesh.size
    if global_batch_size % n:
        raise MeshError(
            f"global batch {global_batch_size} does not divide across {n} devices "
            f"(mesh {dict(mesh.shape)}); use a multiple of {n} (train.global_batch_size)."
        )
    count = jax.process_count()
    if global_batch_size % count:
        raise MeshError(
            f"global batch {global_batch_size} does not divide across {count} processes"
        )
    rows = global_batch_size // count
    index_map = batch_sharding(mesh).devices_indices_map((global_batch_size,))
    for device, (sl,) in index_map.items():
        start, stop = sl.indices(global_batch_size)[:2]
        p = device.process_index
        if not (p * rows <= start and stop <= (p + 1) * rows):
            raise MeshError(
                f"device {device} of process {p} holds batch rows [{start}, {stop}) but that "
                f"process reads rows [{p * rows}, {(p + 1) * rows}); order the mesh's devices "
                "by process (make_mesh does)."
            )


def param_spec(
    path: str, shape: Sequence[int], *, strategy: str, fsdp_size: int, min_size: int = 2**14
) -> P:
    """Partition rule for one parameter (or its optimizer / EMA copy).

    `replicated`: P() everywhere (pure data parallelism). `fsdp`: shard the largest axis that
    `fsdp_size` divides along "fsdp"; arrays smaller than `min_size` elements stay replicated
    (sharding a bias costs more in collectives than it saves). A large array with no divisible
    axis is an error rather than a silent replication, so memory estimates stay honest.
    """
    if strategy not in STRATEGIES:
        raise MeshError(f"sharding strategy {strategy!r}; choose one of {STRATEGIES}")
    if strategy == "replicated" or fsdp_size == 1 or not shape or math.prod(shape) < min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    raise MeshError(
        f"parameter {path} with shape {tuple(shape)} has no axis divisible by fsdp={fsdp_size}. "
        f"Choose make_mesh.fsdp dividing one of {tuple(shape)}, or raise "
        "state_shardings.fsdp_min_size above its size to replicate it."
    )


@gin.configurable(module="jcdm")
def state_shardings(
    abstract_state, mesh: Mesh, *, strategy: str = "replicated", fsdp_min_size: int = 2**14
):
    """NamedShardings for every leaf of a (abstract) training state pytree.

    Parameters, their optimizer moments and their EMA copy follow `param_spec`, so each moment
    is sharded exactly like its parameter and the update needs no resharding. Integer leaves
    (the step, counters, the PRNG key) and scalars are always replicated.
    """
    if strategy not in STRATEGIES:
        raise MeshError(f"sharding strategy {strategy!r}; choose one of {STRATEGIES}")
    fsdp_size = mesh.shape["fsdp"]
    counts = {"sharded": 0, "replicated": 0, "sharded_elements": 0, "elements": 0}

    def rule(path, leaf):
        shape = tuple(getattr(leaf, "shape", ()))
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and not jax.numpy.issubdtype(dtype, jax.numpy.floating):
            spec = P()
        else:
            spec = param_spec(
                jax.tree_util.keystr(path),
                shape,
                strategy=strategy,
                fsdp_size=fsdp_size,
                min_size=fsdp_min_size,
            )
        size = math.prod(shape)
        counts["elements"] += size
        if spec == P():
            counts["replicated"] += 1
        else:
            counts["sharded"] += 1
            counts["sharded_elements"] += size
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(rule, abstract_state)
    log.info(
        "state sharding %s over fsdp=%d: %d arrays sharded (%.1f%% of %d elements), %d replicated",
        strategy,
        fsdp_size,
        counts["sharded"],
        100 * counts["sharded_elements"] / max(counts["elements"], 1),
        counts["elements"],
        counts["replicated"],
    )
    return shardings


def describe(mesh: Mesh) -> str:
    local = [d.id for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return (
        f"process {jax.process_index()}/{jax.process_count()} mesh {dict(mesh.shape)} "
        f"local devices {local} platform {mesh.devices.flat[0].platform}"
    )
