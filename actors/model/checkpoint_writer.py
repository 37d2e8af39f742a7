"""Write shardgen checkpoints: safetensors files in torchao's flattened layout, one tensor produced at a time so
host memory holds one tensor, not the model (``shardgen quantize``, the benchmarks' random checkpoints)."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from shardgen.actors import int4
from shardgen.actors.model.checkpoint import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, int4_key, int4_metadata


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor to write, described before it exists so files can be written one tensor at a time."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype  # for int4: dtype of scale / zero_point
    group_size: int | None
    produce: Callable[[], torch.Tensor]

    def parts(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(key, shape, dtype) of each tensor stored in the file for this logical tensor."""
        if self.group_size is None:
            return [(self.name, self.shape, self.dtype)]
        n, k = self.shape
        sz = (k // self.group_size, n)
        return [(int4_key(self.name, "qdata"), (n, k // 2), torch.int8),
                (int4_key(self.name, "scale"), sz, self.dtype),
                (int4_key(self.name, "zero_point"), sz, self.dtype)]

    def nbytes(self) -> int:
        return sum(math.prod(s) * d.itemsize for _, s, d in self.parts())

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "PlannedTensor":
        group = int4.group_size_of(tensor) if int4.is_int4(tensor) else None
        return cls(name, tuple(tensor.shape), tensor.dtype, group, lambda: tensor)


def save_checkpoint(out_dir: str | Path, tensors: Iterable[PlannedTensor], max_shard_bytes: int = 5 * 2**30) -> list[Path]:
    """Write tensors as ``model.safetensors``, or as shards plus ``model.safetensors.index.json``.

    Each tensor is produced, written and dropped in turn, so host memory stays
    near the largest tensor rather than the model.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes() > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes()
    if len(shards) == 1:
        names = [out_dir / SINGLE_FILE]
    else:
        names = [out_dir / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map: dict[str, str] = {}
    for path, shard in zip(names, shards):
        _write_safetensors(path, shard)
        weight_map.update({key: path.name for t in shard for key, _, _ in t.parts()})
    if len(shards) > 1:
        total = sum(t.nbytes() for s in shards for t in s)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return names


def _write_safetensors(path: Path, tensors: list[PlannedTensor]) -> None:
    meta = {"format": "pt", "tensor_names": json.dumps([t.name for t in tensors])}
    header: dict[str, object] = {}
    offset = 0
    for t in tensors:
        meta[t.name] = int4_metadata(t.shape, t.group_size) if t.group_size else json.dumps({"_type": "Tensor"})
        for key, shape, dtype in t.parts():
            nbytes = math.prod(shape) * dtype.itemsize
            header[key] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
    header["__metadata__"] = meta
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data must start 8-byte aligned
    tmp = path.with_suffix(".safetensors.tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            value = t.produce()
            pieces = [getattr(value, d) for d in int4.INT4_DATA_NAMES] if t.group_size else [value]
            for (key, shape, dtype), piece in zip(t.parts(), pieces):
                if tuple(piece.shape) != tuple(shape) or piece.dtype != dtype:
                    raise ValueError(f"{key}: produced {tuple(piece.shape)} {piece.dtype}, planned {shape} {dtype}")
                f.write(piece.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    tmp.replace(path)

