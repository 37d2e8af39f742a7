"""Causal attention of a step's sequences with nothing cached (whole prompts, first chunks) over their own keys.

Two GPU kernels serve them: FlashAttention 2's variable-length kernel (``torch.nn.attention.varlen``), one launch
for any number of sequences, and cuDNN's fused attention (SDPA's cuDNN backend), one launch a sequence, which on
an H100 runs long prompts 1.3-1.7x faster (``benchmarks/prefill_attention.py``) but builds a plan (~40 ms) for
every new shape. So cuDNN takes only sequences of ``CUDNN_MIN_TOKENS`` or more, each padded up to a multiple of
``CUDNN_LENGTH_STEP`` rows (at most a few dozen plans a run); the rows past a sequence's end are later tokens
of the step or zeros, which causal masking keeps out of every real row, and their outputs are dropped. These
temporaries (one sequence's padded copy and output) stay below the MLP's of the same step, which the KV-cache
planning measures.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # torch before 2.9: uncached prompts take the paged kernel
    varlen_attn = None
# Newer torch asks for GQA explicitly; 2.11's FlashAttention takes fewer KV heads as they come.
_VARLEN_GQA = {"enable_gqa": True} if varlen_attn and "enable_gqa" in inspect.signature(varlen_attn).parameters else {}

# From this many tokens cuDNN runs a sequence in about half FlashAttention's GPU time; at 1,024 it does not
# (benchmarks/prefill_attention.py; figures in benchmarks/README.md). Each cuDNN call also costs the host ~200 us,
# hidden behind the GPU work of a long-prompt step.
CUDNN_MIN_TOKENS = 1280
CUDNN_LENGTH_STEP = 256


@dataclass(frozen=True)
class PrefillLaunch:
    """Sequences ``first`` to ``end`` (indices within the uncached part) through one kernel launch: ``"flash"`` over
    all of them with ``rows`` the longest, or ``"cudnn"`` over one sequence padded to ``rows``."""

    kernel: str
    first: int
    end: int
    rows: int


def plan_launches(lens: tuple[int, ...] | list[int], use_cudnn: bool) -> list[PrefillLaunch]:
    """Long sequences one cuDNN launch each; each run of shorter ones between them one FlashAttention launch."""
    launches: list[PrefillLaunch] = []
    short_from = 0
    for i, n in enumerate(lens):
        if use_cudnn and n >= CUDNN_MIN_TOKENS:
            if i > short_from:
                launches.append(PrefillLaunch("flash", short_from, i, max(lens[short_from:i])))
            launches.append(PrefillLaunch("cudnn", i, i + 1, -(-n // CUDNN_LENGTH_STEP) * CUDNN_LENGTH_STEP))
            short_from = i + 1
    if len(lens) > short_from:
        launches.append(PrefillLaunch("flash", short_from, len(lens), max(lens[short_from:])))
    return launches


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def flash_supports(q: torch.Tensor) -> bool:
    """Whether FlashAttention's varlen kernel takes these queries (CUDA, Ampere+, half precision, D <= 256)."""
    return (varlen_attn is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and _capability(q.device.index or 0)[0] >= 8)


def cudnn_supports(q: torch.Tensor, sliding_window: int | None) -> bool:
    """Whether long prompts go to cuDNN: Hopper (where it was measured faster), D <= 128, no sliding window, and
    a torch whose cuDNN backend runs grouped-query attention (tried once a process)."""
    return (flash_supports(q) and sliding_window is None and q.shape[-1] <= 128
            and _capability(q.device.index or 0)[0] == 9
            and _cudnn_runs_gqa(q.device.index or 0, q.dtype, q.shape[-1]))


@functools.cache
def _cudnn_runs_gqa(index: int, dtype: torch.dtype, head_dim: int) -> bool:
    if not torch.backends.cudnn.is_available():
        return False
    q = torch.zeros(CUDNN_LENGTH_STEP, 4, head_dim, device=f"cuda:{index}", dtype=dtype)
    try:
        cudnn_attention(q, q[:, :2], q[:, :2], 0, CUDNN_LENGTH_STEP, CUDNN_LENGTH_STEP, 0.125)
    except RuntimeError:  # "No available kernel": this torch's cuDNN backend refuses the shape or GQA
        return False
    return True


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_q: int,
                    scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """Causal attention of sequences with nothing cached over their own keys, by FlashAttention's varlen kernel."""
    cu = cu_seqlens.to(torch.int32)
    window = (sliding_window - 1, 0) if sliding_window is not None else (-1, 0)
    return varlen_attn(q, k, v, cu, cu, max_q, max_q, scale=scale, window_size=window, **_VARLEN_GQA)


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, length: int, rows: int,
                    scale: float) -> torch.Tensor:
    """Causal attention of the one sequence at rows ``start:start + length`` by cuDNN, run over ``rows`` rows."""
    if start + rows <= q.shape[0]:
        qs, ks, vs = (t[start:start + rows] for t in (q, k, v))
    else:  # the step's last sequence: zeros after it (uninitialised rows could hold NaNs that reach 0 * V)
        qs, ks, vs = (_padded(t[start:start + length], rows) for t in (q, k, v))
    qs, ks, vs = (t.transpose(0, 1).unsqueeze(0) for t in (qs, ks, vs))  # (1, heads, rows, D)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
    return out[0, :, :length].transpose(0, 1)


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    out = t.new_zeros(rows, *t.shape[1:])
    out[:t.shape[0]] = t
    return out


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                    lens: tuple[int, ...], scale: float, sliding_window: int | None = None,
                    cudnn: bool = True) -> torch.Tensor:
    """Causal attention of consecutive sequences with nothing cached; ``lens`` their lengths on the host,
    ``cu_seqlens`` the same as offsets on the device (from 0). ``cudnn``: whether long ones may take cuDNN."""
    launches = plan_launches(lens, cudnn and cudnn_supports(q, sliding_window))
    if len(launches) == 1 and launches[0].kernel == "flash":
        return flash_attention(q, k, v, cu_seqlens, launches[0].rows, scale, sliding_window)
    starts = [0]
    for n in lens:
        starts.append(starts[-1] + n)
    out = torch.empty_like(q)
    for launch in launches:
        a, b = starts[launch.first], starts[launch.end]
        if launch.kernel == "cudnn":
            out[a:b] = cudnn_attention(q, k, v, a, b - a, launch.rows, scale)
        else:
            cu = cu_seqlens[launch.first:launch.end + 1] - a
            out[a:b] = flash_attention(q[a:b], k[a:b], v[a:b], cu, launch.rows, scale, sliding_window)
    return out
