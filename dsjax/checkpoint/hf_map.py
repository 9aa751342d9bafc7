"""The declarative map between dsjax parameters and Hugging Face DeepSeek tensor names.

dsjax stores weights ``[in, out]`` (heads split out: ``wq_b [q, h, n+r]``, ``wkv_b [c, h, n+v]``,
``wo [h, v, d]``), stacks decoder layers on a leading axis (dense stack, MoE stack, MTP stack) and experts on
the next. HF stores torch ``[out, in]`` matrices per layer and per expert. Each dsjax leaf therefore maps to one
HF tensor per (layer[, expert]) index; :func:`leaf_specs` enumerates them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np

from dsjax.config import ModelConfig

# suffix of a dsjax path inside one decoder layer -> (HF name inside the layer, kind, number of input axes)
_ATTN = {
    ("attn", "wq"): ("self_attn.q_proj.weight", "linear", 1),
    ("attn", "wq_a"): ("self_attn.q_a_proj.weight", "linear", 1),
    ("attn", "q_norm", "weight"): ("self_attn.q_a_layernorm.weight", "vector", 0),
    ("attn", "wq_b"): ("self_attn.q_b_proj.weight", "linear", 1),
    ("attn", "wkv_a"): ("self_attn.kv_a_proj_with_mqa.weight", "linear", 1),
    ("attn", "kv_norm", "weight"): ("self_attn.kv_a_layernorm.weight", "vector", 0),
    ("attn", "wkv_b"): ("self_attn.kv_b_proj.weight", "linear", 1),
    ("attn", "wo"): ("self_attn.o_proj.weight", "linear", 2),
    ("attn_norm", "weight"): ("input_layernorm.weight", "vector", 0),
    ("ffn_norm", "weight"): ("post_attention_layernorm.weight", "vector", 0),
}
_DENSE_FFN = {
    ("ffn", "w_gate"): ("mlp.gate_proj.weight", "linear", 1),
    ("ffn", "w_up"): ("mlp.up_proj.weight", "linear", 1),
    ("ffn", "w_down"): ("mlp.down_proj.weight", "linear", 1),
}
_MOE_FFN = {
    ("ffn", "router"): ("mlp.gate.weight", "linear", 1),
    ("ffn", "routing_bias"): ("mlp.gate.e_score_correction_bias", "vector", 0),
    ("ffn", "w_gate"): ("mlp.experts.{e}.gate_proj.weight", "linear", 1),
    ("ffn", "w_up"): ("mlp.experts.{e}.up_proj.weight", "linear", 1),
    ("ffn", "w_down"): ("mlp.experts.{e}.down_proj.weight", "linear", 1),
    ("ffn", "shared", "w_gate"): ("mlp.shared_experts.gate_proj.weight", "linear", 1),
    ("ffn", "shared", "w_up"): ("mlp.shared_experts.up_proj.weight", "linear", 1),
    ("ffn", "shared", "w_down"): ("mlp.shared_experts.down_proj.weight", "linear", 1),
}
_MTP_OWN = {
    ("eh_proj",): ("eh_proj.weight", "linear", 1),
    ("enorm", "weight"): ("enorm.weight", "vector", 0),
    ("hnorm", "weight"): ("hnorm.weight", "vector", 0),
    ("head_norm", "weight"): ("shared_head.norm.weight", "vector", 0),
}
_TOP = {
    ("embed",): ("model.embed_tokens.weight", "copy", 0),
    ("final_norm", "weight"): ("model.norm.weight", "vector", 0),
    ("lm_head",): ("lm_head.weight", "linear", 1),
}
# The released MTP layers carry copies of the shared embedding and output head under these names.
MTP_SHARED_COPIES = {"embed_tokens.weight": ("embed",), "shared_head.head.weight": ("lm_head",)}


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """How one dsjax leaf of shape ``shape`` is assembled from HF tensors.

    ``stack_dims`` leading axes index HF tensors (layers, then experts); ``names[idx]`` is the HF name of the
    tensor for stacked index ``idx``; every such tensor holds ``slice_shape = shape[stack_dims:]`` values.
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    kind: str
    in_ndim: int
    stack_dims: int
    template: str  # with {i} (absolute HF layer index) and {e} (expert)
    layer_offset: int

    @property
    def slice_shape(self) -> tuple[int, ...]:
        return self.shape[self.stack_dims :]

    def name(self, idx: tuple[int, ...]) -> str:
        i = idx[0] + self.layer_offset if self.stack_dims else None
        e = idx[1] if self.stack_dims > 1 else None
        return self.template.format(i=i, e=e)

    def indices(self) -> Iterator[tuple[int, ...]]:
        return np.ndindex(*self.shape[: self.stack_dims])

    def hf_shape(self) -> tuple[int, ...]:
        s = self.slice_shape
        if self.kind == "scale":
            return s[::-1]
        if self.kind == "linear":
            return (int(np.prod(s[self.in_ndim :])), int(np.prod(s[: self.in_ndim])))
        return s

    def to_ours(self, hf: np.ndarray) -> np.ndarray:
        """One HF tensor -> this leaf's per-index slice."""
        return (hf.T if self.kind in ("linear", "scale") else hf).reshape(self.slice_shape)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """This leaf's per-index slice -> the HF tensor."""
        if self.kind == "linear":
            return ours.reshape(int(np.prod(ours.shape[: self.in_ndim])), -1).T
        if self.kind == "scale":
            return ours.T
        return ours


