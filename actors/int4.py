"""Everything shardgen knows about torchao's plain int4 layout, in one place.

A plain int4 weight of logical shape (N, K) with group size G is a
``torchao.quantization.Int4Tensor`` made of:

- ``qdata``       int8 (N, K/2): column 2j is the low nibble of byte j, column
                  2j+1 the high nibble; each nibble is a signed int in [-8, 7];
- ``scale``       (K/G, N), the activation dtype;
- ``zero_point``  (K/G, N), same dtype; ``w ~= q * scale + zero_point``.

This module quantizes (bit-exact with fbgemm's ``int4_row_quantize_zp`` +
``pack_int4``), dequantizes, computes which bytes of the three inner tensors
hold a tensor-parallel shard, copies shards into merged parameters, and
converts a loaded shard to the layout of the hardware it landed on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import Int4Tensor

INT4_DATA_NAMES = ("qdata", "scale", "zero_point")
# Attributes that belong to the tensor subclass itself, not to the parameter.
_SUBCLASS_FIELDS = frozenset(
    {"qdata", "scale", "zero_point", "block_size", "act_pre_scale", "group_scale",
     "group_zero", "row_scale", "_is_param"}
)

# The layout names that show up in logs, Parquet metadata and benchmarks.
LAYOUT_PRESHUFFLED = "int4-preshuffled"
LAYOUT_PLAIN = "int4-plain"
LAYOUT_CPU = "cpu-dequantized"
# shardgen's own layout for its Triton kernels (actors/int4_kernels.py); see pack_tiled.
LAYOUT_TILED = "int4-tiled"
TILED_PACK = 64
# fbgemm's bf16 x int4 GEMMs (plain and preshuffled) compute wrong results below this group size on CUDA:
# relative error 0.45-0.64 at G=32 against 0.0024 at G=64..256 (benchmarks/int4_group_sizes.py, H100).
MIN_CUDA_GROUP_SIZE = 64
# Group sizes shardgen runs (torchao's Int4WeightOnlyConfig choices): all on the CPU, from MIN_CUDA_GROUP_SIZE on CUDA.
GROUP_SIZES = (32, 64, 128, 256)


def is_int4(t: torch.Tensor) -> bool:
    """True for a plain int4 tensor (the checkpoint and loading layout)."""
    return isinstance(t, Int4Tensor)


def group_size_of(t: Int4Tensor) -> int:
    return int(t.block_size[-1])


# --------------------------------------------------------------------------- quantize


def quantize(w: torch.Tensor, group_size: int) -> Int4Tensor:
    """Quantize a float weight (N, K) to a plain ``Int4Tensor`` with groups of ``group_size``.

    Bit-exact with fbgemm's ``int4_row_quantize_zp`` + ``pack_int4`` followed by
    torchao's cast of scale and zero point to the weight's dtype, when run on
    the same device. Pure torch, so it runs where fbgemm cannot load.
    """
    if w.ndim != 2:
        raise ValueError(f"int4 quantization needs a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    if k % group_size != 0 or k % 2 != 0:
        raise ValueError(
            f"int4 quantization needs K ({k}) to be a multiple of the group size ({group_size}); "
            f"pick a group size that divides {k}, or leave this weight unquantized"
        )
    groups = w.to(torch.float).reshape(n, k // group_size, group_size)
    w_max = groups.amax(dim=-1, keepdim=True)
    w_min = groups.amin(dim=-1, keepdim=True)
    # Same operations, same order as fbgemm: any reordering changes the last bit.
    scale = (w_max - w_min).clamp(min=1e-6) / 15
    zero = w_min + scale * 8
    q = groups.sub(w_min).div(scale).round().clamp_(0, 15)
    q = (q - 8).to(torch.int8).reshape(n, k)
    qdata = torch.bitwise_or(
        torch.bitwise_and(q[:, ::2], 0xF), torch.bitwise_left_shift(q[:, 1::2], 4)
    ).contiguous()
    scale = scale.reshape(n, -1).t().contiguous().to(w.dtype)
    zero = zero.reshape(n, -1).t().contiguous().to(w.dtype)
    return Int4Tensor(qdata, scale, zero, [1, group_size], torch.Size([n, k]))


def unpack(qdata: torch.Tensor) -> torch.Tensor:
    """int8 (N, K/2) packed nibbles -> int8 (N, K) values in [-8, 7]."""
    low = torch.bitwise_right_shift(torch.bitwise_left_shift(qdata, 4), 4)  # sign-extends
    high = torch.bitwise_right_shift(qdata, 4)
    return torch.stack((low, high), dim=-1).reshape(qdata.shape[0], -1)


def dequantize(t: Int4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weight (N, K) that a plain int4 tensor stands for."""
    n, k = t.shape
    g = group_size_of(t)
    q = unpack(t.qdata).to(dtype).reshape(n, k // g, g)
    scale = t.scale.t().to(dtype).unsqueeze(-1)
    zero = t.zero_point.t().to(dtype).unsqueeze(-1)
    return (q * scale + zero).reshape(n, k)


def pack_tiled(t: Int4Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiled layout of shardgen's Triton kernels: (words int32 (K/8, N), scale (K/G, N), zero (K/G, N)).

    K-major, N contiguous: a tile of words [rows, BLOCK_N] is read with full-width coalesced loads, and so are
    the matching scales. Each run of 64 consecutive k is 8 word rows; nibble p (bits 4p..4p+3) of word row i of
    the run holds k = 8p + i, stored unsigned as q + 8 in [0, 15], so a kernel unpacks nibble p of a whole tile
    with one shift and one mask and reads the matching x in runs of 8. Scale and zero point are the checkpoint's
    own: the kernels compute with exactly the plain int4 weights.
    """
    n, k = t.shape
    if k % TILED_PACK != 0:
        raise ValueError(f"the tiled int4 layout needs K ({k}) to be a multiple of {TILED_PACK}")
    u = (unpack(t.qdata).to(torch.int64) + 8).reshape(n, k // TILED_PACK, 8, 8)  # (n, run, p, i)
    shifts = (torch.arange(8, device=u.device, dtype=torch.int64) * 4).view(1, 1, 8, 1)
    words = (u << shifts).sum(dim=2)  # (n, run, i); nibbles do not overlap, so the sum is an OR
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(n, k // 8)
    return words.t().contiguous(), t.scale.contiguous(), t.zero_point.contiguous()


def unpack_tiled(words: torch.Tensor) -> torch.Tensor:
    """int32 (K/8, N) tiled words -> int8 (N, K) values in [-8, 7]: the inverse of ``pack_tiled``'s packing."""
    w = words.t().to(torch.int64) & 0xFFFFFFFF
    n = w.shape[0]
    shifts = (torch.arange(8, device=w.device, dtype=torch.int64) * 4).view(1, 1, 8, 1)
    u = (w.reshape(n, -1, 1, 8) >> shifts) & 0xF  # (n, run, p, i)
    return (u - 8).to(torch.int8).reshape(n, -1)


def pack_fp8act(t: Int4Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The byte layout of shardgen's W4A8 kernels (actors/w4a8.py): (bytes uint8 (N, K/2), scale (K/G, N),
    zero (K/G, N)).

    Per weight row, each block of 128 consecutive k is 64 bytes: byte j holds k = j in its low nibble and
    k = 64 + j in its high one, stored unsigned as u = q + 8. A kernel makes the block's two fp8 halves (BLOCK_N,
    64) with one AND and one shift (a nibble alone in a byte is the e4m3 number u * 2**-9), and multiplies each by a
    contiguous run of 64 columns of x. Scale and zero point are the checkpoint's own.
    """
    n, k = t.shape
    if k % 128 != 0:
        raise ValueError(f"the W4A8 int4 layout needs K ({k}) to be a multiple of 128")
    u = (unpack(t.qdata) + 8).to(torch.uint8).reshape(n, k // 128, 2, 64)
    packed = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2)
    return packed.contiguous(), t.scale.contiguous(), t.zero_point.contiguous()


def unpack_fp8act(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) W4A8 bytes -> int8 (N, K) values in [-8, 7]: the inverse of ``pack_fp8act``'s packing."""
    n = packed.shape[0]
    blocks = packed.reshape(n, -1, 1, 64)
    u = torch.cat((blocks & 0xF, blocks >> 4), dim=2)
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(n, -1)


# ----------------------------------------------------------------------- tensor parallel


def check_shardable(name: str, shape: tuple[int, int], dim: int, tp_size: int, group_size: int | None) -> None:
    """Refuse a shard that the plain int4 layout cannot express, naming the layer.

    Column-parallel (dim 0) needs N divisible by T; row-parallel (dim 1) needs
    K/T to be a multiple of G, since every rank must own whole groups.
    """
    size = shape[dim]
    if size % tp_size != 0:
        raise ValueError(
            f"{name}: dimension {dim} of size {size} does not split over --tp {tp_size}; "
            f"choose a --tp that divides {size}"
        )
    if group_size is not None and dim == 1 and (size // tp_size) % group_size != 0:
        raise ValueError(
            f"{name}: row-parallel int4 slice K/T = {size}/{tp_size} = {size // tp_size} is not a "
            f"multiple of the group size G = {group_size}; use a --tp with K/T divisible by {group_size} "
            f"(valid here: {valid_tp_sizes(size, group_size)}) or re-quantize with a smaller --group-size"
        )


def valid_tp_sizes(k: int, group_size: int, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if k % t == 0 and (k // t) % group_size == 0]


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
    converted while non-contiguous gives silently wrong results (DESIGN.md).
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


def empty(shape: tuple[int, int], group_size: int, dtype: torch.dtype, device: torch.device | str) -> Int4Tensor:
    """A zero-filled plain int4 tensor that a parameter holds until its shards are loaded."""
    n, k = shape
    assert k % group_size == 0, (shape, group_size)
    return Int4Tensor(
        torch.zeros(n, k // 2, dtype=torch.int8, device=device),
        torch.zeros(k // group_size, n, dtype=dtype, device=device),
        torch.zeros(k // group_size, n, dtype=dtype, device=device),
        [1, group_size],
        torch.Size([n, k]),
    )


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


# ---------------------------------------------------------------------------- hardware


def _preshuffle_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from torchao.utils import _is_fbgemm_gpu_genai_available

    return _is_fbgemm_gpu_genai_available() and torch.cuda.get_device_capability(device) >= (9, 0)


def _tiled_available(device: torch.device) -> bool:
    from actors import int4_kernels

    if device.type == "cpu":
        return int4_kernels.interpreting()
    return int4_kernels.triton is not None and torch.cuda.get_device_capability(device) >= (8, 0)


# What --int4-layout accepts; "auto" is the fastest layout the device has.
LAYOUT_CHOICES = ("auto", LAYOUT_TILED, LAYOUT_PRESHUFFLED, LAYOUT_PLAIN)


def hardware_layout(device: torch.device | str, requested: str = "auto") -> str:
    """The layout int4 weights take on ``device``.

    ``auto``: on CUDA, fbgemm's preshuffled layout (SM90+), else plain; on the CPU, the dequantized weight.
    shardgen's tiled layout (its own Triton kernels, SM80+) is taken only by name: on an H200 it was slower end to
    end than preshuffled (decode-heavy 11,592 vs 11,962 tok/s, prefill-heavy 26,076 vs 33,523, one call,
    2026-12-03), though faster per linear at M <= 16 (benchmarks/README.md). A layout asked for by name that
    ``device`` cannot run is refused with the layouts it can. (The tiled layout runs on the CPU under Triton's
    interpreter: tests.)
    """
    device = torch.device(device)
    if requested not in LAYOUT_CHOICES:
        raise ValueError(f"--int4-layout {requested!r} is not one of {', '.join(LAYOUT_CHOICES)}")
    if device.type == "cpu":
        if requested == LAYOUT_TILED and _tiled_available(device):
            return LAYOUT_TILED
        if requested != "auto":
            raise ValueError(f"--int4-layout {requested} runs on CUDA GPUs; on the CPU int4 weights are dequantized "
                             f"at load (leave --int4-layout at auto)")
        return LAYOUT_CPU
    usable = [layout for layout, ok in ((LAYOUT_PRESHUFFLED, _preshuffle_available(device)),
                                         (LAYOUT_PLAIN, True), (LAYOUT_TILED, _tiled_available(device))) if ok]
    if requested == "auto":
        return usable[0]  # the fastest measured end to end that the device runs (see above)
    if requested not in usable:
        raise ValueError(f"--int4-layout {requested} cannot run on {torch.cuda.get_device_name(device)}; "
                         f"it runs {', '.join(usable)} (or auto)")
    return requested


def param_attributes(param: nn.Parameter) -> dict[str, object]:
    """The attributes shardgen (or anyone) set on a parameter, without the subclass's own fields."""
    return {k: v for k, v in vars(param).items() if k not in _SUBCLASS_FIELDS}


def contiguous(t: Int4Tensor) -> Int4Tensor:
    """Same weight with contiguous inner tensors (copies only what is not contiguous already)."""
    return Int4Tensor(
        t.qdata.contiguous(), t.scale.contiguous(), t.zero_point.contiguous(), list(t.block_size), t.shape
    )


def convert_for_hardware(param: nn.Parameter, layout: str, dtype: torch.dtype,
                         runtime: TiledRuntime | None = None) -> nn.Parameter:
    """Turn a loaded plain-int4 parameter into the parameter the forward pass will use.

    - ``int4-preshuffled``: ``Int4PreshuffledTensor`` through torchao's
      ``convert_to_packed_tensor_based_on_current_hardware``. fbgemm shuffles the
      source in place, so the old parameter is garbage afterwards: callers must
      replace it and never read it again.
    - ``int4-tiled``: the int32 words of ``pack_tiled`` (K/8, N), with the scale and zero point as the
      parameter's ``tiled_scale`` / ``tiled_zero`` and the group size as ``int4_group_size``; ``linear`` runs it
      through shardgen's Triton kernels (``runtime``, shared by a model's weights, picks them).
    - ``int4-plain``: the plain ``Int4Tensor``, inner tensors made contiguous.
    - ``cpu-dequantized``: the dequantized float weight in ``dtype``.

    The new parameter has ``requires_grad=False`` and keeps every attribute the
    old one had (``weight_loader``, ``input_dim``, ``output_dim``, ...).
    """
    weight = param.data
    assert is_int4(weight), f"expected a plain Int4Tensor, got {type(weight).__name__}"
    assert not getattr(param, "int4_converted", False), "this storage was converted already"
    # A row-parallel slice converted while non-contiguous is silently wrong.
    weight = contiguous(weight)
    if layout == LAYOUT_PRESHUFFLED:
        from torchao.prototype.tensor_conversion.api import (
            convert_to_packed_tensor_based_on_current_hardware,
        )

        new = convert_to_packed_tensor_based_on_current_hardware(weight)
        assert not is_int4(new), "preshuffled layout asked for on hardware that does not support it"
    elif layout == LAYOUT_TILED:
        assert runtime is not None, "the tiled layout needs the model's TiledRuntime"
        new, tiled_scale, tiled_zero = pack_tiled(weight)
    elif layout == LAYOUT_PLAIN:
        new = weight
    elif layout == LAYOUT_CPU:
        new = dequantize(weight, dtype)
    else:
        raise ValueError(f"unknown int4 layout {layout!r}")
    out = nn.Parameter(new, requires_grad=False)
    for key, value in param_attributes(param).items():
        setattr(out, key, value)
    out.int4_converted = True
    out.int4_layout = layout
    if layout == LAYOUT_TILED:
        out.tiled_scale, out.tiled_zero, out.int4_group_size = tiled_scale, tiled_zero, group_size_of(weight)
        out.tiled_runtime = runtime
    return out


class TiledRuntime:
    """What the tiled int4 weights of one model share: the kernel choice of their GPU, and one scratch buffer
    (as large as the largest weight, in the model's dtype) into which the ``dequant`` path unpacks a weight for
    cuBLAS at prefill sizes. It is allocated with the weights, so the KV planner counts it as theirs."""

    def __init__(self, device: torch.device, kernel_cache_dir: Path | None, scratch_numel: int,
                 dtype: torch.dtype) -> None:
        from actors.kernel_choice import KernelChoice

        self.choice = KernelChoice(device, kernel_cache_dir)
        self.scratch = torch.empty(scratch_numel, dtype=dtype, device=device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for a weight in any layout ``convert_for_hardware`` makes; x contiguous."""
    if getattr(weight, "int4_layout", None) != LAYOUT_TILED:
        return F.linear(x, weight, bias)
    from actors import int4_kernels

    runtime: TiledRuntime = weight.tiled_runtime
    x2 = x.reshape(-1, x.shape[-1])
    k, n = weight.shape[0] * 8, weight.shape[1]
    config = runtime.choice.config(x2.shape[0], n, k, weight.int4_group_size)
    scratch = runtime.scratch if config.kernel == "dequant" else None
    y = int4_kernels.linear(x2, weight.data, weight.tiled_scale, weight.tiled_zero, weight.int4_group_size, config,
                            scratch)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def check_group_size(group_size: int, source: str) -> None:
    """Refuse a group size that none of shardgen's int4 kernels run, naming the ones each device runs."""
    if group_size not in GROUP_SIZES:
        cuda = [g for g in GROUP_SIZES if g >= MIN_CUDA_GROUP_SIZE]
        raise ValueError(f"{source}: int4 group size {group_size} is not one shardgen runs; on the CPU: "
                         f"{', '.join(map(str, GROUP_SIZES))}; on CUDA: {', '.join(map(str, cuda))}")


def check_cuda_group_size(group_size: int) -> None:
    """Refuse a group size that CUDA's int4 kernels (both layouts) get wrong."""
    if group_size < MIN_CUDA_GROUP_SIZE:
        raise ValueError(
            f"int4 group size {group_size} cannot run on CUDA: fbgemm's int4 kernels give wrong results below "
            f"{MIN_CUDA_GROUP_SIZE} (relative error ~0.5); re-quantize with --group-size 64 or 128, or use --device cpu")


def convert_module_weights(module: nn.Module, layout: str, dtype: torch.dtype,
                           kernel_cache_dir: Path | None = None) -> int:
    """Convert every plain-int4 parameter under ``module`` in place of the old one; returns how many.

    For the tiled layout, the kernels of every weight shape are chosen first (a probe on GPUs or shapes that
    the shipped tables lack, cached under ``kernel_cache_dir``)."""
    weights = [p.data for p in module.parameters() if is_int4(p.data)]
    if layout in (LAYOUT_PRESHUFFLED, LAYOUT_PLAIN):
        for w in weights:
            check_cuda_group_size(group_size_of(w))
    runtime = None
    if layout == LAYOUT_TILED and weights:
        for w in weights:
            if w.shape[1] % TILED_PACK != 0 or group_size_of(w) % TILED_PACK != 0:
                raise ValueError(f"an int4 weight of shape {tuple(w.shape)} with group size {group_size_of(w)} cannot "
                                 f"take the tiled layout: K and the group size must be multiples of {TILED_PACK}; "
                                 f"use --int4-layout int4-preshuffled or int4-plain")
        runtime = TiledRuntime(weights[0].qdata.device, kernel_cache_dir, max(w.shape[0] * w.shape[1] for w in weights),
                               dtype)
        runtime.choice.prepare({(w.shape[0], w.shape[1], group_size_of(w)) for w in weights})
    count = 0
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if is_int4(param.data) and not getattr(param, "int4_converted", False):
                setattr(sub, name, convert_for_hardware(param, layout, dtype, runtime))
                count += 1
    return count
