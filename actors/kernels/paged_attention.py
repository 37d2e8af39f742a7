"""Paged attention as one Triton kernel: prefill, chunked prefill and decode read keys and values straight from
the block-paged KV cache, with no gathered copy of the context.

One program handles ``BLOCK_Q`` new tokens of one sequence for one KV head and all the query heads that share
it (GQA): its ``BLOCK_Q * GROUP_PAD`` query rows are one matrix, so each key tile is loaded once per group and
multiplied on tensor cores. Keys are walked in tiles of ``BLOCK_N`` with an online softmax (flash attention);
the loop stops at the last key the tile's queries may see, so a decode step reads each sequence's cache once.
Every bound is read on the device, which is what lets a decode step be captured in a CUDA graph. An fp8 cache
(``actors.kv_cache``) is read as fp8 and widened to float16 in registers (q too), its per-key scales applied to
the scores and probabilities of each tile.

The kernel needs Triton; on a machine without it ``available()`` is false and attention falls back to the
PyTorch path in ``actors.attention`` (which is also the reference the tests hold this kernel to).
"""

from __future__ import annotations

import functools

import torch

from shardgen.actors.kernels.kv_cache import LayerCache

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs; attention uses the PyTorch path
    triton = None

# Launch shapes, the fastest measured at 8B shapes with the key loop software-pipelined (tl.range; the figures and
# the alternatives, from benchmarks/attention_configs.py, are in benchmarks/README.md). rows: query rows per program
# (tl.dot needs >= 16, so a decode program stacks its group's heads and idle padding); key_tile: keys per iteration.
MAX_DECODE_SPLITS = 16
DECODE = {"rows": 16, "key_tile": 128, "num_warps": 4, "num_stages": 3}
PREFILL = {"rows": 128, "key_tile": 64, "num_warps": 4, "num_stages": 3}


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _attend_key_tile(
        q, q_pos, m_i, l_i, acc, n0, kv_end, seq, kv_head, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
        block_tables_ptr, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        window, d, d_valid, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr, IEEE: tl.constexpr,
        num_kv_heads, FP8: tl.constexpr,
    ):
        """One key tile [n0, n0 + BLOCK_N) of the online softmax: returns the updated (m_i, l_i, acc)."""
        n = n0 + tl.arange(0, BLOCK_N)
        n_valid = n < kv_end
        page = tl.load(block_tables_ptr + seq * stride_bt + n // PAGE, mask=n_valid, other=0).to(tl.int64)
        k_offsets = page * stride_kb + (n % PAGE) * stride_ks + kv_head * stride_kh
        k = tl.load(k_cache_ptr + k_offsets[None, :] + d[:, None], mask=n_valid[None, :] & d_valid[:, None], other=0.0)
        if FP8:  # scales (blocks, PAGE, num_kv_heads), one per key and head
            scale_offsets = (page * PAGE + n % PAGE) * num_kv_heads + kv_head
            k = k.to(q.dtype)
        if IEEE:
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        if FP8:
            s = s * tl.load(k_scale_ptr + scale_offsets, mask=n_valid, other=0.0)[None, :]
        s = s * scale_log2
        allowed = (n[None, :] <= q_pos[:, None]) & n_valid[None, :]
        if SLIDING:
            allowed = allowed & (q_pos[:, None] - n[None, :] < window)
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v_offsets = page * stride_vb + (n % PAGE) * stride_vs + kv_head * stride_vh
        v = tl.load(v_cache_ptr + v_offsets[:, None] + d[None, :], mask=n_valid[:, None] & d_valid[None, :], other=0.0)
        if FP8:
            pv = (p * tl.load(v_scale_ptr + scale_offsets, mask=n_valid, other=0.0)[None, :]).to(q.dtype)
            v = v.to(q.dtype)
        else:
            pv = p.to(v.dtype)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(pv, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(pv, v)
        return m_new, l_i, acc

    # Integers that change from step to step are not specialised on, so no step waits for a recompilation.
    @triton.jit(do_not_specialize=["first_seq", "stride_bt", "window"])
    def _paged_attention_kernel(
        q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, out_ptr, cu_seqlens_q_ptr, context_lens_ptr, block_tables_ptr,
        part_acc_ptr, part_ml_ptr, first_seq, scale_log2,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_bt,
        window,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, PAGE: tl.constexpr, SLIDING: tl.constexpr,
        IEEE: tl.constexpr, PIPELINED: tl.constexpr, SPLITS: tl.constexpr, FP8: tl.constexpr,
    ):
        seq = first_seq + tl.program_id(0)
        # Decode launches split each sequence's keys SPLITS ways (axis 1); other launches tile queries on it.
        q_tile = tl.program_id(1) if SPLITS == 1 else 0
        split = tl.program_id(1) if SPLITS > 1 else 0
        kv_head = tl.program_id(2)
        q_start = tl.load(cu_seqlens_q_ptr + seq)
        q_len = tl.load(cu_seqlens_q_ptr + seq + 1) - q_start
        if q_tile * BLOCK_Q >= q_len:
            return
        ctx = tl.load(context_lens_ptr + seq)
        first_pos = ctx - q_len  # position of this sequence's first new token

        BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
        rows = tl.arange(0, BLOCK_M)
        tok = q_tile * BLOCK_Q + rows // GROUP_PAD
        head = kv_head * GROUP + rows % GROUP_PAD
        row_valid = (tok < q_len) & (rows % GROUP_PAD < GROUP)
        d = tl.arange(0, HEAD_DIM_PAD)
        d_valid = d < HEAD_DIM
        q_offsets = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :]
        q = tl.load(q_ptr + q_offsets, mask=row_valid[:, None] & d_valid[None, :], other=0.0)
        if FP8 and not IEEE:
            # Tiles of an fp8 cache are widened to float16, which Hopper converts e4m3 to in one instruction per two
            # values (bfloat16 goes through float32): a decode layer at 8B shapes took 158 us this way, 199 us
            # through bfloat16 (H200, 128 sequences; the bf16 cache: 159 us).
            q = q.to(tl.float16)
        q_pos = first_pos + tok

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
        # Causal: no query of this tile sees past its last token's position.
        kv_end = tl.minimum(ctx, first_pos + tl.minimum((q_tile + 1) * BLOCK_Q, q_len))
        kv_start = 0
        if SLIDING:
            kv_start = tl.maximum(first_pos + q_tile * BLOCK_Q - window + 1, 0) // BLOCK_N * BLOCK_N
        if SPLITS > 1:  # this program's share of the keys, in whole tiles
            span = tl.cdiv(tl.cdiv(kv_end - kv_start, SPLITS), BLOCK_N) * BLOCK_N
            kv_start = kv_start + split * span
            kv_end = tl.minimum(kv_end, kv_start + span)
        if PIPELINED:  # compiled: a for loop over tl.range is what Triton software-pipelines (num_stages)
            for n0 in tl.range(kv_start, kv_end, BLOCK_N):
                m_i, l_i, acc = _attend_key_tile(
                    q, q_pos, m_i, l_i, acc, n0, kv_end, seq, kv_head, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                    v_scale_ptr, block_tables_ptr, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                    stride_vh, stride_bt, window, d, d_valid, BLOCK_N, PAGE, SLIDING, IEEE, tl.num_programs(2), FP8)
        else:  # Triton's CPU interpreter cannot range() over a loaded bound
            n0 = kv_start
            while n0 < kv_end:
                m_i, l_i, acc = _attend_key_tile(
                    q, q_pos, m_i, l_i, acc, n0, kv_end, seq, kv_head, k_cache_ptr, v_cache_ptr, k_scale_ptr,
                    v_scale_ptr, block_tables_ptr, scale_log2, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
                    stride_vh, stride_bt, window, d, d_valid, BLOCK_N, PAGE, SLIDING, IEEE, tl.num_programs(2), FP8)
                n0 += BLOCK_N
        if SPLITS > 1:  # partial results; _combine_splits normalises them
            part = (seq * (tl.num_programs(2) * GROUP) + head) * SPLITS + split
            tl.store(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :], acc, mask=row_valid[:, None])
            tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
            tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)
            return
        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_offsets = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(out_ptr + o_offsets, acc.to(out_ptr.dtype.element_ty), mask=row_valid[:, None] & d_valid[None, :])


    @triton.jit(do_not_specialize=["first_seq"])
    def _combine_splits(
        part_acc_ptr, part_ml_ptr, out_ptr, cu_seqlens_q_ptr, first_seq, stride_ot, stride_oh,
        SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    ):
        """out = sum_s 2^(m_s - M) acc_s / sum_s 2^(m_s - M) l_s for one decode row and head."""
        seq = first_seq + tl.program_id(0)
        head = tl.program_id(1)
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, HEAD_DIM_PAD)
        part = (seq * tl.num_programs(1) + head) * SPLITS + s
        m = tl.load(part_ml_ptr + part * 2)
        l_s = tl.load(part_ml_ptr + part * 2 + 1)
        acc = tl.load(part_acc_ptr + part[:, None] * HEAD_DIM_PAD + d[None, :])
        m_max = tl.max(m, 0)
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - tl.where(m_max == float("-inf"), 0.0, m_max)))
        total = tl.sum(w * l_s, 0)
        o = tl.sum(w[:, None] * acc, 0) / tl.where(total == 0.0, 1.0, total)
        row = tl.load(cu_seqlens_q_ptr + seq).to(tl.int64)
        tl.store(out_ptr + row * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_splits(num_seqs: int, num_kv_heads: int, device: torch.device) -> int:
    """Key splits per decode sequence. A decode program is one sequence and KV head walking its keys; with fewer
    programs than the GPU has SMs (a small batch, or few KV heads a rank under TP) most SMs would wait, so each
    sequence's keys are split until there is about one program per SM. Above that, splitting only adds work: on an
    H100, 32 sequences x 8 KV heads x 4,100 tokens took 197 us unsplit and 210 us in 4 splits
    (``benchmarks/step_profile.py``)."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index or 0)
    programs = max(num_seqs * num_kv_heads, 1)
    return 1 if programs >= sms else min(triton.next_power_of_2(-(-sms // programs)), MAX_DECODE_SPLITS)


@functools.cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def paged_attention(
    q: torch.Tensor,
    cache: LayerCache,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    block_tables: torch.Tensor,
    max_q_len: int,
    scale: float,
    sliding_window: int | None = None,
    seqs: tuple[int, int] | None = None,
    out: torch.Tensor | None = None,
    splits: int | None = None,
) -> torch.Tensor:
    """q: (tokens, Hq, D), new keys already written to the layer's cache (``actors.kv_cache``: (blocks, block_size,
    Hkv, D), in the model's dtype or fp8 with scales). Returns (tokens, Hq, D).

    ``seqs``: only sequences [first, end) (default all), whose rows are written into ``out`` (given, or a new tensor
    of which only those rows are set). Sequences are picked by an offset, not by slicing the tensors: a slice's
    address can lose the alignment Triton specialises on, and would compile another kernel mid-run.

    ``splits`` (decode launches, ``max_q_len == 1``): key splits per sequence, combined by a second kernel; None
    chooses from the batch and the GPU (``decode_splits``).

    ``max_q_len`` (a host-side bound) only sizes the grid; programs past a sequence's new tokens exit at once,
    so a CUDA graph captured with ``max_q_len=1`` serves every decode batch of its size.
    """
    assert triton is not None, "paged_attention needs Triton"
    k_cache, v_cache = cache.k, cache.v
    tokens, num_heads, head_dim = q.shape
    first, end = seqs if seqs is not None else (0, context_lens.numel())
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    launch = DECODE if max_q_len == 1 else PREFILL
    block_q = max(launch["rows"] // group_pad, 1)
    out = torch.empty_like(q) if out is None else out
    q = q if q.stride(-1) == 1 else q.contiguous()
    if max_q_len != 1:
        splits = 1
    elif splits is None:
        splits = decode_splits(end - first, num_kv_heads, q.device)
    assert splits & (splits - 1) == 0, splits
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    part_acc = part_ml = out  # unused unless split
    if splits > 1:
        rows = context_lens.numel() * num_heads * splits  # indexed by absolute sequence
        part_acc = torch.empty(rows, head_dim_pad, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(rows, 2, dtype=torch.float32, device=q.device)
    grid = (end - first, splits if splits > 1 else triton.cdiv(max_q_len, block_q), num_kv_heads)
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, cache.k_scale if cache.quantized else k_cache, cache.v_scale if cache.quantized else v_cache,
        out, cu_seqlens_q, context_lens, block_tables, part_acc, part_ml, first,
        scale * 1.4426950408889634,  # softmax in base 2
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        sliding_window or 0,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, BLOCK_N=launch["key_tile"],
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, PAGE=k_cache.shape[1],
        SLIDING=sliding_window is not None, IEEE=q.dtype == torch.float32, PIPELINED=q.is_cuda, SPLITS=splits,
        FP8=cache.quantized, num_warps=launch["num_warps"], num_stages=launch["num_stages"],
    )
    if splits > 1:
        _combine_splits[(end - first, num_heads)](
            part_acc, part_ml, out, cu_seqlens_q, first, out.stride(0), out.stride(1),
            SPLITS=splits, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, num_warps=4)
    return out
