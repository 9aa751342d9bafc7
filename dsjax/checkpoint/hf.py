"""Load and save DeepSeek-V2/V3 checkpoints in Hugging Face format (config.json + safetensors shards)."""

from __future__ import annotations

import itertools
import logging
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from dsjax.checkpoint.hf_map import SCALE_SUFFIX, LeafSpec, leaf_spec, mtp_copy_names, scale_name
from dsjax.checkpoint.safetensors_io import (
    CheckpointError,
    CheckpointReader,
    listing,
    raise_if_nonfinite,
    write_sharded,
)
from dsjax.config import ModelConfig
from dsjax.hf_config import load_config, save_config
from dsjax.layers.common import STORAGE_RECIPE
from dsjax.model import Transformer, abstract_model
from dsjax.ops.fp8 import quantize_blocks
from dsjax.sharding import DEFAULT_RULES, Rules, variable_sharding

log = logging.getLogger(__name__)
FP8_DTYPE = np.dtype(ml_dtypes.float8_e4m3fn)


def _mtp_keys(keys: set[str], cfg: ModelConfig) -> set[str]:
    """Checkpoint keys that belong to layers past the main stack (the MTP modules)."""
    pattern = re.compile(r"model\.layers\.(\d+)\.")
    return {k for k in keys if (m := pattern.match(k)) and int(m.group(1)) >= cfg.num_hidden_layers}


def from_pretrained(
    path: str,
    *,
    dtype=jnp.bfloat16,
    param_dtype=None,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    mtp: bool | None = None,
    dequantize: bool = False,
    check_finite: bool = True,
    **config_overrides,
) -> Transformer:
    """Load an HF-format DeepSeek-V2/V3 checkpoint directory into a :class:`~dsjax.Transformer`.

    Tensors stream one at a time from memory-mapped safetensors straight into their sharded layout on
    ``mesh`` (each device reads only its own slice), so a checkpoint larger than one host's memory loads.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or shards + ``model.safetensors.index.json``.
      dtype: compute dtype; also the storage dtype unless ``param_dtype`` is given (router weights and the
        routing bias stay fp32).
      mesh: shard the weights over this mesh by ``rules``; None places everything on the first device.
      mtp: load the Multi-Token Prediction layers: None loads them when the checkpoint has them, True requires
        them, False skips them.
      dequantize: for an FP8 checkpoint (``quantization_config``, E4M3 weights with ``weight_scale_inv`` block
        scales), load float weights (``fp8 x scale`` in ``param_dtype``) instead of keeping the projections in
        E4M3 with their scales (about half the bytes of bf16). Either way, weights the checkpoint stores in
        float are quantised on load if the model keeps them in fp8, and fp8 ones dequantised if it does not.
      check_finite: reject a tensor holding NaN or Inf (float, bf16, E4M3 weights and their scales), checked on
        the bytes as they are read; False loads such a checkpoint anyway, e.g. to inspect it.
      config_overrides: ModelConfig fields to change (e.g. ``numerics="official"``).

    Raises:
      CheckpointError: missing, unexpected or wrongly shaped tensors (all listed), corrupt files, a NaN/Inf value
        (naming the tensor and its file).
      ConfigError: an invalid or unsupported config.json.
    """
    reader = CheckpointReader(path)  # first, so a wrong path reports as such rather than as a missing config
    cfg = load_config(path, **config_overrides)
    if dequantize:
        cfg = cfg.replace(fp8_weights=False)
    keys = reader.keys()
    mtp_keys = _mtp_keys(keys, cfg)
    if mtp and not mtp_keys:
        raise CheckpointError(f"mtp=True but the checkpoint at {path} has no layers past {cfg.num_hidden_layers}")
    use_mtp = bool(mtp_keys) if mtp is None else mtp
    if cfg.num_nextn_predict_layers and not use_mtp:
        if mtp is None:
            log.warning(
                "config declares %d MTP layer(s) but the checkpoint has no MTP weights; loading without",
                cfg.num_nextn_predict_layers,
            )
        cfg = cfg.replace(num_nextn_predict_layers=0)
    ignored = set() if use_mtp else mtp_keys

    graphdef, abstract = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype or dtype))
    flat = nnx.to_flat_state(abstract)
    specs = [leaf_spec(path_, var.get_value().shape, cfg) for path_, var in flat]
    expected = {spec.name(idx): spec for spec in specs for idx in spec.indices()}
    copies = mtp_copy_names(cfg)
    # Scales may be absent (float tensors, quantised on load) or extra (fp8 tensors, dequantised on load).
    scales = {n for n, s in expected.items() if s.kind == "scale"}
    optional_scales = {scale_name(n) for n, s in expected.items() if s.kind == "linear"}
    missing = set(expected) - keys - scales
    unexpected = keys - set(expected) - set(copies) - ignored - optional_scales
    if missing or unexpected:
        parts = [
            f"missing tensors: {listing(missing)}" if missing else "",
            f"unexpected tensors: {listing(unexpected)}" if unexpected else "",
        ]
        raise CheckpointError(f"checkpoint at {path} does not match its config: " + "; ".join(p for p in parts if p))
    wrong = [
        f"{n} {reader.shape(n)} (expected {s.hf_shape()})"
        for n, s in expected.items()
        if n in keys and reader.shape(n) != s.hf_shape()
    ]
    if wrong:
        raise CheckpointError(f"tensors with wrong shapes in {path}: {listing(wrong)}")

    by_path = {spec.path: spec for spec in specs}
    for name, leaf in copies.items():
        if name in keys:
            _check_copy(reader, name, by_path[leaf])

    source = _Source(reader, check_finite=check_finite)
    for (_, var), spec in zip(flat, specs):
        sharding = variable_sharding(var, mesh, rules) if mesh is not None else SingleDeviceSharding(jax.devices()[0])
        var.set_value(_assemble(source, spec, np.dtype(var.get_value().dtype), sharding))
    model = nnx.merge(graphdef, abstract)
    log.info("loaded %s: %.1f MiB of weights", path, weight_bytes(model) / 2**20)
    return model


