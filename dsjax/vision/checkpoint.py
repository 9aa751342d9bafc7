"""Load and save DeepSeek-VL2-layout checkpoints: one config.json and safetensors holding all three parts.

config.json: ``language_config`` (a DeepSeek-V2/V3 config, read by :mod:`dsjax.hf_config`), ``vision_config``
(VL2's timm fields ``width / layers / heads / mlp_ratio`` or HF SigLIP names), ``projector_config``,
``tile_tag`` ("2D"), ``global_view_pos`` and ``candidate_resolutions``. dsjax adds ``image_token_id``,
``image_mean`` and ``image_std`` (VL2 keeps these in its processor config). Tensors: ``vision.*`` (timm ViT, fused
qkv), ``projector.layers.{0,2,..}``, ``language.`` + the language model's HF names, ``image_newline`` and
``view_seperator``. Float weights only; the language part is assembled leaf by leaf with
:func:`dsjax.checkpoint.hf_map.leaf_spec`, the same map ``from_pretrained`` uses.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsjax.checkpoint.hf_map import SCALE_SUFFIX, leaf_spec
from dsjax.checkpoint.safetensors_io import (
    CheckpointError,
    CheckpointReader,
    listing,
    raise_if_nonfinite,
    write_sharded,
)
from dsjax.config import ConfigError
from dsjax.hf_config import config_from_hf, config_to_hf, read_config_json
from dsjax.vision.config import ProjectorConfig, TilingConfig, VisionConfig
from dsjax.vision.hf_map import TOWER_LAYOUTS, load_projector, load_tower
from dsjax.vision.model import VisionLanguageModel, VLConfig

LANGUAGE_PREFIX = "language."
SPECIAL_EMBEDDINGS = ("image_newline", "view_seperator")  # VL2's spelling
_PREFIXES = ("vision.", "projector.", LANGUAGE_PREFIX)


# ---- config ---------------------------------------------------------------------------------------------------


def _vision_from_json(d: dict) -> VisionConfig:
    """VL2's ``VisionEncoderConfig`` (timm names; heads default 16, MLP ``int(width * mlp_ratio)``) or HF's."""
    width = d.get("hidden_size", d.get("width", 1024))
    intermediate = d.get("intermediate_size") or int(width * float(d.get("mlp_ratio", 4.0)))
    return VisionConfig(
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=d.get("num_hidden_layers", d.get("layers", 24)),
        num_attention_heads=d.get("num_attention_heads", d.get("heads", 16)),
        image_size=d.get("image_size", 384),
        patch_size=d.get("patch_size", 16),
        hidden_act=d.get("hidden_act", "gelu_pytorch_tanh"),
        layer_norm_eps=float(d.get("layer_norm_eps", 1e-6)),
    )


def _tiling_from_json(d: dict, vision: VisionConfig, projector: ProjectorConfig) -> TilingConfig:
    if d.get("tile_tag", "2D") != "2D":
        raise ConfigError(f"tile_tag={d['tile_tag']!r}: only VL2's '2D' tiling is supported")
    candidates = [tuple(c) for c in d.get("candidate_resolutions") or [[vision.image_size] * 2]]
    max_tiles = max((w // vision.image_size) * (h // vision.image_size) for w, h in candidates)
    tiling = TilingConfig(
        image_size=vision.image_size,
        patch_size=vision.patch_size,
        downsample_ratio=projector.downsample_ratio,
        max_tiles=max(max_tiles, 1),
        global_view_pos=d.get("global_view_pos", "head"),
        image_mean=tuple(d.get("image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(d.get("image_std", (0.5, 0.5, 0.5))),
    )
    if list(tiling.candidate_resolutions) != candidates:
        # dsjax derives the candidates (and their tie-breaking order) from max_tiles, as the released configs list
        raise ConfigError(
            f"candidate_resolutions {candidates[:4]}... are not the m * n <= {max_tiles} grid of "
            f"{vision.image_size}-px tiles in VL2's order; other lists are not supported"
        )
    return tiling


def vl_config_from_json(d: dict, *, image_token_id: int | None = None, **language_overrides) -> VLConfig:
    """A :class:`~dsjax.vision.model.VLConfig` from a parsed VL2 ``config.json``; ``image_token_id`` overrides the
    file's (VL2's own configs do not name it: it is the tokenizer's ``<image>`` id)."""
    for key in ("language_config", "vision_config", "projector_config"):
        if not isinstance(d.get(key), dict):
            raise ConfigError(f"config.json lacks {key!r}: not a DeepSeek-VL2 config")
    lang = d["language_config"]
    if lang.get("use_mla") is False:
        raise ConfigError("language_config.use_mla=false (VL2-Tiny's MHA attention) is not supported: dsjax has MLA")
    try:
        language = config_from_hf(lang, **language_overrides)
    except KeyError as e:
        raise ConfigError(f"language_config lacks {e.args[0]!r}") from None
    vision = _vision_from_json(d["vision_config"])
    p = d["projector_config"]
    fields = ("projector_type", "input_dim", "n_embed", "depth", "mlp_ratio", "downsample_ratio")
    projector = ProjectorConfig(**{k: p[k] for k in fields if k in p})
    token = d.get("image_token_id") if image_token_id is None else image_token_id
    return VLConfig(
        language=language,
        vision=vision,
        projector=projector,
        tiling=_tiling_from_json(d, vision, projector),
        image_token_id=token,
    )


