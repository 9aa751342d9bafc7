"""Logical axis names and the one table that maps them to mesh axes.

Every parameter carries a tuple of logical axis names (metadata ``logical_axes`` on its ``nnx.Variable``) and key
activations are constrained with :func:`shard`. A rules table maps each logical name to zero or more mesh axes;
mesh axes absent from the current mesh are dropped, so the same rules serve a 1-device run, a ``data`` x
``expert`` mesh and larger meshes alike.

Weight axes: ``embed`` (d), ``vocab``, ``heads`` (n_h), ``q_lora`` (d'_c), ``kv_lora`` (d_c + d_h^R for the
joint down-projection, d_c elsewhere), ``qk_head``, ``kv_head``, ``v_head``, ``mlp`` (dense FFN width),
``moe_mlp`` (expert FFN width), ``experts`` (N_r), ``mtp_concat`` (2d), ``layers`` (stacked-layer axis).
Activation axes have their own names (``batch``, ``seq``, ``act_embed``, ``act_vocab``) so that weights can be
sharded along ``embed`` (FSDP) while activations are sharded along ``batch``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Tokens ride on both mesh axes (the expert axis is also a data axis for everything but the experts); expert
# weights are split over `expert`; the remaining weights are replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "expert")),
    ("experts", "expert"),
)
# FSDP (ZeRO-3 style): additionally split every weight along its model-width axis over `data`; XLA gathers
# each weight just before use. Optimizer moments follow the weights' sharding.
FSDP_RULES: Rules = (*DEFAULT_RULES, ("embed", "data"))


def logical_to_spec(
    names: Sequence[str | None], rules: Rules = DEFAULT_RULES, mesh: Mesh | None = None
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; raises if one mesh axis would shard two dimensions."""
    table = dict(rules)
    mesh_axes = set(mesh.axis_names) if mesh is not None else None
    used: dict[str, str] = {}
    spec = []
    for name in names:
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh_axes is not None:
            axes = tuple(a for a in axes if a in mesh_axes)
        for a in axes:
            if a in used:
                raise ValueError(f"mesh axis {a!r} maps both {used[a]!r} and {name!r} in {tuple(names)}")
            used[a] = name
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def make_mesh(data: int = 1, expert: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``data`` x ``expert`` mesh over ``data * expert`` devices (the first ones by default)."""
    devices = list(devices if devices is not None else jax.devices())[: data * expert]
    if len(devices) != data * expert:
        raise ValueError(f"a {data}x{expert} mesh needs {data * expert} devices, {len(devices)} available")
    return Mesh(np.array(devices).reshape(data, expert), ("data", "expert"), axis_types=(AxisType.Auto,) * 2)


def shard(x: jax.Array, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Constrain an activation's sharding under the active mesh (``jax.set_mesh``); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh))


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The NamedSharding of one variable from its ``logical_axes`` metadata."""
    names = var.get_metadata().get("logical_axes")
    if names is None or len(names) != var.get_value().ndim:
        raise ValueError(f"variable of shape {var.get_value().shape} has logical axes {names!r}")
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedSharding for every variable of ``state`` (same tree), for ``jit`` in/out shardings."""
    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh, rules)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )
