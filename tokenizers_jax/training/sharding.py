"""The device mesh and the logical-axis rules that place parameters and batches on it.

Mesh axes are `data` (pure data parallelism: parameters replicated) and `fsdp` (data
parallelism with parameters, EMA and optimizer state sharded). A batch is split over both.
Parameters carry logical axis names (`tokenizers_jax.layers.EMBED`, ...); `config.mesh.rules`
maps each name to a mesh axis or None (replicated).

Axis types: the mesh uses `AxisType.Auto` on purpose. Shardings are then decided by the
compiler from the explicit in/out shardings of the jitted step and the parameter layouts, and
model code stays free of sharding-in-types annotations (with `Explicit` axes, ops such as the
micro-batch reshape would need per-op sharding decisions).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = MESH_AXES  # the batch dimension is split over every mesh axis


def mesh_shape(axis_sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolves one -1 entry to "the remaining devices" and checks the product.

    Args:
      axis_sizes: size per mesh axis name (MESH_AXES), at most one -1.
    Returns:
      sizes in MESH_AXES order.
    """
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the mesh axes are {MESH_AXES}")
    sizes = [int(axis_sizes.get(name, 1)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} does not fit {num_devices} devices"
        )
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
            f"{num_devices} are present; set one axis to -1 to use the rest"
        )
    return tuple(sizes)


def make_mesh(mesh_config: ml_collections.ConfigDict, devices: Sequence[Any] | None = None) -> Mesh:
    """A mesh with axes MESH_AXES (Auto axis types) over all devices (or `devices`)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape({name: mesh_config[name] for name in MESH_AXES}, len(devices))
    return jax.make_mesh(
        shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def logical_rules(mesh_config: ml_collections.ConfigDict) -> tuple[tuple[str, Any], ...]:
    """`config.mesh.rules` as flax logical-axis rules: ((logical name, mesh axis | None), ...)."""
    return tuple((name, None if axis in (None, "") else axis) for name, axis in mesh_config.rules)


def _fit_to_shape(spec: P, shape: Sequence[int], mesh: Mesh, where: str) -> P:
    """Replicates any dimension whose size is not divisible by its mesh axes (logged)."""
    fitted = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = tuple(axes) if isinstance(axes, (tuple, list)) else (axes,) if axes else ()
        if not all(isinstance(name, str) for name in names):
            logging.log_first_n(logging.WARNING, "replicating %s dim %d: logical axis %r is not "
                                "a name with a rule in config.mesh.rules", 1, where, dim, axes)
            axes, names = None, ()
        size = math.prod(mesh.shape[name] for name in names)
        if names and dim % size:
            logging.info("replicating %s dim %d (not divisible by %s=%d)", where, dim, names, size)
            axes = None
        fitted.append(axes)
    return P(*fitted)


def param_shardings(boxed_params: Any, mesh: Mesh, rules: Sequence[tuple[str, Any]]) -> Any:
    """NamedShardings for a tree of (abstract) boxed params, following the logical names.

    Args:
      boxed_params: params with `nn.LogicallyPartitioned` leaves (e.g. `jax.eval_shape` of
        `model.init`); plain leaves are replicated.
    Returns:
      the unboxed tree structure with a NamedSharding per leaf.
    """
    specs = nn.get_partition_spec(boxed_params)
    mesh_specs = nn.logical_to_mesh(specs, rules)
    shapes = nn.unbox(boxed_params)
    paths_and_shapes = jax.tree_util.tree_flatten_with_path(shapes)[0]
    spec_leaves = jax.tree.leaves(mesh_specs, is_leaf=lambda x: isinstance(x, P))
    shardings = [
        NamedSharding(mesh, _fit_to_shape(spec, leaf.shape, mesh, jax.tree_util.keystr(path)))
        for (path, leaf), spec in zip(paths_and_shapes, spec_leaves)
    ]
    return jax.tree.unflatten(jax.tree.structure(shapes), shardings)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over all mesh axes."""
    return NamedSharding(mesh, P(BATCH_AXES))


def num_batch_shards(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[name] for name in BATCH_AXES]))


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """This process's rows of the global batch -> global jax.Arrays sharded over the batch axes.

    Args:
      local_batch: numpy arrays [B / process_count, ...] (this process's contiguous rows).
    """
    sharding = batch_sharding(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Host values that are the same on every process -> jax.Arrays replicated on the mesh."""
    sharding = replicated(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), tree
    )
