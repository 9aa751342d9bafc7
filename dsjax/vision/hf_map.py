"""Tensor-name maps from PyTorch checkpoints into the vision tower and projector.

Two tower layouts: ``hf`` is transformers' ``SiglipVisionModel`` (separate q/k/v, ``[d, c, p, p]`` conv),
``vl2`` is timm's ViT as DeepSeek-VL2 stores it under ``vision.`` (fused ``qkv``, ``pos_embed [1, n, d]``).
The pooling heads (``head.*``, ``attn_pool.*``) are skipped: DeepSeek-VL/VL2 do not use them.
Torch ``Linear`` weights are ``[out, in]``; dsjax's are ``[in, out]`` with heads split out (``wq [d, h, k]``,
``wo [h, k, d]``), and encoder layers stacked on a leading axis.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.checkpoint.safetensors_io import CheckpointError, listing

# dsjax leaf path (``layers`` leaves: one tensor per encoder layer ``{i}``) -> (name, kind, fused part).
# kind: ``linear`` [out, in] -> [in, out]; ``conv`` [d, c, p, p] -> [p, p, c, d]; ``copy`` reshape only.
# part: index of the q/k/v third of a fused ``qkv`` tensor's rows, else None.
_LAYER_HF = {
    ("ln1", "scale"): ("layer_norm1.weight", "copy", None),
    ("ln1", "bias"): ("layer_norm1.bias", "copy", None),
    ("wq",): ("self_attn.q_proj.weight", "linear", None),
    ("bq",): ("self_attn.q_proj.bias", "copy", None),
    ("wk",): ("self_attn.k_proj.weight", "linear", None),
    ("bk",): ("self_attn.k_proj.bias", "copy", None),
    ("wv",): ("self_attn.v_proj.weight", "linear", None),
    ("bv",): ("self_attn.v_proj.bias", "copy", None),
    ("wo",): ("self_attn.out_proj.weight", "linear", None),
    ("bo",): ("self_attn.out_proj.bias", "copy", None),
    ("ln2", "scale"): ("layer_norm2.weight", "copy", None),
    ("ln2", "bias"): ("layer_norm2.bias", "copy", None),
    ("fc1", "w"): ("mlp.fc1.weight", "linear", None),
    ("fc1", "b"): ("mlp.fc1.bias", "copy", None),
    ("fc2", "w"): ("mlp.fc2.weight", "linear", None),
    ("fc2", "b"): ("mlp.fc2.bias", "copy", None),
}
_LAYER_VL2 = {
    ("ln1", "scale"): ("norm1.weight", "copy", None),
    ("ln1", "bias"): ("norm1.bias", "copy", None),
    **{(w,): ("attn.qkv.weight", "linear", n) for n, w in enumerate(("wq", "wk", "wv"))},
    **{(b,): ("attn.qkv.bias", "copy", n) for n, b in enumerate(("bq", "bk", "bv"))},
    ("wo",): ("attn.proj.weight", "linear", None),
    ("bo",): ("attn.proj.bias", "copy", None),
    ("ln2", "scale"): ("norm2.weight", "copy", None),
    ("ln2", "bias"): ("norm2.bias", "copy", None),
    ("fc1", "w"): ("mlp.fc1.weight", "linear", None),
    ("fc1", "b"): ("mlp.fc1.bias", "copy", None),
    ("fc2", "w"): ("mlp.fc2.weight", "linear", None),
    ("fc2", "b"): ("mlp.fc2.bias", "copy", None),
}
_TOP_HF = {
    ("patch_w",): ("embeddings.patch_embedding.weight", "conv", None),
    ("patch_b",): ("embeddings.patch_embedding.bias", "copy", None),
    ("pos_embed",): ("embeddings.position_embedding.weight", "copy", None),
    ("post_norm", "scale"): ("post_layernorm.weight", "copy", None),
    ("post_norm", "bias"): ("post_layernorm.bias", "copy", None),
}
_TOP_VL2 = {
    ("patch_w",): ("patch_embed.proj.weight", "conv", None),
    ("patch_b",): ("patch_embed.proj.bias", "copy", None),
    ("pos_embed",): ("pos_embed", "copy", None),
    ("post_norm", "scale"): ("norm.weight", "copy", None),
    ("post_norm", "bias"): ("norm.bias", "copy", None),
}
# layout -> (top-level table, per-layer table, per-layer name prefix, default key prefix, skipped sub-prefixes)
TOWER_LAYOUTS = {
    "hf": (_TOP_HF, _LAYER_HF, "encoder.layers.{i}.", "", ("head.",)),
    "vl2": (_TOP_VL2, _LAYER_VL2, "blocks.{i}.", "vision.", ("attn_pool.",)),
}
# projector layout -> (name of Linear i, default key prefix)
PROJECTOR_LAYOUTS = {
    "vl2": ("layers.{j}.", "projector."),  # nn.Sequential: Linear at even j = 2 i, GELU at odd j
    "hf": ("linear{n}.", "aligner."),  # transformers' DeepseekVLAligner (v1): linear1, GELU, linear2
}


def _numpy(value) -> np.ndarray:
    """A torch tensor (detached to CPU) or any array-like as numpy."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
        # numpy has no bfloat16: go through fp32, exact for bf16 values
        value = (value.float() if str(value.dtype) == "torch.bfloat16" else value).numpy()
    return np.asarray(value)


