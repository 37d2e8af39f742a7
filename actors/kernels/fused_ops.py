"""The small per-token operations of a decoder layer as single Triton kernels: residual add + RMSNorm, rotary
embedding of q and k in place, SiLU(gate) * up, and the store of new keys and values into the paged KV cache.

In PyTorch each is 5-20 kernel launches; in a decode step of 128 tokens those launches, not arithmetic, are
their cost (some 35 a layer). Every kernel rounds where transformers' PyTorch code rounds (the residual sum and
the normalised value to the model dtype before the weight, cos/sin to the model dtype), so fused and unfused
paths agree to the last bit or within one rounding. Without Triton, or on a CPU tensor, the PyTorch code runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shardgen.actors.kernels import kv_cache
from shardgen.actors.kernels.kv_cache import LayerCache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None


INTERPRETED = False  # tests set this (under TRITON_INTERPRET=1) to run the kernels on CPU tensors
ENABLED = True  # tests turn the kernels off to compare with transformers' arithmetic bit for bit


def _use_triton(x: torch.Tensor) -> bool:
    return triton is not None and ENABLED and (x.is_cuda or INTERPRETED)


# -- residual add + RMSNorm

def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` (rows over the last dim); with ``residual``, of ``x + residual``, returning (normed, sum)."""
    if not _use_triton(x) or x.stride(-1) != 1:
        return _rms_norm_torch(x, weight, eps, residual)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    # The kernel writes rows n apart: outputs are contiguous whatever the input's row stride.
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    total = torch.empty(x2.shape, dtype=x.dtype, device=x.device) if residual is not None else out
    r2 = residual.reshape(-1, shape[-1]) if residual is not None else x2
    block = triton.next_power_of_2(shape[-1])
    _rms_norm_kernel[(x2.shape[0],)](x2, r2, weight, out, total, x2.stride(0), r2.stride(0), shape[-1], eps,
                                     HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=min(max(block // 256, 1), 16))
    if residual is None:
        return out.view(shape)
    return out.view(shape), total.view(shape)


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float,
                    residual: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    if residual is not None:
        x = x + residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = weight * h.to(x.dtype)
    return out if residual is None else (out, x)


# -- rotary embedding, in place

def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half rotary embedding of q (tokens, Hq, D) and k (tokens, Hkv, D); in place on the GPU."""
    if not (_use_triton(q) and q.stride(-1) == 1 and k.stride(-1) == 1):
        return _rotary_torch(q, k, positions, inv_freq)
    tokens, hq, d = q.shape
    hkv = k.shape[1]
    _rotary_kernel[(tokens,)](q, k, positions, inv_freq, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                              HQ=hq, HKV=hkv, HALF=d // 2, HEADS_PAD=triton.next_power_of_2(max(hq, hkv)),
                              HALF_PAD=triton.next_power_of_2(d // 2), num_warps=4)
    return q, k


def _rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None, :].to(q.dtype), emb.sin()[:, None, :].to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# -- GELU(gate) * up (Gemma): torch's own ops on every device; Gemma's MLPs have not been profiled on a GPU yet

def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (tokens, 2I) holding [gate | up]; returns gelu_tanh(gate) * up, (tokens, I)."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.gelu(gate, approximate="tanh") * up


# -- SiLU(gate) * up

def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: (tokens, 2I) holding [gate | up]; returns silu(gate) * up, (tokens, I)."""
    if not _use_triton(x) or x.stride(-1) != 1:
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
    tokens, two_i = x.shape
    out = torch.empty(tokens, two_i // 2, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(tokens, triton.cdiv(two_i // 2, block))](x, out, x.stride(0), out.stride(0), two_i // 2,
                                                                  BLOCK=block, num_warps=4)
    return out


# -- new keys and values into the paged cache

def store_kv(k: torch.Tensor, v: torch.Tensor, cache: LayerCache, slot_mapping: torch.Tensor) -> None:
    """Write token i's k and v (tokens, Hkv, D) to cache slot ``slot_mapping[i]`` of the layer's cache (blocks,
    block_size, Hkv, D), quantized per token and head if it is fp8 (``actors.kv_cache``). One launch for both;
    PyTorch's indexed assignment takes two, and reads the strided rows of a fused q/k/v output element by element
    (43 us for a 8,192-token step's k at 8B shapes, ~0.4 TB/s)."""
    if not _use_triton(k) or k.stride(-1) != 1 or v.stride(-1) != 1 or not cache.k.is_contiguous():
        _store_kv_torch(k, v, cache, slot_mapping)
        return
    tokens, heads, dim = k.shape
    k_scale = cache.k_scale if cache.quantized else cache.k  # unread unless quantized
    v_scale = cache.v_scale if cache.quantized else cache.v
    _store_kv_kernel[(tokens,)](k, v, cache.k, cache.v, k_scale, v_scale, slot_mapping, k.stride(0), k.stride(1),
                                v.stride(0), v.stride(1), HEADS=heads, DIM=dim, HEADS_PAD=triton.next_power_of_2(heads),
                                DIM_PAD=triton.next_power_of_2(dim), QUANTIZED=cache.quantized, FP8_MAX=kv_cache.FP8_MAX,
                                num_warps=4)


def _store_kv_torch(k: torch.Tensor, v: torch.Tensor, cache: LayerCache, slot_mapping: torch.Tensor) -> None:
    flat = lambda t: t.view(-1, *t.shape[2:])  # noqa: E731  (slots, ...)
    if not cache.quantized:
        flat(cache.k)[slot_mapping] = k
        flat(cache.v)[slot_mapping] = v
        return
    for x, values, scales in ((k, cache.k, cache.k_scale), (v, cache.v, cache.v_scale)):
        q, s = kv_cache.quantize(x)
        flat(values)[slot_mapping] = q
        flat(scales)[slot_mapping] = s


if triton is not None:

    @triton.jit
    def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, slot_ptr, stride_kt,
                         stride_kh, stride_vt, stride_vh, HEADS: tl.constexpr, DIM: tl.constexpr,
                         HEADS_PAD: tl.constexpr, DIM_PAD: tl.constexpr, QUANTIZED: tl.constexpr,
                         FP8_MAX: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        h = tl.arange(0, HEADS_PAD)[:, None]
        d = tl.arange(0, DIM_PAD)[None, :]
        mask = (h < HEADS) & (d < DIM)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        row = slot * (HEADS * DIM) + h * DIM + d
        _store_one(k_ptr + t * stride_kt + h * stride_kh + d, k_cache_ptr + row, k_scale_ptr + slot * HEADS + h,
                   mask, h < HEADS, QUANTIZED, FP8_MAX)
        _store_one(v_ptr + t * stride_vt + h * stride_vh + d, v_cache_ptr + row, v_scale_ptr + slot * HEADS + h,
                   mask, h < HEADS, QUANTIZED, FP8_MAX)

    @triton.jit
    def _store_one(src, dst, scale_dst, mask, head_mask, QUANTIZED: tl.constexpr, FP8_MAX: tl.constexpr):
        x = tl.load(src, mask=mask, other=0.0)
        if QUANTIZED:  # as kv_cache.quantize: one scale per head, from its largest magnitude
            xf = x.to(tl.float32)
            amax = tl.max(tl.abs(xf), axis=1)[:, None]
            scale = tl.where(amax > 0, amax / FP8_MAX, 1.0)
            q = tl.minimum(tl.maximum(xf / scale, -FP8_MAX), FP8_MAX)
            tl.store(dst, q.to(dst.dtype.element_ty), mask=mask)
            tl.store(scale_dst, scale, mask=head_mask)
        else:
            tl.store(dst, x, mask=mask)

    @triton.jit
    def _rms_norm_kernel(x_ptr, r_ptr, w_ptr, out_ptr, total_ptr, stride_x, stride_r, n, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_RESIDUAL:
            x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32))
            x = x.to(out_ptr.dtype.element_ty)  # the residual stream is kept in the model dtype
            tl.store(total_ptr + row * n + cols, x, mask=mask)
        h = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n + eps)
        normed = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _rotary_kernel(q_ptr, k_ptr, pos_ptr, inv_freq_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                       HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HEADS_PAD: tl.constexpr,
                       HALF_PAD: tl.constexpr):
        t = tl.program_id(0).to(tl.int64)
        i = tl.arange(0, HALF_PAD)
        h = tl.arange(0, HEADS_PAD)
        i_ok = i < HALF
        pos = tl.load(pos_ptr + t).to(tl.float32)
        freq = pos * tl.load(inv_freq_ptr + i, mask=i_ok, other=0.0)
        cos = tl.cos(freq).to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
        sin = tl.sin(freq).to(q_ptr.dtype.element_ty).to(tl.float32)[None, :]
        _rotate_heads(q_ptr, t * stride_qt + h[:, None] * stride_qh + i[None, :], (h[:, None] < HQ) & i_ok[None, :],
                      cos, sin, HALF)
        _rotate_heads(k_ptr, t * stride_kt + h[:, None] * stride_kh + i[None, :], (h[:, None] < HKV) & i_ok[None, :],
                      cos, sin, HALF)

    @triton.jit
    def _rotate_heads(ptr, offsets, mask, cos, sin, HALF: tl.constexpr):
        # First half x1, second half x2 -> (x1 cos - x2 sin, x2 cos + x1 sin), each product rounded to the
        # model dtype before the sum, as PyTorch's q * cos + rotate_half(q) * sin does.
        dt = ptr.dtype.element_ty
        x1 = tl.load(ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(ptr + offsets + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr + offsets, ((x1 * cos).to(dt).to(tl.float32) - (x2 * sin).to(dt).to(tl.float32)).to(dt), mask=mask)
        tl.store(ptr + offsets + HALF, ((x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)).to(dt),
                 mask=mask)

    @triton.jit
    def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(out_ptr.dtype.element_ty).to(tl.float32)  # F.silu rounds here
        tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)
