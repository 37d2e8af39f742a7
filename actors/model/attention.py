"""Attention over a batch of sequences flattened into one token dimension.

Prefill, decode and chunked prefill share this one path: each sequence brings
``q_len`` new tokens and attends to its ``context_len`` tokens (the new ones
included). With a paged KV cache, the new keys and values are written to
``slot_mapping`` and the context is gathered through ``block_tables``; without
one, the context is the new tokens themselves.

On a GPU the paged case runs the Triton kernel of ``actors.paged_attention``, which reads the cache in place;
the PyTorch code below (gather the context, masked SDPA) serves CPUs and is the kernel's reference in tests.
A GPU step is attended in up to three launches, one per kind of sequence (``StepParts``): decode rows through the
kernel's decode shape, chunks over cached tokens through its prefill shape, and sequences with nothing cached
(whole prompts, first chunks) on the step's own keys and values (``actors.prefill_attention``: FlashAttention's
variable-length kernel, cuDNN's for long prompts on Hopper), which beats the paged kernel on long prompts
(``benchmarks/step_profile.py``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from shardgen.actors.kernels import fused_ops, paged_attention
from shardgen.actors.kernels.prefill_attention import flash_supports, prefill_attention
from shardgen.actors.kernels.kv_cache import LayerCache

# Fewer decode rows than this in a step with chunks over cached tokens share the chunks' launch.
DECODE_LAUNCH_MIN_ROWS = 32


@dataclass(frozen=True)
class StepParts:
    """A step's sequences in the order the scheduler gives them: ``decode`` leading ones with one new token each,
    then chunks over cached tokens, then, from sequence ``uncached`` (row ``uncached_row``) on, ones with nothing cached,
    which attend to their own new tokens only. ``middle_max_q``: the longest new-token run of the middle part;
    ``uncached_lens``: the new tokens of each sequence of the last part.
    """

    decode: int
    uncached: int
    uncached_row: int
    middle_max_q: int
    uncached_lens: tuple[int, ...] = ()

    @property
    def uncached_max_q(self) -> int:
        return max(self.uncached_lens, default=0)

    @classmethod
    def of(cls, q_lens: list[int], cached: list[int]) -> "StepParts":
        decode = 0
        while decode < len(q_lens) and q_lens[decode] == 1:
            decode += 1
        uncached = len(q_lens)
        while uncached > decode and cached[uncached - 1] == 0:
            uncached -= 1
        return cls(decode, uncached, sum(q_lens[:uncached]), max(q_lens[decode:uncached], default=0), tuple(q_lens[uncached:]))


@dataclass
class AttentionMetadata:
    """How the flattened tokens of one forward pass split into sequences.

    cu_seqlens_q: (B+1,) int, offsets of each sequence's new tokens.
    context_lens: (B,) int, tokens each sequence attends to (cached + new).
    slot_mapping: (tokens,) int, cache slot (block * block_size + offset) of each new token.
    block_tables: (B, width) int, cache blocks of each sequence in order; entries past a sequence's
        context are ignored (masked), so the width may be padded.
    max_q_len / max_context_len: host-side maxima (avoid a device sync to size the padding).
    parts: host-side split of the sequences by kind (GPU steps from the runner; None: one paged launch).
    cudnn: whether long sequences of the uncached part may take cuDNN (``actors.prefill_attention``).
    """

    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    max_q_len: int
    max_context_len: int
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    parts: StepParts | None = None
    cudnn: bool = True

    @property
    def num_seqs(self) -> int:
        return self.cu_seqlens_q.numel() - 1

    @classmethod
    def prefill(cls, seq_lens: list[int], device: torch.device | str = "cpu") -> "AttentionMetadata":
        """Metadata for whole prompts with no cache (each sequence attends to its own tokens)."""
        cu = torch.zeros(len(seq_lens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(seq_lens).cumsum(0)
        lens = torch.tensor(seq_lens, dtype=torch.int64)
        return cls(cu.to(device), lens.to(device), max(seq_lens), max(seq_lens))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kv_cache: LayerCache | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: (tokens, Hq, D); k, v: (tokens, Hkv, D); cache: the layer's (``actors.kv_cache``). Returns (tokens, Hq, D)."""
    if kv_cache is not None:
        fused_ops.store_kv(k, v, kv_cache, meta.slot_mapping)
        if q.is_cuda and paged_attention.available():
            if meta.parts is not None:
                return attention_by_parts(q, k, v, kv_cache, meta, scale, sliding_window)
            return paged_attention.paged_attention(q, kv_cache, meta.cu_seqlens_q, meta.context_lens,
                                                   meta.block_tables, meta.max_q_len, scale, sliding_window)
    tokens, _, head_dim = q.shape
    max_q = meta.max_q_len
    q_lens = meta.cu_seqlens_q[1:] - meta.cu_seqlens_q[:-1]
    steps = torch.arange(max_q, device=q.device)
    q_valid = steps[None, :] < q_lens[:, None]  # (B, max_q)
    q_index = (meta.cu_seqlens_q[:-1, None] + steps[None, :]).clamp(max=tokens - 1)

    if kv_cache is None:
        keys, values, max_k = k[q_index], v[q_index], max_q
    else:
        # Every block of the table (the runner pads its width), so the key length, and with it the
        # attention kernel's plan, changes once per table bucket rather than on every decode step.
        keys, values = kv_cache.gather(meta.block_tables, q.dtype)  # (B, blocks * block_size, Hkv, D)
        max_k = keys.shape[1]

    # Absolute position of each query and key within its sequence.
    q_pos = (meta.context_lens - q_lens)[:, None] + steps[None, :]
    k_pos = torch.arange(max_k, device=q.device)
    allowed = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < meta.context_lens[:, None, None])
    if sliding_window is not None:
        allowed &= q_pos[:, :, None] - k_pos[None, None, :] < sliding_window
    # Padded query rows attend to everything so softmax stays finite; they are dropped below.
    allowed |= ~q_valid[:, :, None]

    out = F.scaled_dot_product_attention(
        q[q_index].transpose(1, 2),  # (B, Hq, max_q, D)
        keys.transpose(1, 2),
        values.transpose(1, 2),
        attn_mask=allowed[:, None],
        scale=scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2)[q_valid].reshape(tokens, -1, head_dim)


