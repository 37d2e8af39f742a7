"""Which int4 kernel config runs a linear of shape (N, K) at M rows, chosen by measurement on the GPU at hand.

A config tuned on one GPU is never assumed right on another (issue 16): ``candidates`` lists what is worth trying
for a shape, ``benchmarks/int4_decode_gemm.py`` times all of them, and the winners are looked up by M here.
"""

from __future__ import annotations

from actors.int4_kernels import PACK, KernelConfig


def _splits(programs: int, k: int, block_k: int, n_sm: int) -> list[int]:
    """Split-K factors worth trying: 1, and more while the grid is under two waves of the GPU's SMs."""
    out = []
    for s in (1, 2, 4, 8, 16):
        if k % (block_k * s) != 0:
            continue
        if s == 1 or programs * (s // 2) < 2 * n_sm:
            out.append(s)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def candidates(m: int, n: int, k: int, n_sm: int = 132) -> list[KernelConfig]:
    """Every config worth timing for an (M, K) x (K, N) int4 product on a GPU with ``n_sm`` SMs."""
    if k % PACK != 0:
        return []
    out: list[KernelConfig] = []
    if m <= 4:
        for bn, bk, chunk, warps in ((64, 256, 128, 4), (128, 256, 128, 4), (128, 512, 128, 8), (256, 256, 128, 8),
                                     (128, 256, 64, 4)):
            for s in _splits(_cdiv(n, bn) * m, k, bk, n_sm):
                out.append(KernelConfig("gemv", block_n=bn, block_k=bk, chunk=chunk, split_k=s, num_warps=warps))
    if m <= 16:
        block_ms, tiles = (16,), ((64, 256), (128, 256), (128, 128), (256, 128))
    elif m <= 64:
        block_ms, tiles = (32, 64), ((64, 128), (64, 256), (128, 128), (128, 256))
    elif m <= 512:
        block_ms, tiles = (64, 128), ((64, 128), (128, 128), (64, 256))
    else:
        block_ms, tiles = (128,), ((128, 128),)
    for bm in block_ms:
        for bn, bk in tiles:
            warps = 4 if bm * bn <= 4096 else 8
            for s in _splits(_cdiv(n, bn) * _cdiv(m, bm), k, bk, n_sm):
                out.append(KernelConfig("dot", block_m=bm, block_n=bn, block_k=bk, split_k=s, num_warps=warps))
    if m >= 64:
        out.append(KernelConfig("dequant"))
    return [c for c in out if c.fits(m, n, k)]