def _convert(value: np.ndarray, kind: str, part: int | None, shape: tuple[int, ...]) -> np.ndarray:
    if part is not None:
        value = np.split(value, 3, axis=0)[part]
    if kind == "linear":
        value = value.T
    elif kind == "conv":
        value = value.transpose(2, 3, 1, 0)
    if value.size != int(np.prod(shape)):
        raise ValueError(f"has {value.shape} ({value.size} values), expected {shape}")
    return value.reshape(shape)


def _load(module: nnx.Module, tensors: Mapping[str, np.ndarray], names_of, skipped: tuple[str, ...], where: str):
    """Fill every parameter of ``module`` from ``tensors``. ``names_of(path, shape)`` returns
    ``(entries, stacked)``: one ``(name, kind, part)`` per stacked layer when ``stacked``, else a single one."""
    _, state = nnx.split(module)
    flat = nnx.to_flat_state(state)
    plan = [(var, *names_of(path, var.get_value().shape)) for path, var in flat]
    expected = {name for _, entries, _ in plan for name, _, _ in entries}
    missing = expected - set(tensors)
    unexpected = {k for k in tensors if k not in expected and not k.startswith(skipped)}
    if missing or unexpected:
        parts = [
            f"missing tensors: {listing(missing)}" if missing else "",
            f"unexpected tensors: {listing(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(f"{where}: " + "; ".join(p for p in parts if p))
    for var, entries, stacked in plan:
        shape = var.get_value().shape
        slice_shape = shape[1:] if stacked else shape
        try:
            slices = [_convert(_numpy(tensors[name]), kind, part, slice_shape) for name, kind, part in entries]
        except ValueError as e:
            raise CheckpointError(f"{where}: {entries[0][0]} {e}") from None
        value = np.stack(slices) if stacked else slices[0]
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    nnx.update(module, state)


def _strip(state_dict: Mapping, prefix: str) -> dict:
    return {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}


def load_tower(tower: nnx.Module, state_dict: Mapping, *, layout: str = "hf", prefix: str | None = None) -> None:
    """Copy a PyTorch SigLIP tower's weights into ``tower`` (a :class:`~dsjax.vision.tower.SiglipVisionTower`).

    Args:
      state_dict: name -> tensor (torch or numpy); keys outside ``prefix`` are ignored, so a whole VL checkpoint
        can be passed.
      layout: ``hf`` (``SiglipVisionModel.state_dict()``) or ``vl2`` (DeepSeek-VL2's timm ViT).
      prefix: key prefix of the tower; defaults to none (hf: transformers 5's ``SiglipVisionModel`` keys start at
        ``embeddings.``; older checkpoints use ``vision_model.``) and to ``vision.`` (vl2).

    Raises:
      CheckpointError: missing, unexpected or wrongly sized tensors.
    """
    if layout not in TOWER_LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {sorted(TOWER_LAYOUTS)}")
    top, per_layer, layer_prefix, default_prefix, skipped = TOWER_LAYOUTS[layout]
    prefix = default_prefix if prefix is None else prefix

    def names_of(path, shape):
        if path[0] == "layers":
            name, kind, part = per_layer[tuple(path[1:])]
            return [((layer_prefix + name).format(i=i), kind, part) for i in range(shape[0])], True
        return [top[tuple(path)]], False

    _load(tower, _strip(state_dict, prefix), names_of, skipped, f"{layout} vision tower under {prefix!r}")


def load_projector(projector: nnx.Module, state_dict: Mapping, *, layout: str = "vl2", prefix: str | None = None):
    """Copy a PyTorch projector's weights into ``projector`` (a :class:`~dsjax.vision.tower.Projector`).

    ``layout``: ``vl2`` (DeepSeek-VL2 ``projector.layers.{0,2,...}``) or ``hf`` (transformers' DeepSeek-VL v1
    ``aligner.linear1/linear2``); ``prefix`` defaults to ``projector.`` / ``aligner.``.
    """
    if layout not in PROJECTOR_LAYOUTS:
        raise ValueError(f"layout={layout!r}; choose one of {sorted(PROJECTOR_LAYOUTS)}")
    template, default_prefix = PROJECTOR_LAYOUTS[layout]
    prefix = default_prefix if prefix is None else prefix

    def names_of(path, shape):
        _, i, leaf = path
        suffix, kind = ("weight", "linear") if leaf == "w" else ("bias", "copy")
        return [(template.format(j=2 * i, n=i + 1) + suffix, kind, None)], False

    _load(projector, _strip(state_dict, prefix), names_of, (), f"{layout} projector under {prefix!r}")
