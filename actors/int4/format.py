"""torchao's plain int4 format: what a weight is, how it is quantized and dequantized.

A plain int4 weight of logical shape (N, K) with group size G is a
``torchao.quantization.Int4Tensor`` made of:

- ``qdata``       int8 (N, K/2): column 2j is the low nibble of byte j, column
                  2j+1 the high nibble; each nibble is a signed int in [-8, 7];
- ``scale``       (K/G, N), the activation dtype;
- ``zero_point``  (K/G, N), same dtype; ``w ~= q * scale + zero_point``.

Quantization is bit-exact with fbgemm's ``int4_row_quantize_zp`` + ``pack_int4``.
"""

from __future__ import annotations

import torch
from torch import nn
from torchao.quantization import Int4Tensor

INT4_DATA_NAMES = ("qdata", "scale", "zero_point")
# Attributes that belong to the tensor subclass itself, not to the parameter.
_SUBCLASS_FIELDS = frozenset(
    {"qdata", "scale", "zero_point", "block_size", "act_pre_scale", "group_scale",
     "group_zero", "row_scale", "_is_param"}
)


def is_int4(t: torch.Tensor) -> bool:
    """True for a plain int4 tensor (the checkpoint and loading layout)."""
    return isinstance(t, Int4Tensor)


def group_size_of(t: Int4Tensor) -> int:
    return int(t.block_size[-1])


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


def contiguous(t: Int4Tensor) -> Int4Tensor:
    """Same weight with contiguous inner tensors (copies only what is not contiguous already)."""
    return Int4Tensor(
        t.qdata.contiguous(), t.scale.contiguous(), t.zero_point.contiguous(), list(t.block_size), t.shape
    )


def param_attributes(param: nn.Parameter) -> dict[str, object]:
    """The attributes shardgen (or anyone) set on a parameter, without the subclass's own fields."""
    return {k: v for k, v in vars(param).items() if k not in _SUBCLASS_FIELDS}
