"""Tensor-parallel slices of plain int4 weights: which bytes of the three inner tensors hold a shard, read
from memory or straight from a safetensors file, and copied into merged parameters."""

from __future__ import annotations

from typing import Callable

import torch
from torchao.quantization import Int4Tensor

from shardgen.actors.int4.format import group_size_of, is_int4
from shardgen.actors.int4.rules import row_slice_problem, valid_tp_sizes

def check_shardable(name: str, shape: tuple[int, int], dim: int, tp_size: int, group_size: int | None) -> None:
    """Refuse a shard that the plain int4 layout cannot express, naming the layer.

    Column-parallel (dim 0) needs N divisible by T; row-parallel (dim 1) needs
    K/T to be a multiple of G, since every rank must own whole groups.
    """
    size = shape[dim]
    if size % tp_size != 0:
        raise ValueError(
            f"{name}: dimension {dim} of size {size} does not split over `tp` {tp_size}; "
            f"choose a `tp` that divides {size}"
        )
    problem = row_slice_problem(size, tp_size, group_size) if group_size is not None and dim == 1 else None
    if problem:
        raise ValueError(f"{name}: {problem}; use a `tp` with K/T divisible by {group_size} (valid here: "
                         f"{valid_tp_sizes(size, group_size)}) or re-quantize with a smaller `group_size`")


def shard_index(dim: int, start: int, length: int, group_size: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """Where a logical shard [start, start+length) along ``dim`` lives in (qdata, scale/zero_point).

    Both index tuples are 2-D. Used for in-memory slicing and for reading the
    same bytes straight from a safetensors file, so the two cannot disagree.
    """
    everything = slice(None)
    if dim == 0:
        return (slice(start, start + length), everything), (everything, slice(start, start + length))
    assert dim == 1, dim
    assert start % group_size == 0 and length % group_size == 0, (start, length, group_size)
    q_cols = slice(start // 2, (start + length) // 2)
    s_rows = slice(start // group_size, (start + length) // group_size)
    return (everything, q_cols), (s_rows, everything)


def read_shard(
    read: Callable[[str, tuple[slice, slice]], torch.Tensor],
    shape: tuple[int, int],
    group_size: int,
    dim: int,
    start: int,
    length: int,
) -> Int4Tensor:
    """Build the shard of an int4 weight from ``read(data_name, index)``, reading only its bytes.

    The result's inner tensors are fresh and contiguous: a row-parallel slice
    converted while non-contiguous gives silently wrong results (fbgemm reads the strides as contiguous).
    """
    q_index, s_index = shard_index(dim, start, length, group_size)
    qdata = read("qdata", q_index).contiguous()
    scale = read("scale", s_index).contiguous()
    zero = read("zero_point", s_index).contiguous()
    n, k = shape
    new_shape = torch.Size([length, k] if dim == 0 else [n, length])
    assert qdata.shape == (new_shape[0], new_shape[1] // 2), (qdata.shape, new_shape)
    return Int4Tensor(qdata, scale, zero, [1, group_size], new_shape)


def narrow(t: Int4Tensor, dim: int, start: int, length: int) -> Int4Tensor:
    """Shard of an in-memory int4 tensor along ``dim``, with contiguous copies of its inner tensors."""
    inner = {"qdata": t.qdata, "scale": t.scale, "zero_point": t.zero_point}
    return read_shard(lambda name, index: inner[name][index].clone(), tuple(t.shape), group_size_of(t), dim, start, length)


def shard(t: Int4Tensor, dim: int, tp_rank: int, tp_size: int, name: str = "weight") -> Int4Tensor:
    """Rank ``tp_rank``'s slice of ``t`` for a T-way split along ``dim`` (0: column-, 1: row-parallel)."""
    check_shardable(name, tuple(t.shape), dim, tp_size, group_size_of(t))
    size = t.shape[dim] // tp_size
    return narrow(t, dim, tp_rank * size, size)


def copy_rows(dst: torch.Tensor, src: torch.Tensor, row_offset: int) -> None:
    """Copy ``src`` (dense or int4, N_src rows) into rows [row_offset, row_offset + N_src) of ``dst``.

    Merged layers (q/k/v, gate/up) and padded vocab shards are filled this way.
    """
    rows = src.shape[0]
    if rows > dst.shape[0] - row_offset or tuple(src.shape[1:]) != tuple(dst.shape[1:]):
        raise ValueError(
            f"tensor of shape {tuple(src.shape)} does not fit rows {row_offset}.. of a parameter "
            f"of shape {tuple(dst.shape)}; the checkpoint does not match its config.json"
        )
    if not is_int4(dst):
        dst.data[row_offset : row_offset + rows].copy_(src)
        return
    if not is_int4(src):
        raise ValueError("expected an int4 tensor for an int4 parameter; the checkpoint mixes layouts for one layer")
    if group_size_of(src) != group_size_of(dst):
        raise ValueError(
            f"group size {group_size_of(src)} in the checkpoint differs from {group_size_of(dst)} in its config"
        )
    dst.qdata[row_offset : row_offset + rows].copy_(src.qdata)
    dst.scale[:, row_offset : row_offset + rows].copy_(src.scale)
    dst.zero_point[:, row_offset : row_offset + rows].copy_(src.zero_point)