def vl_config_to_json(cfg: VLConfig, *, torch_dtype: str = "bfloat16") -> dict:
    """The ``config.json`` dict of ``cfg`` (VL2's layout plus dsjax's ``image_token_id`` / mean / std)."""
    if cfg.vision is None:
        raise ValueError("a text-only VLConfig has no VL2 checkpoint layout; save its language model instead")
    v, p, t = cfg.vision, cfg.projector, cfg.tiling
    return {
        "architectures": ["DeepseekVLV2ForCausalLM"],
        "model_type": "deepseek_vl_v2",
        "language_config": config_to_hf(cfg.language, torch_dtype=torch_dtype),
        "vision_config": {
            "model_type": "vision",
            "width": v.hidden_size,
            "layers": v.num_hidden_layers,
            "heads": v.num_attention_heads,
            "mlp_ratio": v.intermediate_size / v.hidden_size,
            "intermediate_size": v.intermediate_size,  # exact, where mlp_ratio is a rounded float in VL2's files
            "image_size": v.image_size,
            "patch_size": v.patch_size,
            "hidden_act": v.hidden_act.value,
            "layer_norm_eps": v.layer_norm_eps,
        },
        "projector_config": {
            "model_type": "mlp_projector",
            "projector_type": p.projector_type.value,
            "input_dim": p.input_dim,
            "n_embed": p.n_embed,
            "depth": p.depth,
            "mlp_ratio": p.mlp_ratio,
            "downsample_ratio": p.downsample_ratio,
        },
        "tile_tag": "2D",
        "global_view_pos": t.global_view_pos,
        "candidate_resolutions": [list(c) for c in t.candidate_resolutions],
        "image_mean": list(t.image_mean),
        "image_std": list(t.image_std),
        "image_token_id": cfg.image_token_id,
        "torch_dtype": torch_dtype,
    }


def load_vl_config(path, **kwargs) -> VLConfig:
    """Read a VL2 ``config.json`` from a checkpoint directory (see :func:`vl_config_from_json`)."""
    return vl_config_from_json(read_config_json(path), **kwargs)


# ---- tensors --------------------------------------------------------------------------------------------------


def _language_names(model: VisionLanguageModel):
    """``(leaf path, spec)`` of every language-model leaf; fp8 weights are rejected (float checkpoints only)."""
    cfg = model.config.language
    out = []
    for path, var in nnx.to_flat_state(nnx.state(model.language)):
        if path[-1].endswith(SCALE_SUFFIX):
            raise NotImplementedError("fp8 language weights in a VL checkpoint: load or save float weights")
        out.append((path, var, leaf_spec(path, tuple(var.get_value().shape), cfg)))
    return out