def weight_bytes(model) -> int:
    """Bytes held by the model's weights and state (fp8 projections count 1 byte per value plus scales)."""
    return sum(v.get_value().nbytes for _, v in nnx.to_flat_state(nnx.state(model)))


class _Source:
    """The checkpoint's tensors as the model's leaves store them: fp8 weights and their scales as is, fp8
    weights dequantised for float leaves, float weights quantised (weight or scale) for fp8 leaves."""

    def __init__(self, reader: CheckpointReader, *, check_finite: bool = True):
        self.reader = reader
        self.keys = reader.keys()
        self.check_finite = check_finite
        self._quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # weight and scale leaves each take one

    def _quantize(self, weight_name: str, part: int) -> np.ndarray:
        pair = self._quantized.pop(weight_name, None)
        if pair is None:
            weight = self.reader.get(weight_name)
            if self.check_finite:  # quantisation would turn a NaN into a NaN scale under another name
                self.checked(weight, weight_name)
            pair = _quantize_hf(weight)
            self._quantized[weight_name] = pair
        return pair[part]

    def checked(self, values: np.ndarray, name: str) -> np.ndarray:
        """``values`` (read for tensor ``name``), after checking them for NaN/Inf unless that is off."""
        if self.check_finite:
            what = f"{name} (or {scale_name(name)})" if scale_name(name) in self.keys else name
            raise_if_nonfinite(values, what, self.reader.file_of(name) if name in self.keys else self.reader.directory)
        return values

    def get(self, name: str, spec: LeafSpec, dtype: np.dtype) -> np.ndarray:
        if spec.kind == "scale":
            if name in self.keys:
                return self.reader.get(name)
            weight = name[: -len("_scale_inv")]
            if self.reader.dtype(weight) == FP8_DTYPE:  # its scales cannot be recovered from the E4M3 values
                raise CheckpointError(f"{weight} is stored in fp8 but {name} is missing")
            return self._quantize(weight, 1)
        is_fp8 = self.reader.dtype(name) == FP8_DTYPE
        if spec.kind == "linear" and is_fp8 and dtype != FP8_DTYPE:
            if scale_name(name) not in self.keys:
                raise CheckpointError(f"{name} is stored in fp8 but {scale_name(name)} is missing")
            return dequantize_hf(self.reader.get(name), self.reader.get(scale_name(name)))
        if spec.kind == "linear" and dtype == FP8_DTYPE and not is_fp8:
            return self._quantize(name, 0)
        return self.reader.get(name)


