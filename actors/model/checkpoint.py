"""Read and write shardgen checkpoints: Hugging Face style directories of safetensors files
in torchao's flattened layout (``torchao.prototype.safetensors``).

An int4 weight ``<module>.weight`` is stored as ``<module>._weight_qdata``,
``<module>._weight_scale`` and ``<module>._weight_zero_point`` plus a JSON entry
in the file's ``__metadata__`` under its logical name; other tensors are stored
as they are with metadata ``{"_type": "Tensor"}``. ``tensor_names`` lists the
logical names in each file, as torchao's ``flatten_tensor_state_dict`` writes.

Reading is by slice: a tensor-parallel rank asks for ``read(name, dim, start,
length)`` and only those bytes are copied out of the file. Reads are positioned
file reads at offsets taken from each file's header, parsed once: no mapping
stays open, so a rank's memory holds its slice and not the pages it read
through (safetensors' own mmap handle kept them counted until closed, and
opening one per read parsed the whole header each time: minutes for a
checkpoint of 18,600 tensors).

Only safetensors are read unless the caller allows pickle files (``.bin``,
``.pt``): unpickling can run code, so those are opened with
``torch.load(weights_only=True, mmap=True)`` and only when asked for.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from shardgen.actors import int4
from shardgen.actors.model.config import check_model_dir

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
# A slice that keeps only part of each row (a row-parallel split) is read this many bytes of whole rows at a time,
# so the transient beyond the slice itself stays bounded whatever the tensor's size.
CHUNK_BYTES = 16 * 2**20
_UNSAFE_SUFFIXES = (*_PICKLE_SUFFIXES, ".ckpt", ".pkl")


def int4_key(name: str, data_name: str) -> str:
    """Flattened key of one inner tensor of the int4 weight ``name`` (torchao's convention)."""
    module, param = name.rsplit(".", 1)
    return f"{module}._{param}_{data_name}"


def int4_metadata(shape: tuple[int, int], group_size: int) -> str:
    """The per-tensor metadata torchao's ``TensorSubclassAttributeJSONEncoder`` writes for an Int4Tensor."""
    return json.dumps(
        {"_type": "Int4Tensor", "_data": {"block_size": [1, group_size], "shape": list(shape)},
         "_tensor_data_names": list(int4.INT4_DATA_NAMES)}
    )


@dataclass(frozen=True)
class TensorEntry:
    """One logical tensor of a checkpoint: where it is and what it is."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype  # for int4: the dtype of scale / zero_point
    group_size: int | None  # None: a plain (dense) tensor

    @property
    def is_int4(self) -> bool:
        return self.group_size is not None


class Checkpoint:
    """A checkpoint directory opened for slice reads. Use as a context manager, or call ``close``.

    ``allow_pickle`` also reads ``.bin``/``.pt`` weights (with ``weights_only=True``) when the
    directory has no safetensors; without it such a directory is refused.
    """

    def __init__(self, model_dir: str | Path, allow_pickle: bool = False) -> None:
        self.dir = Path(model_dir)
        self.files = _find_weight_files(self.dir, allow_pickle)
        self.entries: dict[str, TensorEntry] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self._spans: dict[Path, dict[str, _Span]] = {}  # where each stored key's bytes are, per safetensors file
        for file in self.files:
            if file.suffix == ".safetensors":
                self._index_safetensors(file)
            else:
                self._index_pickle(file)

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Drops the mappings of pickle files (safetensors files are not held open between reads)."""
        self._pickled.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def names(self) -> list[str]:
        return list(self.entries)

    def entry(self, name: str) -> TensorEntry:
        if name not in self.entries:
            raise ValueError(f"tensor {name!r} is missing from the checkpoint in {self.dir}; re-export or re-quantize it")
        return self.entries[name]

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        """Read ``name`` whole, or only [start, start+length) along ``dim``; int4 weights come back as Int4Tensor."""
        e = self.entry(name)
        if dim is None:
            dim, start, length = 0, 0, e.shape[0]
        assert length is not None and 0 <= start and start + length <= e.shape[dim], (name, dim, start, length, e.shape)
        if e.file.suffix != ".safetensors":
            return self._read_pickled(e, dim, start, length)
        spans = self._spans[e.file]
        if e.is_int4:
            return int4.read_shard(lambda data_name, index: spans[int4_key(name, data_name)].read(e.file, index),
                                   e.shape, e.group_size, dim, start, length)
        index = tuple(slice(start, start + length) if d == dim else slice(None) for d in range(len(e.shape)))
        return spans[name].read(e.file, index)

    def _read_pickled(self, e: TensorEntry, dim: int, start: int, length: int) -> torch.Tensor:
        tensors = self._pickled[e.file]
        if e.is_int4:
            value = tensors.get(e.name)
            parts = ({d: getattr(value, d) for d in int4.INT4_DATA_NAMES} if value is not None and int4.is_int4(value)
                     else {d: tensors[int4_key(e.name, d)] for d in int4.INT4_DATA_NAMES})
            return int4.read_shard(lambda d, index: parts[d][index], e.shape, e.group_size, dim, start, length)
        index = tuple(slice(start, start + length) if d == dim else slice(None) for d in range(len(e.shape)))
        return tensors[e.name][index]

    def _index_safetensors(self, file: Path) -> None:
        try:
            f = safe_open(str(file), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ValueError(f"{file} is not a readable safetensors file ({e}); the file is truncated or corrupt, re-copy it") from e
        keys = set(f.keys())
        self._spans[file] = _spans(file)
        assert set(self._spans[file]) == keys, file
        shapes = {k: span.shape for k, span in self._spans[file].items()}
        dtypes = {k: span.dtype for k, span in self._spans[file].items()}
        self._index_keys(file, f.metadata() or {}, shapes, dtypes)

    def _index_pickle(self, file: Path) -> None:
        try:
            # weights_only: tensors (and torchao's registered tensor subclasses) only, never arbitrary objects.
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:
            # torch's own text advises weights_only=False, which is exactly what must not be done here.
            detail = next((ln.split("error:", 1)[1].strip() for ln in str(e).splitlines() if "WeightsUnpickler error:" in ln),
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            raise ValueError(f"{file} cannot be read with torch.load(weights_only=True) ({detail}); it holds more than "
                             f"tensors, and unpickling it could run code. Convert the checkpoint to safetensors "
                             f"where you trust it") from e
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{file} is not a flat state dict of tensors; convert the checkpoint to safetensors")
        self._pickled[file] = state
        plain = {}
        for key, value in state.items():
            if int4.is_int4(value):
                self.entries[key] = TensorEntry(key, file, tuple(value.shape), value.scale.dtype, int4.group_size_of(value))
            else:
                plain[key] = value
        self._index_keys(file, {}, {k: tuple(v.shape) for k, v in plain.items()}, {k: v.dtype for k, v in plain.items()})

    def _index_keys(self, file: Path, meta: dict[str, str], shapes: dict[str, tuple[int, ...]],
                    dtypes: dict[str, torch.dtype]) -> None:
        """Entries of one file from its keys: torchao's flattened int4 parts become one int4 entry each."""
        keys = set(shapes)
        claimed: set[str] = set()
        for name, info in _int4_names(meta, keys):
            parts = {d: int4_key(name, d) for d in int4.INT4_DATA_NAMES}
            missing = [k for k in parts.values() if k not in keys]
            if missing:
                raise ValueError(f"{file}: int4 weight {name} lacks {missing}; the checkpoint is incomplete")
            n, half_k = shapes[parts["qdata"]]
            groups = shapes[parts["scale"]][0]
            shape = tuple(info.get("shape") or (n, 2 * half_k))
            group = int((info.get("block_size") or [1, shape[1] // groups])[-1])
            if shape != (n, 2 * half_k) or shapes[parts["scale"]] != (shape[1] // group, n) or shapes[parts["zero_point"]] != shapes[parts["scale"]]:
                raise ValueError(
                    f"{file}: int4 weight {name} has inconsistent parts (qdata {shapes[parts['qdata']]}, "
                    f"scale {shapes[parts['scale']]}, zero_point {shapes[parts['zero_point']]}) for shape {shape} "
                    f"and group size {group}; the checkpoint is corrupt"
                )
            self.entries[name] = TensorEntry(name, file, shape, dtypes[parts["scale"]], group)
            claimed.update(parts.values())
        for key in sorted(keys - claimed):
            self.entries[key] = TensorEntry(key, file, shapes[key], dtypes[key], None)


@dataclass(frozen=True)
class _Span:
    """Where one stored tensor's bytes lie in its safetensors file (row-major, little-endian)."""

    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    def read(self, file: Path, index: tuple[slice, ...]) -> torch.Tensor:
        """The sub-tensor ``index`` (unit-step slices, one per leading dim) as a fresh tensor, read with positioned
        reads: whole rows in one read, a part of each row through chunks of CHUNK_BYTES."""
        shape = self.shape or (1,)
        rows = range(*(index[0] if index else slice(None)).indices(shape[0]))
        assert rows.step == 1, index
        rest = tuple(index[1:])
        row_bytes = math.prod(shape[1:]) * self.dtype.itemsize
        narrowed = any(s.indices(n) != (0, n, 1) for s, n in zip(rest, shape[1:]))
        with open(file, "rb", buffering=0) as f:
            if not narrowed:  # the bytes of whole rows are the result: one read, no copy
                t = self._rows(f, rows.start, len(rows), shape, row_bytes)
                return t if self.shape else t.reshape(())
            out = torch.empty((len(rows), *torch.empty(shape[1:], device="meta")[rest].shape), dtype=self.dtype)
            step = max(1, CHUNK_BYTES // max(row_bytes, 1))
            for a in range(0, len(rows), step):
                n = min(step, len(rows) - a)
                out[a : a + n] = self._rows(f, rows.start + a, n, shape, row_bytes)[(slice(None), *rest)]
            return out

    def _rows(self, f, first: int, count: int, shape: tuple[int, ...], row_bytes: int) -> torch.Tensor:
        buf = bytearray(count * row_bytes)
        f.seek(self.offset + first * row_bytes)
        got = f.readinto(buf) if buf else 0
        if got != len(buf):
            raise ValueError(f"{f.name} ends inside a tensor ({got} of {len(buf)} bytes read); the file is truncated, "
                             f"re-copy it")
        t = torch.frombuffer(buf, dtype=self.dtype) if buf else torch.empty(0, dtype=self.dtype)
        return t.view(count, *shape[1:])


def _spans(file: Path) -> dict[str, _Span]:
    """Every stored key's span, from the file's header: an 8-byte little-endian length, then that much JSON."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    start = 8 + size
    return {k: _Span(start + v["data_offsets"][0], tuple(v["shape"]), _DTYPES[v["dtype"]])
            for k, v in header.items() if k != "__metadata__"}


def _int4_names(meta: dict[str, str], keys: set[str]) -> Iterator[tuple[str, dict]]:
    """Logical names of int4 weights in one file, with their metadata ``_data``."""
    seen = set()
    for name, value in meta.items():
        if name in ("tensor_names", "format"):
            continue
        try:
            info = json.loads(value)
        except (TypeError, json.JSONDecodeError):
            continue
        if isinstance(info, dict) and info.get("_type") == "Int4Tensor" and "." in name:
            seen.add(name)
            yield name, info.get("_data") or {}
    # Files without torchao metadata: recognise the flattened keys themselves.
    for key in keys:
        if key.endswith("_qdata") and "._" in key:
            module, rest = key.rsplit("._", 1)
            name = f"{module}.{rest[: -len('_qdata')]}"
            if name not in seen:
                yield name, {}


def _find_weight_files(model_dir: Path, allow_pickle: bool) -> list[Path]:
    check_model_dir(model_dir)
    if (model_dir / INDEX_FILE).is_file():
        return _files_from_index(model_dir, model_dir / INDEX_FILE)
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    if allow_pickle:
        if (model_dir / PICKLE_INDEX_FILE).is_file():
            return _files_from_index(model_dir, model_dir / PICKLE_INDEX_FILE)
        files = sorted(p for p in model_dir.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
        if files:
            return files
    unsafe = sorted(p.name for p in model_dir.iterdir() if p.suffix in _UNSAFE_SUFFIXES)
    if unsafe:
        raise ValueError(
            f"{model_dir} holds only pickle weights ({', '.join(unsafe)}); shardgen reads safetensors only, since "
            f"unpickling can run code. Convert them with transformers' save_pretrained(safe_serialization=True), "
            f"or pass `allow_pickle` to read .bin/.pt files with torch.load(weights_only=True)"
        )
    raise FileNotFoundError(f"no *.safetensors weights in {model_dir}")


def _files_from_index(model_dir: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not a valid weights index ({e}); re-export the checkpoint") from e
    files = []
    for rel in dict.fromkeys(weight_map.values()):
        path = (model_dir / rel).resolve()
        if model_dir.resolve() not in path.parents:
            raise ValueError(f"{index} points outside the model directory ({rel}); refusing to follow it")
        if not path.is_file():
            raise FileNotFoundError(f"{path} is listed in {index} but missing; copy the whole checkpoint")
        files.append(path)
    return files
