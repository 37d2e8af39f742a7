"""fp8 activations x int4 weights (W4A8): per-token fp8 quantization of a linear's input, and shardgen's Triton GEMM
on the byte layout that ``int4.pack_fp8act`` makes at conversion. The weights stay exactly the checkpoint's.

Why: on an H100/H200 an fp8 tensor-core MMA does twice the work of a bf16 one per cycle. From M ~ 64 rows up a
linear is bound by the MMA, not by its weight bytes, so int4 weights alone cannot beat bf16 there.

How the weights stay exact. A nibble u in [0, 15] stored alone in a byte *is* the e4m3 number u * 2**-9: e4m3's
subnormals (exponent field 0) are m * 2**-9 for m < 8, and its first binade continues them evenly (8..15 -> 1.m *
2**-6). So one AND turns four nibbles into four fp8 weights, with no conversion instructions. With the checkpoint's
``w = (u - 8) * s + z`` per group,

    y[m, n] = xs[m] * sum_g ( s[g, n] * 2**9 * (xq[m, g] . u[g, n])  +  (z[g, n] - 8 s[g, n]) * sum(xq[m, g]) )

where x ~ xq * xs is the token's fp8 row and its scale. Each group's MMA is taken into a float32 accumulator on its
own (Hopper's fp8 MMA accumulates with fewer bits over long K), scaled by the group's scale in float32, and the
zero-point term comes from the row's sums of xq per 64 columns, which the quantization writes beside xq.
The only rounding W4A8 adds is x to fp8.

Measured (``benchmarks/w4a8_gemm.py``; figures in benchmarks/README.md), it is faster than cuBLAS bf16 up to M = 64
and slower from M = 128 on, where fbgemm's fp8 kernel on re-quantized weights is faster than bf16. The float32
rescale after every group's MMA is what holds Triton's fp8 MMAs back. So the engine does not run it yet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from shardgen.actors.int4 import tiled
from shardgen.actors.int4.kernel_choice import split_factors

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: W4A8 is CUDA-only (SM89+), tests run it under Triton's interpreter
    triton = None

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
BLOCK = 128  # k per byte block of int4.pack_fp8act: byte j holds k = j (low nibble) and k = 64 + j (high)
SUM_SPAN = 64  # xq's columns per row sum: the half block, and the smallest group size on CUDA


@dataclass(frozen=True)
class Fp8Input:
    """A linear's input as fp8: ``q`` (M, K) e4m3, ``scale`` (M,) float32 with x ~ q * scale, ``sums`` (M, K/64)
    float32, the sums of q over each run of 64 columns. ``shape`` is x's shape (the output keeps its leading dims)."""

    q: torch.Tensor
    scale: torch.Tensor
    sums: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype  # the model dtype the output takes

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(self.dtype).view(self.shape)


@dataclass(frozen=True)
class Fp8Config:
    """One way of running a W4A8 linear: tile sizes and split-K of the (swapped, y^T = W x^T) kernel."""

    block_m: int = 64
    block_n: int = 128
    block_k: int = 128  # a multiple of BLOCK
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def fits(self, m: int, n: int, k: int) -> bool:
        return self.block_k % BLOCK == 0 and k % (self.block_k * self.split_k) == 0

    def name(self) -> str:
        return (f"w4a8-m{self.block_m}-n{self.block_n}-k{self.block_k}-s{self.split_k}-w{self.num_warps}"
                f"-st{self.num_stages}")