def attention_by_parts(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: LayerCache,
                       meta: AttentionMetadata, scale: float, sliding_window: int | None = None) -> torch.Tensor:
    """GPU attention of a step whose new keys are already in the cache, one launch per part of ``meta.parts``."""
    p, n = meta.parts, meta.num_seqs
    cu = meta.cu_seqlens_q
    flash = p.uncached < n and flash_supports(q)
    if flash and p.uncached == 0:
        return prefill_attention(q, k, v, cu, p.uncached_lens, scale, sliding_window, meta.cudnn)
    out = torch.empty_like(q)
    paged_end = p.uncached if flash else n
    middle_max_q = p.middle_max_q if flash else max(p.middle_max_q, p.uncached_max_q)
    if p.decode < paged_end and p.decode < DECODE_LAUNCH_MIN_ROWS:
        launches = [(0, paged_end, middle_max_q)]  # a few decode rows ride along with the chunks
    else:
        launches = [(0, p.decode, 1), (p.decode, paged_end, middle_max_q)]

    def paged() -> None:
        for first, end, max_q in launches:
            if end > first:
                paged_attention.paged_attention(q, kv_cache, cu, meta.context_lens, meta.block_tables, max_q,
                                                scale, sliding_window, seqs=(first, end), out=out)

    if not flash:
        paged()
        return out
    # The sequences with cached tokens run on a side stream beside FlashAttention: often a few rows over long
    # contexts, latency-bound launches that would leave most of the GPU idle on their own.
    main = torch.cuda.current_stream(q.device)
    side = _side_stream(q.device)
    side.wait_stream(main)  # the new keys are in the cache
    with torch.cuda.stream(side):
        paged()
    row = p.uncached_row
    out[row:] = prefill_attention(q[row:], k[row:], v[row:], cu[p.uncached:] - row, p.uncached_lens, scale, sliding_window,
                                meta.cudnn)
    main.wait_stream(side)  # also keeps q, out and the cache from being reused before the side stream is done
    return out


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)
