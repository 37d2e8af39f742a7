"""shardgen's own int4 GEMM kernels (Triton), on the tiled layout that ``int4.pack_tiled`` makes at conversion.

Why our own: at decode sizes (M <= 256 rows) a linear layer is a stream of weight bytes, and int4 moves a
quarter of bf16's. fbgemm's W4A16 kernels reach a fraction of the GPU's copy bandwidth on int4 weights
(benchmarks/README.md), so they are barely faster than cuBLAS bf16. These kernels unpack nibbles with the float
"magic number" trick (a nibble u OR-ed into the mantissa of 1.0 is the float 1 + u/16), not with slow
int-to-float conversions,
and split K over several programs where N alone cannot fill the GPU (o_proj, down_proj).

Three kernels, all reading the same weights:

- ``gemv``: M rows, one program per (row, N block, K split), fp32 FMAs, no tensor cores (M = 1..4);
- ``dot``:  tensor-core tiles of BLOCK_M rows (M up to a few hundred), 8 dots of K = CHUNK/8 per chunk;
- ``dotk``: the same tiles with the weight unpacked in natural k order, one dot of K = BLOCK_K per step;
- ``dott``: ``dotk`` swapped (y^T = W x^T), the weight the tensor cores' register operand, x's rows the narrow one;
- ``dequantize``: the bf16 weight into a scratch buffer, for cuBLAS at prefill sizes, where a GEMM is
  compute-bound and the unpacking is amortised over thousands of rows.

Which kernel and which tile sizes run at a given M is the caller's choice (``actors.kernel_choice``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the tiled layout is CUDA-only
    triton = None

def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1, set before Triton is imported)."""
    if triton is None:
        return False
    knobs = getattr(triton, "knobs", None)
    return bool(knobs is not None and knobs.runtime.interpret)


# Must match int4.TILED_PACK: a run of 64 k-values is 8 int32 words, nibble p of word i holding k = p * 8 + i.
PACK = 64
ONE = 0x3F800000  # float32 bits of 1.0; a nibble u in mantissa bits 19..22 makes the float 1 + u/16
NIBBLE_AT_19 = 0x00780000


@dataclass(frozen=True)
class KernelConfig:
    """One way of running an int4 linear: which kernel, and its tile sizes."""

    kernel: str  # "gemv", "dot", "dotk", "dott" or "dequant"
    block_n: int = 64
    block_k: int = 256  # k per loop step: BLOCK_K / chunk chunks whose loads are in flight together
    chunk: int = 128  # k per unpacked tile; a multiple of 64, and of 128 for the dot kernel (tl.dot needs K >= 16)
    block_m: int = 16
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3

    def fits(self, m: int, n: int, k: int) -> bool:
        """Whether this config can run an (M, K) x (K, N) product at all (tile divisibility)."""
        if self.kernel == "dequant":
            return True
        if self.kernel == "gemv" and m > 8:
            return False
        if self.kernel == "dot" and self.chunk // 8 < 16:
            return False  # tl.dot needs K tiles of >= 16
        if self.kernel in ("dotk", "dott"):
            return self.block_k % PACK == 0 and k % (self.block_k * self.split_k) == 0
        return (self.chunk % PACK == 0 and self.block_k % self.chunk == 0
                and k % (self.block_k * self.split_k) == 0)

    def name(self) -> str:
        if self.kernel == "dequant":
            return "dequant+cublas"
        m = f"m{self.block_m}-" if self.kernel in ("dot", "dotk", "dott") else ""
        c = "" if self.kernel in ("dotk", "dott") else f"-c{self.chunk}"
        return f"{self.kernel}-{m}n{self.block_n}-k{self.block_k}{c}-s{self.split_k}-w{self.num_warps}-st{self.num_stages}"


