"""Attention over a batch of sequences flattened into one token dimension.

Prefill, decode and chunked prefill share this one path: each sequence brings
``q_len`` new tokens and attends to its ``context_len`` tokens (the new ones
included). With a paged KV cache, the new keys and values are written to
``slot_mapping`` and the context is gathered through ``block_tables``; without
one, the context is the new tokens themselves.

On a GPU the paged case runs the Triton kernel of ``actors.paged_attention``, which reads the cache in place;
the PyTorch code below (gather the context, masked SDPA) serves CPUs and is the kernel's reference in tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actors import paged_attention


@dataclass
class AttentionMetadata:
    """How the flattened tokens of one forward pass split into sequences.

    cu_seqlens_q: (B+1,) int, offsets of each sequence's new tokens.
    context_lens: (B,) int, tokens each sequence attends to (cached + new).
    slot_mapping: (tokens,) int, cache slot (block * block_size + offset) of each new token.
    block_tables: (B, width) int, cache blocks of each sequence in order; entries past a sequence's
        context are ignored (masked), so the width may be padded.
    max_q_len / max_context_len: host-side maxima (avoid a device sync to size the padding).
    """

    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    max_q_len: int
    max_context_len: int
    slot_mapping: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None

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
    kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q: (tokens, Hq, D); k, v: (tokens, Hkv, D); cache: two (blocks, block_size, Hkv, D). Returns (tokens, Hq, D)."""
    if kv_cache is not None:
        k_cache, v_cache = kv_cache
        k_cache.view(-1, *k_cache.shape[2:])[meta.slot_mapping] = k
        v_cache.view(-1, *v_cache.shape[2:])[meta.slot_mapping] = v
        if q.is_cuda and paged_attention.available():
            return paged_attention.paged_attention(q, k_cache, v_cache, meta.cu_seqlens_q, meta.context_lens,
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
        keys = k_cache[meta.block_tables].flatten(1, 2)  # (B, blocks * block_size, Hkv, D)
        values = v_cache[meta.block_tables].flatten(1, 2)
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