def load_vl(path, *, dtype=jnp.float32, param_dtype=None, check_finite: bool = True, **config_kwargs):
    """Load a DeepSeek-VL2-layout checkpoint directory into a :class:`~dsjax.vision.model.VisionLanguageModel`.

    Args:
      path: directory with config.json and ``model.safetensors`` (or shards + index).
      dtype: compute dtype; also the storage dtype unless ``param_dtype`` is given.
      check_finite: reject tensors holding NaN/Inf.
      config_kwargs: ``image_token_id`` and language ``ModelConfig`` overrides (see :func:`vl_config_from_json`).

    Raises:
      CheckpointError: missing, unexpected or wrongly shaped tensors, NaN/Inf values.
      ConfigError: an unsupported config.
    """
    reader = CheckpointReader(path)
    cfg = load_vl_config(path, **config_kwargs)
    if cfg.language.fp8_weights:
        raise ConfigError("fp8 (quantization_config) VL checkpoints are not supported; dequantize them first")
    keys = reader.keys()
    stray = {k for k in keys if not k.startswith(_PREFIXES) and k not in SPECIAL_EMBEDDINGS}
    if stray:
        raise CheckpointError(f"checkpoint at {path}: unexpected tensors {listing(stray)}")

    def read(name: str) -> np.ndarray:
        value = reader.get(name)
        if check_finite:
            raise_if_nonfinite(value, name, reader.file_of(name))
        return value

    store = param_dtype or dtype
    model = nnx.eval_shape(lambda: VisionLanguageModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=store))
    specs = _language_names(model)
    expected = {LANGUAGE_PREFIX + s.name(idx): s for _, _, s in specs for idx in s.indices()}
    language_keys = {k for k in keys if k.startswith(LANGUAGE_PREFIX)}
    missing = (set(expected) | set(SPECIAL_EMBEDDINGS)) - keys
    unexpected = language_keys - set(expected)
    if missing or unexpected:
        parts = [f"missing tensors: {listing(missing)}" if missing else "",
                 f"unexpected tensors: {listing(unexpected)}" if unexpected else ""]  # fmt: skip
        raise CheckpointError(f"checkpoint at {path} does not match its config: " + "; ".join(p for p in parts if p))
    wrong = [f"{n} {reader.shape(n)} (expected {s.hf_shape()})" for n, s in expected.items()
             if reader.shape(n) != s.hf_shape()]  # fmt: skip
    d = cfg.language.hidden_size
    wrong += [f"{n} {reader.shape(n)} (expected {(d,)})" for n in SPECIAL_EMBEDDINGS if reader.shape(n) != (d,)]
    if wrong:
        raise CheckpointError(f"tensors with wrong shapes in {path}: {listing(wrong)}")

    _, state = nnx.split(model.language)
    for (_, var), (_, _, spec) in zip(nnx.to_flat_state(state), specs):
        slices = [spec.to_ours(read(LANGUAGE_PREFIX + spec.name(idx))) for idx in spec.indices()]
        value = np.stack(slices).reshape(spec.shape) if spec.stack_dims else slices[0]
        var.set_value(jnp.asarray(value, var.get_value().dtype))
    nnx.update(model.language, state)
    tensors = {k: read(k) for k in keys if k.startswith(("vision.", "projector."))}
    load_tower(model.vision, tensors, layout="vl2")
    load_projector(model.projector, tensors, layout="vl2")
    for name in SPECIAL_EMBEDDINGS:
        var = getattr(model, name)
        var.set_value(jnp.asarray(read(name), var.get_value().dtype))
    return model


def _tower_tensors(model: VisionLanguageModel):
    """The tower's weights under VL2's timm names (the inverse of ``load_tower(layout="vl2")``)."""
    top, per_layer, layer_prefix, prefix, _ = TOWER_LAYOUTS["vl2"]
    fused: dict[str, list] = {}
    for path, var in nnx.to_flat_state(nnx.state(model.vision)):
        value = np.asarray(var.get_value())
        if path[0] == "layers":
            name, kind, part = per_layer[tuple(path[1:])]
            names = [prefix + (layer_prefix + name).format(i=i) for i in range(value.shape[0])]
            values = list(value)
        else:
            (name, kind, part), names, values = top[tuple(path)], [prefix + top[tuple(path)][0]], [value]
        for n, v in zip(names, values):
            if kind == "linear":  # ours [in..., out...] -> torch [out, in]; only wo has two input axes (h, k)
                in_ndim = 2 if path[-1] == "wo" else 1
                v = v.reshape(int(np.prod(v.shape[:in_ndim])), -1).T
            elif kind == "conv":
                v = v.transpose(3, 2, 0, 1)
            else:
                v = v[None] if path == ("pos_embed",) else v.reshape(-1)  # timm's pos_embed is [1, n, d]
            if part is None:
                yield n, v
            else:
                fused.setdefault(n, [None] * 3)[part] = v
    for n, parts in fused.items():
        yield n, np.concatenate(parts)


def save_vl(model: VisionLanguageModel, path, *, dtype=None, max_shard_bytes: int = 4 * 2**30) -> list[str]:
    """Write ``model`` as a DeepSeek-VL2-layout checkpoint (config.json + safetensors shards); ``dtype`` casts the
    float weights (router and routing bias stay fp32). Returns the shard file names."""
    cfg = model.config
    config = vl_config_to_json(cfg)
    specs = _language_names(model)
    keep = ("router", "routing_bias")

    def cast(value, name_in_model: str = ""):
        value = np.ascontiguousarray(value)
        return value if dtype is None or name_in_model in keep else value.astype(np.dtype(dtype))

    def items():
        for n, v in _tower_tensors(model):
            yield n, cast(v)
        for i, layer in enumerate(model.projector.layers):
            yield f"projector.layers.{2 * i}.weight", cast(np.asarray(layer.w.get_value()).T)
            yield f"projector.layers.{2 * i}.bias", cast(layer.b.get_value())
        for name in SPECIAL_EMBEDDINGS:
            yield name, cast(getattr(model, name).get_value())
        for p, var, spec in specs:
            leaf = np.asarray(var.get_value())
            for idx in spec.indices():
                yield LANGUAGE_PREFIX + spec.name(idx), cast(spec.to_hf(leaf[idx] if idx else leaf), p[-1])

    main = np.dtype(dtype) if dtype is not None else np.dtype(model.language.embed.get_value().dtype)
    config["torch_dtype"] = config["language_config"]["torch_dtype"] = {"float32": "float32", "float16": "float16"}.get(
        main.name, "bfloat16"
    )
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return write_sharded(os.fspath(path), items(), max_shard_bytes=max_shard_bytes)
