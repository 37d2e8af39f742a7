"""Runs the model for one engine step on one rank: owns the paged KV cache and the step's input tensors.

Under tensor parallelism rank 0 schedules; ``execute`` broadcasts the step to
the other ranks (which sit in ``follow``) so every rank runs the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from actors.attention import AttentionMetadata
from actors.distributed import TPGroup
from actors.loader import LoadedModel
from actors.scheduler import ScheduledBatch

TABLE_WIDTH_BUCKET = 16  # blocks
_STOP = "stop"
_NOOP = "noop"


@dataclass
class StepInput:
    """Everything a rank needs to run one forward pass (CPU tensors; small enough to broadcast)."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    cu_seqlens_q: torch.Tensor
    context_lens: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    max_q_len: int
    max_context_len: int
    logits_indices: torch.Tensor  # rows of the flattened tokens whose next token is sampled


def kv_block_bytes(loaded: LoadedModel, tp: TPGroup, block_size: int, dtype: torch.dtype) -> int:
    cfg = loaded.config
    return 2 * cfg.num_layers * block_size * (cfg.num_kv_heads // tp.size) * cfg.head_dim * dtype.itemsize


class ModelRunner:
    def __init__(self, loaded: LoadedModel, tp: TPGroup, device: torch.device, block_size: int,
                 kv_cache_memory: int) -> None:
        self.model, self.tp, self.device, self.block_size = loaded.model, tp, device, block_size
        attn = self.model.model.layers[0].self_attn
        dtype = self.model.model.embed_tokens.weight.dtype
        num_blocks = kv_cache_memory // kv_block_bytes(loaded, tp, block_size, dtype)
        if tp.size > 1:
            # Every rank must agree on the cache size; the smallest budget wins.
            n = torch.tensor([num_blocks], device=device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            num_blocks = int(n.item())
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache ({kv_cache_memory} bytes budgeted); use a smaller model or larger machine")
        self.num_blocks = num_blocks
        shape = (num_blocks, block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                          for _ in self.model.model.layers]

    def prepare(self, batch: ScheduledBatch) -> StepInput:
        """Flatten a scheduled batch into the model's inputs (rank 0)."""
        ids, pos, slots, q_lens, ctx, logits_idx = [], [], [], [], [], []
        bs = self.block_size
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed
            ids.extend(seq.tokens[start:start + n])
            for p in range(start, start + n):
                pos.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
            q_lens.append(n)
            ctx.append(start + n)
            if batch.samples(i):
                logits_idx.append(len(ids) - 1)
        width = max(len(s.block_table) for s in batch.seqs)
        width = -(-width // TABLE_WIDTH_BUCKET) * TABLE_WIDTH_BUCKET  # stable shapes for attention kernels
        tables = torch.zeros(len(batch.seqs), width, dtype=torch.int64)
        for i, seq in enumerate(batch.seqs):
            tables[i, : len(seq.block_table)] = torch.tensor(seq.block_table)
        cu = torch.zeros(len(q_lens) + 1, dtype=torch.int64)
        cu[1:] = torch.tensor(q_lens).cumsum(0)
        return StepInput(torch.tensor(ids), torch.tensor(pos), cu, torch.tensor(ctx), torch.tensor(slots), tables,
                         max(q_lens), max(ctx), torch.tensor(logits_idx, dtype=torch.int64))

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Run the step on every rank; returns float32 logits (rows = ``logits_indices``)."""
        if self.tp.size > 1:
            dist.broadcast_object_list([step], src=0)
        return self._forward(step)

    def _forward(self, step: StepInput) -> torch.Tensor:
        d = self.device
        meta = AttentionMetadata(step.cu_seqlens_q.to(d), step.context_lens.to(d), step.max_q_len, step.max_context_len,
                                 step.slot_mapping.to(d), step.block_tables.to(d))
        hidden = self.model(step.input_ids.to(d), step.positions.to(d), meta, self.kv_caches)
        return self.model.compute_logits(hidden[step.logits_indices.to(d)]).float()

    def heartbeat(self) -> None:
        """Keep idle followers' collective from timing out."""
        if self.tp.size > 1:
            dist.broadcast_object_list([_NOOP], src=0)

    def stop_followers(self) -> None:
        if self.tp.size > 1:
            dist.broadcast_object_list([_STOP], src=0)

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks > 0: run whatever rank 0 broadcasts until it says stop."""
        assert self.tp.rank > 0
        while True:
            box: list[object] = [None]
            dist.broadcast_object_list(box, src=0)
            if box[0] == _STOP:
                return
            if box[0] != _NOOP:
                self._forward(box[0])
