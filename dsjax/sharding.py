"""Logical axis names and the one table that maps them to mesh axes.

Every parameter carries a tuple of logical axis names (metadata ``logical_axes`` on its ``nnx.Variable``) and key
activations are constrained with :func:`shard`. A rules table maps each logical name to zero or more mesh axes;
mesh axes absent from the current mesh are dropped, so the same rules serve a 1-device run, a ``data`` x
``expert`` mesh and larger meshes alike.

Weight axes: ``embed`` (d), ``vocab``, ``heads`` (n_h), ``q_lora`` (d'_c), ``kv_lora`` (d_c + d_h^R for the
joint down-projection, d_c elsewhere), ``qk_head``, ``kv_head``, ``v_head``, ``mlp`` (dense FFN width),
``moe_mlp`` (expert FFN width), ``experts`` (N_r), ``mtp_concat`` (2d), ``layers`` (stacked-layer axis),
``pipeline_layers`` (the stacked-layer axis of the stack that pipeline stages cut: split over ``stage``).
Activation axes have their own names (``batch``, ``seq``, ``act_embed``, ``act_vocab``) so that weights can be
sharded along ``embed`` (FSDP) while activations are sharded along ``batch``.

A mesh axis shards at most one dimension of a tensor: dimensions are resolved left to right and a mesh axis that
an earlier dimension already took is skipped (an expert weight ``[experts, embed, moe_mlp]`` under FSDP is split
over ``expert`` by its experts and over ``data`` alone by its width). Given the tensor's shape, mesh axes that
would not divide a dimension evenly are dropped from it (last ones first), so one table serves every model size.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

if TYPE_CHECKING:  # flax only for the state helpers' types: the FP8 ops import this module on bare GPU images
    from flax import nnx

MeshAxes = str | tuple[str, ...] | None
Rules = tuple[tuple[str, MeshAxes], ...]

# Tokens ride on both mesh axes (the expert axis is also a data axis for everything but the experts); expert
# weights are split over `expert`; the remaining weights are replicated.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "expert")),
    ("experts", "expert"),
    # Pipeline parallelism (dsjax.pipeline): each `stage` rank holds its stages' layers, at rest and in the step.
    ("pipeline_layers", "stage"),
)
# FSDP (ZeRO-3 style): additionally split every weight along its model-width axis over all devices (`data` x
# `expert`; expert weights, whose experts already took `expert`, over `data`); XLA gathers each weight just
# before use. MLA's up-projections `wq_b` / `wkv_b` have no `embed` axis: their low-rank input axis takes the
# place (3.3B parameters of DeepSeek-V3 would otherwise stay replicated). Optimizer moments follow the weights.
FSDP_RULES: Rules = (
    *DEFAULT_RULES,
    ("embed", ("data", "expert")),
    ("q_lora", ("data", "expert")),
    ("kv_lora", ("data", "expert")),
    # dsjax.vision: the SigLIP tower's width and the VL2 projector's input width (4 x the tower's).
    ("vit_embed", ("data", "expert")),
    ("proj_in", ("data", "expert")),
)
# Tensor parallelism over a `model` mesh axis: attention heads, dense/expert FFN width and the vocabulary, with the
# matching activation axes (Megatron-style column/row splits; XLA inserts the reductions).
TP_RULES: Rules = (
    ("heads", "model"),
    ("mlp", "model"),
    ("moe_mlp", "model"),
    ("vocab", "model"),
    ("act_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
)


def combine_rules(*tables: Rules) -> Rules:
    """Concatenate rule tables; a later table's entry for a logical name replaces an earlier one's."""
    merged: dict[str, MeshAxes] = {}
    for table in tables:
        merged.update(dict(table))
    return tuple(merged.items())


def logical_to_spec(
    names: Sequence[str | None],
    rules: Rules = DEFAULT_RULES,
    mesh: Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec.

    Mesh axes absent from ``mesh`` are ignored; a mesh axis already used by an earlier dimension is skipped;
    with ``shape`` (and ``mesh``), trailing mesh axes are dropped from a dimension until their product divides it.
    """
    table = dict(rules)
    if shape is not None and len(shape) != len(names):
        raise ValueError(f"logical axes {tuple(names)} do not match shape {tuple(shape)}")
    # Inside shard_map, the axes it made manual are split by hand already: they are not there to shard over.
    mesh_axes = set(mesh.axis_names) - set(getattr(mesh, "manual_axes", ())) if mesh is not None else None
    used: set[str] = set()
    spec = []
    for i, name in enumerate(names):
        target = table.get(name) if name is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        if mesh_axes is not None:
            axes = tuple(a for a in axes if a in mesh_axes)
        axes = tuple(a for a in axes if a not in used)
        if shape is not None and mesh is not None:
            while axes and shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = axes[:-1]
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def make_mesh(data: int = 1, expert: int = 1, devices: Sequence[jax.Device] | None = None, *, model: int = 1) -> Mesh:
    """A ``data`` x ``expert`` mesh over ``data * expert`` devices (the first ones by default), with a trailing
    ``model`` (tensor-parallel) axis when ``model > 1``. ``devices`` may be compile-only devices of a TPU/GPU
    topology (``dsjax.aot``): the mesh then describes that slice."""
    n = data * expert * model
    devices = list(devices if devices is not None else jax.devices())[:n]
    if len(devices) != n or min(data, expert, model) < 1:
        raise ValueError(f"a {data}x{expert}x{model} mesh needs {n} devices, {len(devices)} available")
    shape, names = (data, expert, model), ("data", "expert", "model")
    if model == 1:
        shape, names = shape[:2], names[:2]
    return Mesh(np.array(devices).reshape(shape), names, axis_types=(AxisType.Auto,) * len(names))