if triton is not None:
    _PACK = tl.constexpr(PACK)
    _ONE = tl.constexpr(ONE)
    _NIBBLE_AT_19 = tl.constexpr(NIBBLE_AT_19)

    @triton.jit
    def _unpack(words, p: tl.constexpr, ASM: tl.constexpr):
        """Nibble p of every int32 word as the float f = 1 + u/16 (u = q + 8): a shift and one LOP3, and then
        q * s + z = f * 16s + (z - 24s) is one FMA. (An int-to-float conversion runs at a quarter of the rate.)"""
        if 4 * p <= 19:
            moved = words << (19 - 4 * p)
        else:
            moved = words >> (4 * p - 19)
        if ASM:  # (moved & mask) | one in one LOP3: ptxas will not fuse an AND and an OR of two immediates
            bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
                                             [moved, tl.full(moved.shape, _NIBBLE_AT_19, tl.int32),
                                              tl.full(moved.shape, _ONE, tl.int32)],
                                             dtype=tl.int32, is_pure=True, pack=1)
        else:  # Triton's CPU interpreter runs no PTX
            bits = (moved & _NIBBLE_AT_19) | _ONE
        return bits.to(tl.float32, bitcast=True)

    @triton.jit
    def _chunk(w_ptr, s_ptr, z_ptr, kc, offs_n, mask_n, N, GROUP: tl.constexpr, CHUNK: tl.constexpr):
        """Words [CHUNK/8, BLOCK_N] of the chunk of k starting at kc, its 16 * scale and zero - 24 * scale
        ([1, BLOCK_N] when the chunk lies in one group), and the k of every word row's nibble 0."""
        rows = tl.arange(0, CHUNK // 8)
        words = tl.load(w_ptr + (kc // 8 + rows)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
        k_of_row = kc + (rows // 8) * _PACK + rows % 8
        if GROUP >= CHUNK:
            g = kc // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
        else:  # groups smaller than a chunk (G = 64 in a chunk of 128): a scale per word row
            g = (k_of_row // GROUP)[:, None] * N + offs_n[None, :]
            s = tl.load(s_ptr + g, mask=mask_n[None, :], other=0).to(tl.float32)
            z = tl.load(z_ptr + g, mask=mask_n[None, :], other=0).to(tl.float32)
        # q * s + z = (16 f - 24) * s + z for f = 1 + (q + 8)/16
        return words, s * 16, z - s * 24, k_of_row

    @triton.jit
    def dot_acc(x, w, acc, W_LEFT: tl.constexpr, ASM: tl.constexpr):
        """acc + x @ w (or w @ x with ``W_LEFT``), the unpacked weight cast to the activations' dtype for the tensor
        cores; in float32 under Triton's CPU interpreter (tests), which gets bf16 dots wrong."""
        if not ASM:
            if W_LEFT:
                acc = tl.dot(w, x.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(x.to(tl.float32), w, acc, input_precision="ieee")
        else:
            if W_LEFT:
                acc = tl.dot(w.to(x.dtype), x, acc)
            else:
                acc = tl.dot(x, w.to(x.dtype), acc)
        return acc

    @triton.jit
    def store_tile(acc, out_ptr, offsets, mask, pid_k, stride_split, SPLIT_K: tl.constexpr):
        """The output tile in the output's dtype, or this K split's float32 partial sums (summed by ``sum_splits``)."""
        if SPLIT_K == 1:
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(out_ptr + pid_k * stride_split + offsets, acc, mask=mask)

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, N, stride_xm, stride_om, stride_split,
                     GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
                     SPLIT_K: tl.constexpr, K_SPAN: tl.constexpr, ASM: tl.constexpr):
        pid_n, m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        acc = tl.zeros((CHUNK // 8, BLOCK_N), dtype=tl.float32)
        # K_SPAN is a compile-time constant: the loop bound must be one for Triton's CPU interpreter (tests).
        for k_step in range(0, K_SPAN, BLOCK_K):
            for c in tl.static_range(BLOCK_K // CHUNK):  # several chunks a step: their loads are in flight together
                kc = pid_k * K_SPAN + k_step + c * CHUNK
                words, s16, z24, k_of_row = _chunk(w_ptr, s_ptr, z_ptr, kc, offs_n, mask_n, N, GROUP, CHUNK)
                part = tl.zeros((CHUNK // 8, BLOCK_N), dtype=tl.float32)
                x_sum = tl.zeros((CHUNK // 8,), dtype=tl.float32)
                for p in tl.static_range(8):  # sum x * f over the chunk: 3 instructions a weight
                    xk = tl.load(x_ptr + m * stride_xm + k_of_row + p * 8).to(tl.float32)
                    part += _unpack(words, p, ASM) * xk[:, None]
                    x_sum += xk
                acc += part * s16 + x_sum[:, None] * z24
        y = tl.sum(acc, axis=0)
        if SPLIT_K == 1:
            tl.store(out_ptr + m * stride_om + offs_n, y.to(out_ptr.dtype.element_ty), mask=mask_n)
        else:
            tl.store(out_ptr + pid_k * stride_split + m * stride_om + offs_n, y, mask=mask_n)

    @triton.jit
    def _dot_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_om, stride_split,
                    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    CHUNK: tl.constexpr, SPLIT_K: tl.constexpr, K_SPAN: tl.constexpr, ASM: tl.constexpr):
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_step in range(0, K_SPAN, BLOCK_K):
            for c in tl.static_range(BLOCK_K // CHUNK):
                kc = pid_k * K_SPAN + k_step + c * CHUNK
                words, s16, z24, k_of_row = _chunk(w_ptr, s_ptr, z_ptr, kc, offs_n, mask_n, N, GROUP, CHUNK)
                for p in tl.static_range(8):
                    xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k_of_row + p * 8)[None, :],
                                 mask=mask_m[:, None], other=0)
                    w = _unpack(words, p, ASM) * s16 + z24
                    acc = dot_acc(xk, w, acc, False, ASM)
        store_tile(acc, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
                   pid_k, stride_split, SPLIT_K)

    @triton.jit
    def _dot_runs_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_om, stride_split,
                         GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         SPLIT_K: tl.constexpr, K_SPAN: tl.constexpr, ASM: tl.constexpr):
        """The weight tile of BLOCK_K k-values unpacked in natural k order, by shifting each word by all 8 nibble
        positions at once, so one tensor-core dot covers the whole step with a contiguous x tile (the ``dot``
        kernel does 8 dots of K = CHUNK/8 and gathers x 8 times)."""
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        rows = tl.arange(0, BLOCK_K // 8)
        offs_k = tl.arange(0, BLOCK_K)
        shift = (tl.arange(0, 8) * 4)[None, :, None, None]  # nibble p of every word, p on axis 1
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_step in range(0, K_SPAN, BLOCK_K):
            kb = pid_k * K_SPAN + k_step
            words = tl.load(w_ptr + (kb // 8 + rows)[:, None] * N + offs_n[None, :], mask=mask_n[None, :], other=0)
            xk = tl.load(x_ptr + offs_m[:, None] * stride_xm + (kb + offs_k)[None, :], mask=mask_m[:, None], other=0)
            # (run, 1, i, n) >> 4p -> (run, p, i, n): row run * 64 + p * 8 + i is k, as int4.TILED_PACK lays it out
            nib = (tl.reshape(words, (BLOCK_K // _PACK, 1, 8, BLOCK_N)) >> shift) & 0xF
            f = ((nib << 19) | _ONE).to(tl.float32, bitcast=True)
            f = tl.reshape(f, (BLOCK_K, BLOCK_N))
            if GROUP >= BLOCK_K:
                g = kb // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[None, :]
            else:
                g = ((kb + offs_k) // GROUP)[:, None] * N + offs_n[None, :]
                s = tl.load(s_ptr + g, mask=mask_n[None, :], other=0).to(tl.float32)
                z = tl.load(z_ptr + g, mask=mask_n[None, :], other=0).to(tl.float32)
            w = f * (s * 16) + (z - s * 24)
            acc = dot_acc(xk, w, acc, False, ASM)
        store_tile(acc, out_ptr, offs_m[:, None] * stride_om + offs_n[None, :], mask_m[:, None] & mask_n[None, :],
                   pid_k, stride_split, SPLIT_K)

    @triton.jit
    def _dot_swapped_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, stride_xm, stride_om, stride_split,
                            GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            SPLIT_K: tl.constexpr, K_SPAN: tl.constexpr, ASM: tl.constexpr):
        """y^T = W x^T: the weight tile (unpacked in natural k order, as in ``dotk``) is the left operand, which a
        Hopper tensor core reads from registers, so it never goes through shared memory; the few rows of x are
        the right operand, BLOCK_M as small as 16."""
        pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m, mask_n = offs_m < M, offs_n < N
        rows = tl.arange(0, BLOCK_K // 8)
        offs_k = tl.arange(0, BLOCK_K)
        shift = (tl.arange(0, 8) * 4)[None, None, :, None]  # (n, run, p, i)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for k_step in range(0, K_SPAN, BLOCK_K):
            kb = pid_k * K_SPAN + k_step
            words = tl.load(w_ptr + offs_n[:, None] + (kb // 8 + rows)[None, :] * N, mask=mask_n[:, None], other=0)
            xt = tl.load(x_ptr + offs_m[None, :] * stride_xm + (kb + offs_k)[:, None], mask=mask_m[None, :], other=0)
            nib = (tl.reshape(words, (BLOCK_N, BLOCK_K // _PACK, 1, 8)) >> shift) & 0xF
            f = tl.reshape(((nib << 19) | _ONE).to(tl.float32, bitcast=True), (BLOCK_N, BLOCK_K))
            if GROUP >= BLOCK_K:
                g = kb // GROUP
                s = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[:, None]
                z = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)[:, None]
            else:
                g = offs_n[:, None] + ((kb + offs_k) // GROUP)[None, :] * N
                s = tl.load(s_ptr + g, mask=mask_n[:, None], other=0).to(tl.float32)
                z = tl.load(z_ptr + g, mask=mask_n[:, None], other=0).to(tl.float32)
            w = f * (s * 16) + (z - s * 24)
            acc = dot_acc(xt, w, acc, True, ASM)
        store_tile(acc, out_ptr, offs_m[None, :] * stride_om + offs_n[:, None], mask_m[None, :] & mask_n[:, None],
                   pid_k, stride_split, SPLIT_K)

    @triton.jit
    def _sum_splits_kernel(part_ptr, out_ptr, numel, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for s in tl.static_range(SPLIT_K):
            acc += tl.load(part_ptr + s * numel + offs, mask=mask, other=0)
        tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        CHUNK: tl.constexpr, ASM: tl.constexpr):
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        words, s16, z24, k_of_row = _chunk(w_ptr, s_ptr, z_ptr, pid_k * CHUNK, offs_n, mask_n, N, GROUP, CHUNK)
        for p in tl.static_range(8):
            w = _unpack(words, p, ASM) * s16 + z24
            tl.store(out_ptr + (k_of_row + p * 8)[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=mask_n[None, :])


def linear(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
           config: KernelConfig, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T for a tiled int4 W: ``words`` int32 (K/8, N), ``scale``/``zero`` (K/G, N); x (M, K) contiguous.

    ``scratch``: a buffer of at least N*K elements of x's dtype, for the ``dequant`` kernel.
    """
    m, k = x.shape
    n = words.shape[1]
    assert words.shape[0] * 8 == k and x.stride(-1) == 1, (x.shape, words.shape)
    if config.kernel == "dequant":
        assert scratch is not None and scratch.numel() >= n * k, "dequant needs a scratch buffer of N*K"
        w_t = dequantize_into(words, scale, zero, group_size, scratch[: n * k].view(k, n))
        return torch.matmul(x, w_t)
    assert config.fits(m, n, k), (config, m, n, k)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split = config.split_k
    part = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    stride_split = m * n if split > 1 else 0
    tiles = dict(ASM=x.is_cuda, BLOCK_N=config.block_n, BLOCK_K=config.block_k, CHUNK=config.chunk, SPLIT_K=split, K_SPAN=k // split,
                 num_warps=config.num_warps, num_stages=config.num_stages)
    if config.kernel == "gemv":
        grid = (triton.cdiv(n, config.block_n), m, split)
        _gemv_kernel[grid](x, words, scale, zero, part, n, x.stride(0), n, stride_split, GROUP=group_size, **tiles)
    elif config.kernel in ("dotk", "dott"):
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
        tiles.pop("CHUNK")
        kernel = _dot_runs_kernel if config.kernel == "dotk" else _dot_swapped_kernel
        kernel[grid](x, words, scale, zero, part, m, n, x.stride(0), n, stride_split, GROUP=group_size,
                               BLOCK_M=config.block_m, **tiles)
    else:
        grid = (triton.cdiv(n, config.block_n), triton.cdiv(m, config.block_m), split)
        _dot_kernel[grid](x, words, scale, zero, part, m, n, x.stride(0), n, stride_split, GROUP=group_size,
                          BLOCK_M=config.block_m, **tiles)
    if split > 1:
        sum_splits(part, out)
    return out


def sum_splits(part: torch.Tensor, out: torch.Tensor) -> None:
    """out = the sum over split-K partials ``part`` (S, M, N) float32, in out's dtype (one launch)."""
    numel, block = out.numel(), 1024
    _sum_splits_kernel[(triton.cdiv(numel, block),)](part, out, numel, SPLIT_K=part.shape[0], BLOCK=block)


def dequantize_into(words: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                    out: torch.Tensor) -> torch.Tensor:
    """Write the dequantized weight, transposed (K, N), into ``out`` (its dtype); rounds as ``int4.dequantize``."""
    k, n = out.shape
    block_n = 128
    _dequant_kernel[(triton.cdiv(n, block_n), k // PACK)](words, scale, zero, out, n, GROUP=group_size,
                                                          BLOCK_N=block_n, CHUNK=PACK, ASM=out.is_cuda, num_warps=4)
    return out