def dequantize_hf(q: np.ndarray, scale_inv: np.ndarray, block: int = STORAGE_RECIPE.block) -> np.ndarray:
    """DeepSeek's weight dequantisation: ``[out, in]`` E4M3 times its ``[ceil(out/128), ceil(in/128)]`` scales
    (fp32 result; the ragged edge blocks use their block's scale)."""
    rows, cols = q.shape
    if scale_inv.shape != (-(-rows // block), -(-cols // block)):
        raise CheckpointError(f"fp8 weight {q.shape} has scales {scale_inv.shape}; expected 128x128 blocks")
    full = np.repeat(np.repeat(scale_inv.astype(np.float32), block, axis=0), block, axis=1)[:rows, :cols]
    return q.astype(np.float32) * full


def _quantize_hf(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An HF ``[out, in]`` float weight -> (E4M3 weight, ``weight_scale_inv``) in DeepSeek's 128x128 blocks."""
    with jax.default_device(jax.local_devices(backend="cpu")[0]):
        q, s = quantize_blocks(jnp.asarray(w, jnp.float32).T, STORAGE_RECIPE)  # dsjax blocks are [in, out]
    return np.asarray(q).T, np.asarray(s).T


def _check_copy(reader: CheckpointReader, name: str, spec: LeafSpec) -> None:
    # The MTP layers' embedding / head copies must equal the shared ones that dsjax uses for them.
    main = reader.get(spec.name(()))
    # equal_nan: a NaN in the shared tensor is reported as such when it is loaded, not as a differing copy.
    if reader.shape(name) != main.shape or not np.array_equal(reader.get(name), main, equal_nan=True):
        raise CheckpointError(
            f"{name} differs from {spec.name(())}; dsjax shares the main embedding and head "
            "with the MTP modules (as DeepSeek-V3 does)"
        )


def _assemble(source: _Source, spec: LeafSpec, dtype: np.dtype, sharding) -> jax.Array:
    """Build one (possibly sharded) leaf, reading only the HF tensors each device's slice needs."""
    done: dict[tuple, np.ndarray] = {}  # replicated slices are requested once per device; read them once

    def read(index: tuple[slice, ...]) -> np.ndarray:
        bounds = tuple(s.indices(n) for s, n in zip(index, spec.shape))
        if bounds in done:
            return done[bounds]
        stack_ranges = [range(*b) for b in bounds[: spec.stack_dims]]
        inner = tuple(slice(*b) for b in bounds[spec.stack_dims :])
        out = np.empty([len(r) for r in stack_ranges] + [len(range(*b)) for b in bounds[spec.stack_dims :]], dtype)
        for pos, idx in zip(
            itertools.product(*(range(len(r)) for r in stack_ranges)), itertools.product(*stack_ranges)
        ):
            name = spec.name(idx)
            # Checked on the slice this device reads: every byte once, right after it was read from the file.
            out[pos] = source.checked(spec.to_ours(source.get(name, spec, dtype))[inner], name).astype(dtype)
        done[bounds] = out
        return out

    return jax.make_array_from_callback(spec.shape, sharding, read)


def _layer_order(name: str):
    m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
    return (int(m.group(1)), m.group(2)) if m else (-1, name)


@jax.jit
def _slice_at(arr: jax.Array, index: tuple) -> jax.Array:
    return arr[index]


def _host_slice(arr: jax.Array, index: tuple) -> np.ndarray:
    """``arr[index]`` on the host. The indices are traced: one compiled slice per stacked array, not one per
    layer and expert (eager indexing compiles each constant index anew, per device layout)."""
    return np.asarray(_slice_at(arr, tuple(np.int32(i) for i in index)) if index else arr)


def save_pretrained(
    model: Transformer, path: str, *, dtype=None, fp8: bool | None = None, max_shard_bytes: int = 4 * 2**30
) -> list[str]:
    """Write ``model`` as an HF-format checkpoint (config.json + safetensors shards + index).

    Tensors are fetched to the host one at a time and written into shards of at most ``max_shard_bytes``,
    ordered by layer. ``dtype`` casts the float weights (default: as stored); the router and routing bias stay
    fp32. ``fp8``: write DeepSeek's FP8 format (projections as E4M3 ``weight`` + fp32 ``weight_scale_inv``
    128x128 block scales, ``quantization_config`` in config.json), quantising float weights; False writes float
    weights (dequantising fp8 ones); None (default) keeps what the model stores.
    MTP layers get copies of the shared embedding and head under the released checkpoints' names.
    Returns the written shard file names.
    """
    cfg = model.config
    write_fp8 = cfg.fp8_weights if fp8 is None else fp8
    flat = nnx.to_flat_state(nnx.state(model))
    leaves = {path_: var.get_value() for path_, var in flat}
    for arr in leaves.values():
        if not arr.is_fully_addressable:
            raise NotImplementedError("saving a multi-host model to HF format: convert from an orbax checkpoint")
    specs = {path_: leaf_spec(path_, arr.shape, cfg) for path_, arr in leaves.items()}
    fp8_paths = {p for p, _ in nnx.to_flat_state(nnx.state(abstract_model(cfg.replace(fp8_weights=True))))}
    projections = {p for p in fp8_paths if (*p[:-1], p[-1] + SCALE_SUFFIX) in fp8_paths}

    def save_dtype(p, arr) -> np.dtype:
        keep = dtype is None or p[-1] in ("router", "routing_bias") or p[-1].endswith(SCALE_SUFFIX)
        keep = keep or arr.dtype == FP8_DTYPE
        return np.dtype(arr.dtype if keep else dtype)

    target = {p: save_dtype(p, arr) for p, arr in leaves.items()}
    main_dtype = np.dtype(dtype) if dtype is not None else np.dtype(leaves[("embed",)].dtype)
    plan = [
        (spec.name(idx), p, idx)
        for p, spec in specs.items()
        if not (spec.kind == "scale" and not write_fp8)
        for idx in spec.indices()
    ]
    plan += [(name, leaf, None) for name, leaf in mtp_copy_names(cfg).items()]
    plan.sort(key=lambda item: _layer_order(item[0]))

    def items():
        for name, p, idx in plan:
            spec = specs[p]
            hf = np.ascontiguousarray(spec.to_hf(_host_slice(leaves[p], idx)))
            if p in projections and hf.dtype == FP8_DTYPE and not write_fp8:
                scale_path = (*p[:-1], p[-1] + SCALE_SUFFIX)
                scale = specs[scale_path].to_hf(_host_slice(leaves[scale_path], idx))
                yield name, dequantize_hf(hf, scale).astype(main_dtype)
            elif p in projections and hf.dtype != FP8_DTYPE and write_fp8:
                q, scale = _quantize_hf(hf)
                yield name, q
                yield scale_name(name), scale
            else:
                yield name, hf.astype(target[p])

    save_config(
        cfg.replace(fp8_weights=write_fp8),
        path,
        torch_dtype={"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(
            main_dtype.name, "bfloat16"
        ),
    )
    return write_sharded(path, items(), max_shard_bytes=max_shard_bytes)
