"""CUDA graphs of decode steps: one graph per batch-size bucket, replayed with the step's inputs copied into
static buffers.

An eager decode step of an 8B model launches some 600 kernels and spends most of its time on the host; a
replayed graph launches them in one call. A step of ``n`` sequences runs in the smallest bucket ``b >= n``;
rows ``n..b`` are padding that attends to one token of a reserved cache block and writes only there.

Every graph writes its logits into one output buffer of ``max_num_seqs`` rows, and all graphs share one memory
pool, captured largest first: what a graph allocates inside the capture is free again once it is captured, so the
graphs together hold about what the largest one needs (the runner sets that aside before it sizes the KV cache),
however many buckets there are. A graph that kept its own logits would hold sum(buckets) x vocabulary floats: 17
GiB at 1,024 sequences of a 128K vocabulary.
"""

from __future__ import annotations

import bisect
from typing import Callable

import torch

from shardgen.actors.model.attention import AttentionMetadata

# Decode forward: (input_ids, positions, metadata) -> logits of every row.
DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionMetadata], torch.Tensor]


def batch_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including ``max_num_seqs``."""
    sizes = {b for b in (1, 2, 4, 8) if b < max_num_seqs} | set(range(16, max_num_seqs, 16)) | {max_num_seqs}
    return sorted(sizes)


class DecodeGraphs:
    def __init__(self, forward: DecodeForward, max_num_seqs: int, table_width: int, pad_block: int, block_size: int,
                 device: torch.device) -> None:
        self.buckets = batch_buckets(max_num_seqs)
        self.pad_block, self.pad_slot = pad_block, pad_block * block_size
        n = self.buckets[-1]
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), self.pad_slot, dtype=torch.int64, device=device)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=device)
        self.block_tables = torch.full((n, table_width), pad_block, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: torch.Tensor | None = None  # (max_num_seqs, vocabulary): every graph's output
        self._capture(forward)

    def _inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        meta = AttentionMetadata(self.cu_seqlens_q[: b + 1], self.context_lens[:b], 1, 1, self.slot_mapping[:b],
                                 self.block_tables[:b])
        return self.input_ids[:b], self.positions[:b], meta

    def _capture(self, forward: DecodeForward) -> None:
        pool = None
        for b in reversed(self.buckets):  # largest first: the smaller graphs fit in its memory pool
            warm = forward(*self._inputs(b))  # warm-up outside capture: Triton compiles, libraries initialise
            if self.logits is None:
                self.logits = torch.empty(self.buckets[-1], warm.shape[-1], dtype=warm.dtype, device=warm.device)
            del warm
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[:b].copy_(forward(*self._inputs(b)))
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()

    def fits(self, num_seqs: int, max_q_len: int) -> bool:
        return max_q_len == 1 and num_seqs <= self.buckets[-1]

    def replay(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
               context_lens: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """Run one decode step (host tensors, one row per sequence); returns the logits of its rows."""
        n = input_ids.numel()
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        self.slot_mapping[:n].copy_(slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(context_lens, non_blocking=True)
        # Columns past this step's width keep older entries; the kernel never reads past a row's context.
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables, non_blocking=True)
        if b > n:
            self.slot_mapping[n:b].fill_(self.pad_slot)
            self.context_lens[n:b].fill_(1)
            self.block_tables[n:b, 0].fill_(self.pad_block)
        self.graphs[b].replay()
        return self.logits[:n]