if triton is not None:
    from shardgen.actors.int4.tiled import store_tile

    @triton.jit
    def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, sums_ptr, stride_x, K, N_SUMS,
                              BLOCK_K: tl.constexpr, SPAN: tl.constexpr, FMAX: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12) / FMAX
        q = tl.clamp(x / scale, -FMAX, FMAX).to(tl.float8e4nv)
        tl.store(q_ptr + row * K + offs, q, mask=mask)
        tl.store(scale_ptr + row, scale)
        sums = tl.sum(tl.reshape(q.to(tl.float32), (BLOCK_K // SPAN, SPAN)), axis=1)
        offs_s = tl.arange(0, BLOCK_K // SPAN)
        tl.store(sums_ptr + row * N_SUMS + offs_s, sums, mask=offs_s < N_SUMS)

    @triton.jit
    def _zero_term(s_ptr, z_ptr, sums_ptr, pid_k, offs_m, mask_m, offs_n, mask_n, n_sums, N, GROUP: tl.constexpr,
                   K_SPAN: tl.constexpr):
        """sum over this split's 64-column runs h of sums[m, h] * (z - 8 s)[group of h, n], (BLOCK_M, BLOCK_N): the
        zero points' share of the output as one small tensor-core product after the main loop (3 passes of tf32:
        float32's accuracy). As an FMA per block inside the loop it cost 10-15% more time (H200)."""
        offs_r = tl.arange(0, 32)
        term = tl.zeros((offs_m.shape[0], offs_n.shape[0]), dtype=tl.float32)
        for r0 in range(0, K_SPAN // 64, 32):
            r_mask = r0 + offs_r < K_SPAN // 64
            h = pid_k * (K_SPAN // 64) + r0 + offs_r
            sums = tl.load(sums_ptr + offs_m[:, None] * n_sums + h[None, :], mask=mask_m[:, None] & r_mask[None, :],
                           other=0)
            g = (h * 64 // GROUP)[:, None] * N + offs_n[None, :]
            both = r_mask[:, None] & mask_n[None, :]
            s = tl.load(s_ptr + g, mask=both, other=0).to(tl.float32)
            z = tl.load(z_ptr + g, mask=both, other=0).to(tl.float32)
            term = tl.dot(sums, z - 8 * s, term, input_precision="tf32x3")
        return term

    @triton.jit
    def _store(acc, xs_ptr, out_ptr, offs_m, mask_m, offs_n, mask_n, stride_om, stride_split, pid_k,
               SPLIT_K: tl.constexpr):
        acc = acc * tl.load(xs_ptr + offs_m, mask=mask_m, other=0)[:, None]
        store_tile(acc, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
                   pid_k, stride_split, SPLIT_K)

    @triton.jit
    def _w4a8_swapped_kernel(xq_ptr, xs_ptr, sums_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, n_sums, stride_wn,
                             stride_om, stride_split, K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                             K_SPAN: tl.constexpr):
        """y^T = W x^T on the packed bytes: the fp8 weight halves, straight from the AND, are the left operand (a
        Hopper tensor core reads it from registers); x's rows are the right one, BLOCK_M as small as 16. M blocks
        are the grid's fastest axis, so the programs that share a weight tile run together and read it once."""
        pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        offs_h = tl.arange(0, 64)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k_step in range(0, K_SPAN, BLOCK_K):
            for c in tl.static_range(BLOCK_K // 128):
                kb = pid_k * K_SPAN + k_step + c * 128
                wb = tl.load(w_ptr + offs_n[:, None] * stride_wn + (kb // 2 + offs_h)[None, :], mask=mask_n[:, None],
                             other=0)
                lo = (wb & 15).to(tl.float8e4nv, bitcast=True)  # u * 2**-9, exactly (see the module docstring)
                hi = (wb >> 4).to(tl.float8e4nv, bitcast=True)
                xt_lo = tl.load(xq_ptr + offs_m[None, :] * K + (kb + offs_h)[:, None], mask=mask_m[None, :], other=0.0)
                xt_hi = tl.load(xq_ptr + offs_m[None, :] * K + (kb + 64 + offs_h)[:, None], mask=mask_m[None, :],
                                other=0.0)
                s_lo = tl.load(s_ptr + (kb // GROUP) * N + offs_n, mask=mask_n, other=0).to(tl.float32) * 512
                if GROUP >= 128:  # both halves in one group: one float32 update for the block
                    part = tl.dot(lo, xt_lo)
                    acc += tl.dot(hi, xt_hi, part) * s_lo[:, None]
                else:
                    s_hi = tl.load(s_ptr + ((kb + 64) // GROUP) * N + offs_n, mask=mask_n, other=0).to(tl.float32)
                    acc += tl.dot(lo, xt_lo) * s_lo[:, None] + tl.dot(hi, xt_hi) * (s_hi * 512)[:, None]
        acc = tl.trans(acc) + _zero_term(s_ptr, z_ptr, sums_ptr, pid_k, offs_m, mask_m, offs_n, mask_n, n_sums, N,
                                         GROUP, K_SPAN)
        _store(acc, xs_ptr, out_ptr, offs_m, mask_m, offs_n, mask_n, stride_om, stride_split, pid_k, SPLIT_K)


def quantize_rows(x: torch.Tensor) -> Fp8Input:
    """Each row of ``x`` (..., K) to e4m3 with its own float32 scale (absmax / 448), and the rows' sums of the fp8
    values per 64 columns. K must be a multiple of 64."""
    shape, k = x.shape, x.shape[-1]
    assert k % SUM_SPAN == 0, f"W4A8 needs K ({k}) to be a multiple of {SUM_SPAN}"
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if triton is None or not (x.is_cuda or _interpreting()) or x2.stride(-1) != 1:
        return _quantize_rows_torch(x2, shape, x.dtype)
    q = torch.empty(m, k, dtype=FP8, device=x.device)
    scale = torch.empty(m, dtype=torch.float32, device=x.device)
    sums = torch.empty(m, k // SUM_SPAN, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(k)
    _quantize_rows_kernel[(m,)](x2, q, scale, sums, x2.stride(0), k, k // SUM_SPAN, BLOCK_K=block, SPAN=SUM_SPAN,
                                FMAX=FP8_MAX, num_warps=min(max(block // 512, 1), 16))
    return Fp8Input(q, scale, sums, shape, x.dtype)


def _quantize_rows_torch(x2: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> Fp8Input:
    xf = x2.float()
    scale = xf.abs().amax(dim=-1).clamp(min=1e-12) / FP8_MAX
    q = (xf / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    sums = q.float().reshape(q.shape[0], -1, SUM_SPAN).sum(dim=-1)
    return Fp8Input(q, scale, sums, shape, dtype)


def _interpreting() -> bool:
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


def linear(x: Fp8Input, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
           config: Fp8Config) -> torch.Tensor:
    """y = x W^T for an int4 W in ``int4.pack_fp8act``'s layout: ``weight`` uint8 (N, K/2), ``scale``/``zero``
    (K/G, N), the checkpoint's own. Returns (..., N) in x's model dtype."""
    m, k = x.q.shape
    n = weight.shape[0]
    assert weight.shape[1] * 2 == k and group_size % SUM_SPAN == 0, (weight.shape, k, group_size)
    assert config.fits(m, n, k), (config, m, n, k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.q.device)
    split = config.split_k
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.q.device)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), split)
    _w4a8_swapped_kernel[grid](x.q, x.scale, x.sums, weight, scale, zero, part, m, n, k // SUM_SPAN, weight.stride(0),
                               n, m * n if split > 1 else 0, K=k, GROUP=group_size, BLOCK_M=config.block_m,
                               BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=split, K_SPAN=k // split,
                               num_warps=config.num_warps, num_stages=config.num_stages)
    if split > 1:
        tiled.sum_splits(part, out)
    return out.view(*x.shape[:-1], n)


def candidates(m: int, n: int, k: int, n_sm: int = 132) -> list[Fp8Config]:
    """Every W4A8 config worth timing for an (M, K) x (K, N) product on a GPU with ``n_sm`` SMs."""
    out: list[Fp8Config] = []
    pow2 = 1 << max(4, (m - 1).bit_length())  # M rounded up to a power of two, >= 16
    # the weight fills the tensor cores' 64-row side, x's rows the other (up to 128)
    for bm in sorted({min(pow2, 64), min(pow2, 128)} if m > 64 else {pow2}):
        for bn in (64, 128):
            for bk in (128, 256):
                for s in split_factors(math.ceil(n / bn) * math.ceil(m / bm), k, bk, n_sm):
                    warps = (4,) if bm * bn <= 64 * 128 else (8,)
                    out += [Fp8Config(bm, bn, bk, s, w, st) for w in warps for st in _depths(bk)]
    return [c for c in out if c.fits(m, n, k)]


def _depths(block_k: int) -> tuple[int, ...]:
    return (3, 4) if block_k == BLOCK else (3,)