def active_platform() -> str:
    """The platform (``cpu``, ``tpu``, ``gpu``/``cuda``) of the active mesh's devices, else the default backend.

    Decisions that depend on the hardware (MoE dispatch, attention kernels) read this rather than
    ``jax.default_backend()``: a program compiled on a CPU host for a TPU slice must take the TPU path.
    """
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    platform = getattr(device, "platform", None) or jax.default_backend()
    return "gpu" if platform in ("cuda", "rocm") else platform


def free_axes() -> tuple[str, ...]:
    """The active mesh's axes not already manual (outside any enclosing ``shard_map``'s): those a per-shard
    kernel's own ``shard_map`` can still split over. Empty without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    return () if mesh.empty else tuple(a for a in mesh.axis_names if a not in mesh.manual_axes)


def batch_row_axes(rows: int, rules: Rules = DEFAULT_RULES, *, tile: int = 1) -> tuple[str, ...]:
    """The free mesh axes the ``batch`` rule shards ``rows`` over, in the rule's order, each kept while the rows
    still split into shards of a multiple of ``tile`` rows (an uneven axis stays replicated): how a Mosaic
    kernel, which XLA cannot partition, splits its rows like dsjax's activations."""
    mesh = jax.sharding.get_abstract_mesh()
    free = free_axes()
    if not free:
        return ()
    batch = logical_to_spec(("batch",), rules, mesh)[0]
    axes, size = [], 1
    for a in (batch,) if isinstance(batch, str) else tuple(batch or ()):
        if a in free and rows % (size * mesh.shape[a] * tile) == 0:
            axes.append(a)
            size *= mesh.shape[a]
    return tuple(axes)


def varying_axes(x) -> frozenset:
    """The manual mesh axes ``x`` is typed as varying along inside ``shard_map`` (empty outside it)."""
    aval = jax.typeof(x)
    mat = getattr(aval, "manual_axis_type", None)  # jax >= 0.10; earlier releases call it ``vma``
    return frozenset(getattr(mat, "varying", ()) if mat is not None else getattr(aval, "vma", ()))


def shard(x: jax.Array, names: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> jax.Array:
    """Constrain an activation's sharding under the active mesh (``jax.set_mesh``); a no-op without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(names, rules, mesh))


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """The NamedSharding of one variable from its ``logical_axes`` metadata."""
    names = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    if names is None or len(names) != len(shape):
        raise ValueError(f"variable of shape {shape} has logical axes {names!r}")
    return NamedSharding(mesh, logical_to_spec(names, rules, mesh, shape))


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> nnx.State:
    """NamedSharding for every variable of ``state`` (same tree), for ``jit`` in/out shardings."""
    from flax import nnx

    return jax.tree.map(
        lambda v: v.replace(variable_sharding(v, mesh, rules)), state, is_leaf=lambda x: isinstance(x, nnx.Variable)
    )


# The rules table the weights were laid out with, declared by `use_mesh` while a step is traced.
_WEIGHT_RULES: contextvars.ContextVar[Rules | None] = contextvars.ContextVar("dsjax_weight_rules", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[None]:
    """``jax.set_mesh(mesh)`` that also declares ``rules``, the table the weights were placed with, to the code
    traced inside it (:func:`weight_spec`). dsjax's train loop and compile harness trace their steps under it."""
    token = _WEIGHT_RULES.set(rules)
    try:
        with jax.set_mesh(mesh):
            yield
    finally:
        _WEIGHT_RULES.reset(token)


def gathered_spec(spec: PartitionSpec) -> PartitionSpec:
    """``spec`` without the mesh axes the ``batch`` rule splits tokens over: the layout of a weight that FSDP has
    split over them once it is gathered for use (tensor-parallel axes stay)."""
    batch = logical_to_spec(("batch",), DEFAULT_RULES, jax.sharding.get_abstract_mesh())[0]
    batch = {batch} if isinstance(batch, str) else set(batch or ())
    parts = []
    for axes in spec:
        kept = tuple(a for a in ((axes,) if isinstance(axes, str) else tuple(axes or ())) if a not in batch)
        parts.append(None if not kept else kept[0] if len(kept) == 1 else kept)
    return PartitionSpec(*parts)


def weight_spec(names: Sequence[str | None], shape: Sequence[int]) -> PartitionSpec | None:
    """Where a weight of logical axes ``names`` and ``shape`` lies under the active mesh and the rules declared
    by :func:`use_mesh`; None when none were declared (or there is no mesh). For values derived from a weight
    elementwise (FP8 experts quantised ahead): pinned to the weight's layout, they are computed on its shards
    instead of wherever XLA's propagation puts them (for V3's experts on v5p, after gathering the fp32 weight)."""
    rules = _WEIGHT_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return None
    return logical_to_spec(names, rules, mesh, shape)
