"""What a pipeline's B keeps for its deferred W, and how it is stored: which vjp residuals, in what layout.

B runs `jax.vjp` of a stage and W (later) needs the closure's residuals to compute the weight gradients. Two
things decide the memory this costs per residual slot:

- **Which leaves.** Only those that depend on the micro-batch (the stage input ``x`` or its ``inputs``):
  `data_dependent` follows the closure's jaxpr. The rest are functions of the parameters alone (the weights
  themselves, per-layer slices of a scanned stack, bf16 casts of fp32 master weights, gathered FSDP shards):
  W recomputes them from the parameters it has, at the cost of a cast or a gather, instead of a slot holding a
  copy of the stage's weights.
- **Layout.** The leaves of every stage kind share one buffer per dtype, so each is flattened into a row. A
  flat concatenation of differently-sharded leaves is not shardable: XLA builds it whole on every device. So
  each leaf is laid out ``[N, -1]`` with its first dimension that ``N`` (the devices of the mesh axes that stay
  automatic inside the pipeline: ``expert``) divides moved to the front and split over them; rows concatenate
  along the second axis and the slot buffer is ``[slots, N, width]``, split over its ``N`` axis. Leaves no such
  dimension exists for go to a small replicated row.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jcore
from jax.sharding import PartitionSpec as P


def data_dependent(jaxpr: jcore.ClosedJaxpr, tainted_inputs: Sequence[bool]) -> list[bool]:
    """For each output of ``jaxpr``, whether it depends on an input marked in ``tainted_inputs``.

    Follows data through nested jaxprs (calls, remat, custom derivatives, scans and loops to a fixed point,
    conditionals over their branches); an operation it does not look into taints all its outputs if any input
    is tainted, so an error can only ever store too much, never too little.
    """
    return _taint(jaxpr.jaxpr, list(tainted_inputs))


def _sub_jaxprs(params: dict) -> list:
    subs = []
    for v in params.values():
        if isinstance(v, jcore.ClosedJaxpr | jcore.Jaxpr):
            subs.append(v)
    return subs


def _open(j):
    return j.jaxpr if isinstance(j, jcore.ClosedJaxpr) else j


def _taint(jaxpr: jcore.Jaxpr, in_taint: list[bool]) -> list[bool]:
    tainted = {v for v, t in zip(jaxpr.invars, in_taint, strict=True) if t}

    def is_t(v) -> bool:
        return not isinstance(v, jcore.Literal) and v in tainted

    for eqn in jaxpr.eqns:
        ins = [is_t(v) for v in eqn.invars]
        name = eqn.primitive.name
        if not any(ins):
            continue
        if name == "scan":
            body = _open(eqn.params["jaxpr"])
            n_c, n_carry = eqn.params["num_consts"], eqn.params["num_carry"]
            carry = ins[n_c : n_c + n_carry]
            while True:
                out = _taint(body, ins[:n_c] + carry + ins[n_c + n_carry :])
                new = [a or b for a, b in zip(carry, out[:n_carry], strict=True)]
                if new == carry:
                    break
                carry = new
            outs = carry + out[n_carry:]
        elif name == "while":
            nc, nb = eqn.params["cond_nconsts"], eqn.params["body_nconsts"]
            body = _open(eqn.params["body_jaxpr"])
            carry = ins[nc + nb :]
            while True:
                new = [a or b for a, b in zip(carry, _taint(body, ins[nc : nc + nb] + carry), strict=True)]
                if new == carry:
                    break
                carry = new
            cond = _taint(_open(eqn.params["cond_jaxpr"]), ins[:nc] + carry)
            outs = [True] * len(carry) if any(cond) else carry
        elif name == "cond":
            if ins[0]:
                outs = [True] * len(eqn.outvars)
            else:
                per = [_taint(_open(b), ins[1:]) for b in eqn.params["branches"]]
                outs = [any(col) for col in zip(*per, strict=True)]
        else:
            subs = [
                s
                for s in _sub_jaxprs(eqn.params)
                if len(_open(s).invars) == len(eqn.invars) and len(_open(s).outvars) == len(eqn.outvars)
            ]
            outs = _taint(_open(subs[0]), ins) if len(subs) == 1 else [True] * len(eqn.outvars)
        tainted.update(v for v, t in zip(eqn.outvars, outs, strict=True) if t)
    return [is_t(v) for v in jaxpr.outvars]


def split_spec(shape: Sequence[int], axes: tuple[str, ...], n: int, skip: int = 0) -> P | None:
    """The spec splitting ``shape``'s first dimension from ``skip`` on that ``n`` divides over ``axes``; None
    when there is none (or nothing to split over)."""
    for i in range(skip, len(shape)):
        if n > 1 and shape[i] % n == 0:
            return P(*([None] * i), axes, *([None] * (len(shape) - i - 1)))
    return None


@dataclass(frozen=True)
class _Slot:
    dtype: np.dtype
    sharded: bool  # in the [N, width] part (else the replicated row)
    offset: int  # in elements of one device's share (sharded) or of the row (replicated)
    size: int
    shape: tuple[int, ...]
    dim: int  # the dimension split over the N devices (moved to the front), -1 when replicated


class ResidualLayout:
    """Where each stored leaf of each stage kind sits in the per-dtype residual rows (see the module doc).

    ``kinds[k]`` lists kind k's stored leaves as ``(dtype, shape)``; ``axes`` are the automatic mesh axes the
    rows are split over and ``n`` their device count (1: nothing to split). `rows` are the buffers' per-slot
    shapes (``[n, width]`` per dtype, then ``[width]`` per dtype for the replicated leaves); `pack` / `unpack`
    convert between a kind's leaves and rows.
    """

    def __init__(self, kinds: Sequence[Sequence[tuple]], axes: tuple[str, ...], n: int):
        self.axes, self.n = axes, n
        self.layouts: list[list[_Slot]] = []
        sharded_w: dict = {}
        rep_w: dict = {}
        for stored in kinds:
            used_s: dict = {}
            used_r: dict = {}
            layout = []
            for dtype, shape in stored:
                dtype, shape = jnp.dtype(dtype), tuple(shape)
                size = math.prod(shape)
                spec = split_spec(shape, axes, n)
                dim = next((i for i, a in enumerate(spec) if a is not None), -1) if spec is not None else -1
                if dim >= 0 or n == 1:
                    share = size // n
                    layout.append(_Slot(dtype, True, used_s.get(dtype, 0), share, shape, dim))
                    used_s[dtype] = used_s.get(dtype, 0) + share
                else:
                    layout.append(_Slot(dtype, False, used_r.get(dtype, 0), size, shape, -1))
                    used_r[dtype] = used_r.get(dtype, 0) + size
            self.layouts.append(layout)
            for d, w in used_s.items():
                sharded_w[d] = max(sharded_w.get(d, 0), w)
            for d, w in used_r.items():
                rep_w[d] = max(rep_w.get(d, 0), w)
        self.sharded = sorted(sharded_w, key=str)  # dtypes of the split rows, then of the replicated ones
        self.replicated = sorted(rep_w, key=str)
        self.sharded_widths = [sharded_w[d] for d in self.sharded]
        self.replicated_widths = [rep_w[d] for d in self.replicated]

    @property
    def rows(self) -> list[jax.ShapeDtypeStruct]:
        """One slot's buffer rows: ``[n, width]`` per dtype of split leaves, ``[width]`` per replicated dtype."""
        s = [jax.ShapeDtypeStruct((self.n, w), d) for d, w in zip(self.sharded, self.sharded_widths, strict=True)]
        r = [jax.ShapeDtypeStruct((w,), d) for d, w in zip(self.replicated, self.replicated_widths, strict=True)]
        return s + r

    def bytes_per_slot(self) -> int:
        """The bytes of one residual slot, all devices together."""
        return sum(math.prod(r.shape) * r.dtype.itemsize for r in self.rows)

    def constrain(self, buf: jax.Array, lead: int) -> jax.Array:
        """Split a ``[*lead dims, n, width]`` buffer (or row) over the automatic axes on its ``n`` axis."""
        if self.n == 1 or buf.ndim != lead + 2:
            return buf
        return lax.with_sharding_constraint(buf, P(*([None] * lead), self.axes, None))

    def _split(self, a: jax.Array, dim: int) -> jax.Array:
        if self.n == 1:
            return a.reshape(1, -1)
        a = lax.with_sharding_constraint(a, split_spec(a.shape, self.axes, self.n, dim))
        return jnp.moveaxis(a, dim, 0).reshape(self.n, -1)

    def pack(self, kind: int, leaves: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
        """Kind ``kind``'s stored leaves -> one slot's rows (zero-padded to the widest kind)."""
        layout = self.layouts[kind]
        out = []
        for d, w in zip(self.sharded, self.sharded_widths, strict=True):
            parts = [self._split(a, s.dim) for a, s in zip(leaves, layout, strict=True) if s.sharded and s.dtype == d]
            row = jnp.concatenate(parts, axis=1) if parts else jnp.zeros((self.n, 0), d)
            out.append(self.constrain(jnp.pad(row, ((0, 0), (0, w - row.shape[1]))), 0))
        for d, w in zip(self.replicated, self.replicated_widths, strict=True):
            parts = [a.reshape(-1) for a, s in zip(leaves, layout, strict=True) if not s.sharded and s.dtype == d]
            row = jnp.concatenate(parts) if parts else jnp.zeros((0,), d)
            out.append(jnp.pad(row, (0, w - row.shape[0])))
        return tuple(out)

    def unpack(self, kind: int, rows: Sequence[jax.Array]) -> list[jax.Array]:
        """One slot's rows -> kind ``kind``'s stored leaves (shapes and shardings as `pack` received them)."""
        out = []
        for s in self.layouts[kind]:
            if s.sharded:
                row = self.constrain(rows[self.sharded.index(s.dtype)], 0)
                part = lax.slice_in_dim(row, s.offset, s.offset + s.size, axis=1)
                if self.n == 1:
                    a = part.reshape(s.shape)
                else:  # `_split` moved the split dimension to the front
                    moved = (s.shape[s.dim], *s.shape[: s.dim], *s.shape[s.dim + 1 :])
                    a = jnp.moveaxis(part.reshape(moved), 0, s.dim)
            else:
                row = rows[len(self.sharded) + self.replicated.index(s.dtype)]
                a = lax.slice_in_dim(row, s.offset, s.offset + s.size).reshape(s.shape)
            out.append(a)
        return out