SCALE_SUFFIX = "_scale"  # dsjax: ``wq_b`` + ``wq_b_scale``; HF: ``q_b_proj.weight`` + ``q_b_proj.weight_scale_inv``


def scale_name(weight_name: str) -> str:
    """HF name of the block scales of an FP8 weight (a multiplier, despite ``_inv``)."""
    return weight_name + "_scale_inv"


def leaf_spec(path: tuple[str, ...], shape: tuple[int, ...], cfg: ModelConfig) -> LeafSpec:
    """The :class:`LeafSpec` for the dsjax leaf at ``path``; raises KeyError for an unknown path.

    FP8 block scales (``..._scale`` leaves, ``[stack..., K/128, N/128]``) map to ``weight_scale_inv`` tensors
    ``[N/128, K/128]`` next to their weight.
    """
    if path[-1].endswith(SCALE_SUFFIX):
        base = leaf_spec((*path[:-1], path[-1][: -len(SCALE_SUFFIX)]), shape, cfg)
        return dataclasses.replace(base, kind="scale", in_ndim=1, template=scale_name(base.template))
    head, rest = path[0], tuple(path[1:])
    if head in ("dense_layers", "moe_layers"):
        table = {**_ATTN, **(_DENSE_FFN if head == "dense_layers" else _MOE_FFN)}
        hf, kind, in_ndim = table[rest]
        offset = 0 if head == "dense_layers" else cfg.first_k_dense_replace
        stack = 2 if "{e}" in hf else 1
        return LeafSpec(path, shape, kind, in_ndim, stack, "model.layers.{i}." + hf, offset)
    if head == "mtp":
        if rest[:1] == ("layer",):
            hf, kind, in_ndim = {**_ATTN, **_MOE_FFN}[rest[1:]]
        else:
            hf, kind, in_ndim = _MTP_OWN[rest]
        stack = 2 if "{e}" in hf else 1
        return LeafSpec(path, shape, kind, in_ndim, stack, "model.layers.{i}." + hf, cfg.num_hidden_layers)
    hf, kind, in_ndim = _TOP[tuple(path)]
    return LeafSpec(path, shape, kind, in_ndim, 0, hf, 0)


def mtp_copy_names(cfg: ModelConfig) -> dict[str, tuple[str, ...]]:
    """HF names of the MTP layers' copies of the shared embedding / head -> the dsjax leaf they copy."""
    return {
        f"model.layers.{cfg.num_hidden_layers + k}.{name}": leaf
        for k in range(cfg.num_nextn_predict_layers)
        for name, leaf in MTP_SHARED_COPIES.items()
    }
