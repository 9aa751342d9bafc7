"""Safetensors files as NumPy arrays with ml_dtypes (bf16, fp8), read lazily through memory maps.

The ``safetensors`` package's NumPy binding cannot represent bf16 or fp8 and its Flax binding cannot represent
fp8 (and places arrays on a device), so dsjax reads the documented format directly: an 8-byte little-endian
header length, a JSON header mapping names to ``{dtype, shape, data_offsets}``, then the raw bytes. Tests check
interoperability with files written and read by ``safetensors`` and HF transformers. Nothing is unpickled.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, or does not match the model."""


# Bit views in which a float is NaN or Inf exactly when all bits of the mask are set: its exponent field for the
# IEEE-like formats, and for E4M3 (``float8_e4m3fn``, no infinities) exponent and mantissa: S.1111.111 is NaN.
_NONFINITE_BITS = {
    np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80),
    np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, 0x7F),
    np.dtype(ml_dtypes.float8_e5m2): (np.uint8, 0x7C),
}


def count_nonfinite(array: np.ndarray) -> int:
    """How many NaN/Inf values ``array`` holds (0 for integer and bool arrays): one pass, no float conversion."""
    bits = _NONFINITE_BITS.get(array.dtype)
    if bits is not None:
        view, mask = bits
        return int(np.count_nonzero((array.view(view) & mask) == mask))
    if np.issubdtype(array.dtype, np.floating):
        return int(array.size - np.count_nonzero(np.isfinite(array)))
    return 0


def raise_if_nonfinite(array: np.ndarray, name: str, where: str) -> None:
    """Raise :class:`CheckpointError` naming tensor ``name`` (stored in ``where``) if ``array`` has a NaN/Inf."""
    bad = count_nonfinite(array)
    if bad:
        raise CheckpointError(
            f"tensor {name} in {where} holds {bad} NaN/Inf value(s) (of {array.size} read): a diverged or corrupt "
            "checkpoint. Pass check_finite=False to load it anyway (e.g. to inspect it)."
        )


def listing(names, limit: int = 20) -> str:
    """A sorted, comma-separated list of names for error messages, cut after ``limit``."""
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class SafetensorsFile:
    """One ``.safetensors`` file; ``get(name)`` returns a read-only memory-mapped array (no copy)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            size = os.path.getsize(self.path)
            with open(self.path, "rb") as f:
                raw_len = f.read(8)
                if len(raw_len) < 8:
                    raise CheckpointError(f"{self.path}: truncated (no header)")
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > min(_MAX_HEADER, size - 8):
                    raise CheckpointError(f"{self.path}: corrupt header length {header_len}")
                header = json.loads(f.read(header_len))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path}: not a readable safetensors file ({e})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(s) for s in info["shape"])
                start, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path}: bad header entry for {name!r}: {info}") from None
            if end - start != int(np.prod(shape, dtype=np.int64)) * dtype.itemsize or start < 0:
                raise CheckpointError(f"{self.path}: {name!r} has {end - start} bytes for shape {shape} {dtype}")
            if self._data_start + end > size:
                raise CheckpointError(f"{self.path}: {name!r} runs past the end of the file (truncated?)")
            self._entries[name] = (dtype, shape, start, end)
        self._mmap: np.memmap | None = None

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        dtype, shape, start, end = self._entries[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[self._data_start + start : self._data_start + end]
        return raw.view(dtype).reshape(shape)


class CheckpointReader:
    """All tensors of an HF checkpoint directory: ``model.safetensors``, or shards listed by
    ``model.safetensors.index.json``, or (without an index) every ``*.safetensors`` file in the directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        if not os.path.isdir(self.directory):
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        index = os.path.join(self.directory, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    weight_map: dict[str, str] = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: invalid index ({e})") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(n for n in os.listdir(self.directory) if n.endswith(".safetensors"))
            weight_map = None
        if not files:
            pickles = [n for n in os.listdir(self.directory) if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
            hint = f" (found {pickles}: pickle checkpoints are not loaded; convert them to safetensors)"
            raise CheckpointError(f"no .safetensors files in {self.directory}{hint if pickles else ''}")
        self._files: dict[str, SafetensorsFile] = {}
        self._where: dict[str, SafetensorsFile] = {}
        for name in files:
            path = os.path.join(self.directory, name)
            if not os.path.exists(path):
                raise CheckpointError(f"{index} lists {name}, which does not exist")
            self._files[name] = sf = SafetensorsFile(path)
            for key in sf.keys():
                if weight_map is not None and weight_map.get(key) != name:
                    continue  # the index is authoritative about which shard holds a tensor
                self._where[key] = sf
        if weight_map is not None:
            absent = sorted(k for k in weight_map if k not in self._where)
            if absent:
                raise CheckpointError(f"index lists tensors missing from their shard files: {absent[:10]}")

    def keys(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def dtype(self, name: str) -> np.dtype:
        return self._where[name].dtype(name)

    def get(self, name: str) -> np.ndarray:
        try:
            return self._where[name].get(name)
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint at {self.directory}") from None

    def file_of(self, name: str) -> str:
        """Path of the file that holds tensor ``name``."""
        return self._where[name].path


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata=None) -> None:
    """Write ``tensors`` to ``path`` atomically (a temporary file renamed into place)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise TypeError(f"{name}: dtype {arr.dtype} has no safetensors equivalent")
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def write_sharded(
    directory: str, items: Iterable[tuple[str, np.ndarray]], *, max_shard_bytes: int, metadata=None
) -> list[str]:
    """Write ``(name, array)`` pairs (produced lazily, one at a time) into shards of at most
    ``max_shard_bytes`` (a single larger tensor gets its own shard), named as HF names them, plus
    ``model.safetensors.index.json`` when there is more than one shard. Returns the file names."""
    os.makedirs(directory, exist_ok=True)
    shards: list[dict[str, np.ndarray]] = [{}]
    temp_names: list[str] = []
    weight_map: dict[str, int] = {}
    size = total = 0

    def flush():
        name = f".dsjax-shard-{len(temp_names):05d}.safetensors"
        write_safetensors(os.path.join(directory, name), shards[-1], metadata)
        temp_names.append(name)
        shards[-1] = {}

    for key, arr in items:
        if shards[-1] and size + arr.nbytes > max_shard_bytes:
            flush()
            size = 0
        shards[-1][key] = arr
        weight_map[key] = len(temp_names)
        size += arr.nbytes
        total += arr.nbytes
    if shards[-1] or not temp_names:
        flush()
    n = len(temp_names)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, name in zip(temp_names, final):
        os.replace(os.path.join(directory, tmp), os.path.join(directory, name))
    # Shards of an earlier save into the same directory would otherwise be read as part of this checkpoint.
    for stale in os.listdir(directory):
        if stale.startswith("model") and stale.endswith(".safetensors") and stale not in final:
            os.remove(os.path.join(directory, stale))
    index_path = os.path.join(directory, "model.safetensors.index.json")
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: final[i] for k, i in sorted(weight_map.items())}}
        with open(index_path, "w") as f:
            json.dump(index, f, indent=2)
    elif os.path.exists(index_path):
        os.remove(index_path)
    return final
