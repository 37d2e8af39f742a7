"""Runs the model for one engine step on one rank: owns the paged KV cache, its size, and the step's inputs.

Under tensor parallelism rank 0 schedules; ``execute`` broadcasts the step to
the other ranks (which sit in ``follow``) as tensors (step.py) so every rank runs the same forward.
On a GPU the cache is sized from what is left after the weights and a measured
activation peak, and decode steps replay CUDA graphs.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
import torch.distributed as dist

from shardgen.actors.kernels import kv_cache, paged_attention
from shardgen.actors.model.attention import AttentionMetadata, StepParts
from shardgen.actors.engine import step as wire
from shardgen.actors.engine.step import StepInput
from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.cuda_graphs import DecodeGraphs
from shardgen.actors.model.distributed import TPGroup
from shardgen.actors.model.loader import LoadedModel
from shardgen.actors.engine.scheduler import ScheduledBatch

log = logging.getLogger(__name__)

TABLE_WIDTH_BUCKET = 16  # blocks
GiB = 2**30


def kv_block_bytes(loaded: LoadedModel, tp: TPGroup, block_size: int, dtype: torch.dtype,
                   kv_cache_dtype: str = "auto") -> int:
    cfg = loaded.config
    return kv_cache.block_bytes(cfg.num_layers, block_size, cfg.num_kv_heads // tp.size, cfg.head_dim, dtype,
                                kv_cache_dtype)


def cpu_kv_cache_memory() -> int:
    """A slice of host memory for a CPU rank's cache: an eighth of what is available, at most 2 GiB."""
    import psutil

    return int(min(2 * GiB, psutil.virtual_memory().available // 8))


class ModelRunner:
    def __init__(self, loaded: LoadedModel, tp: TPGroup, device: torch.device, config: EngineConfig,
                 max_model_len: int) -> None:
        self.model, self.tp, self.device, self.config = loaded.model, tp, device, config
        self.model.set_max_model_len(max_model_len)
        self.block_size = config.block_size
        self.dtype = self.model.model.embed_tokens.weight.dtype
        self.use_triton = device.type == "cuda" and paged_attention.available()
        kv_cache.check_supported(config.kv_cache_dtype, device)
        block_bytes = kv_block_bytes(loaded, tp, self.block_size, self.dtype, config.kv_cache_dtype)
        self.kv_caches: list[kv_cache.LayerCache] = []
        self.graphs: DecodeGraphs | None = None
        self.activation_peak = 0
        self.graphs_reserve = 0  # GPU bytes set aside for the decode graphs before the KV cache is sized
        if config.kv_cache_memory:
            memory = config.kv_cache_memory
        elif device.type == "cuda":
            memory = self._plan_gpu_kv_memory(block_bytes)
        else:
            memory = cpu_kv_cache_memory()
        num_blocks = memory // block_bytes
        if tp.size > 1:
            # Every rank must agree on the cache size; the smallest budget wins.
            n = torch.tensor([num_blocks], device=device)
            dist.all_reduce(n, op=dist.ReduceOp.MIN)
            num_blocks = int(n.item())
        if num_blocks < 1:
            raise ValueError(f"no memory left for the KV cache ({memory / GiB:.2f} GiB budgeted, one block needs "
                             f"{block_bytes / 2**20:.1f} MiB); pass a larger `kv_cache_gb` or use a larger `tp`")
        self.num_blocks = num_blocks
        self.kv_caches = self._allocate_cache(num_blocks + 1)  # + a block for CUDA graphs' padding rows
        if device.type == "cuda" and config.cuda_graphs:
            width = -(-max_model_len // self.block_size)
            try:
                self.graphs = DecodeGraphs(self._decode_forward, config.max_num_seqs, width, num_blocks, self.block_size,
                                           device)
            except RuntimeError as e:  # a kernel or collective that cannot be captured: slower, still correct
                log.warning("CUDA graph capture failed (%s); decode steps run eagerly", e)
                self.graphs = None
                torch.cuda.synchronize(device)

    def _allocate_cache(self, num_blocks: int) -> list[kv_cache.LayerCache]:
        attn = self.model.model.layers[0].self_attn
        return kv_cache.allocate(len(self.model.model.layers), num_blocks, self.block_size, attn.num_kv_heads,
                                 attn.head_dim, self.dtype, self.config.kv_cache_dtype, self.device)

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of this rank's KV cache, every layer, scales included."""
        return sum(c.nbytes for c in self.kv_caches)

    def _plan_gpu_kv_memory(self, block_bytes: int) -> int:
        """KV bytes = total x utilization - what is in use now (weights, CUDA context, other processes) - the
        activation peak of the largest step, measured by running one on a temporary cache."""
        cfg, d = self.config, self.device
        tokens = cfg.max_num_batched_tokens
        lengths = [tokens // cfg.max_num_seqs + (i < tokens % cfg.max_num_seqs) for i in range(min(cfg.max_num_seqs, tokens))]
        step = StepInput.prefill(lengths, self.block_size)
        # Sample every sequence's row, as a full decode batch would: the float32 logits are part of the peak.
        torch.cuda.empty_cache()
        # Blocks for the step, and for the decode step of every sequence measured after it (one block each).
        self.kv_caches = self._allocate_cache(max(int(step.block_tables.max()) + 1, cfg.max_num_seqs))
        torch.cuda.synchronize(d)
        torch.cuda.reset_peak_memory_stats(d)
        before = torch.cuda.memory_allocated(d)
        with torch.inference_mode():
            self._forward(step)
        torch.cuda.synchronize(d)
        self.activation_peak = torch.cuda.max_memory_allocated(d) - before
        if cfg.cuda_graphs:
            # The decode graphs' pool stays allocated beside the eager steps' activations: about one decode step
            # of every sequence, plus the graphs' one logits buffer (cuda_graphs.py).
            decode = StepInput.prefill([1] * cfg.max_num_seqs, self.block_size)
            torch.cuda.reset_peak_memory_stats(d)
            with torch.inference_mode():
                logits = self._forward(decode)
            torch.cuda.synchronize(d)
            self.graphs_reserve = torch.cuda.max_memory_allocated(d) - before + logits.numel() * logits.element_size()
            del logits
        self.kv_caches = []
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(d)
        limit = total * cfg.gpu_memory_utilization
        in_use = total - free
        memory = int(limit - in_use - self.activation_peak - self.graphs_reserve)
        log.info("GPU memory: limit %.2f GiB, in use %.2f GiB, activation peak %.2f GiB, CUDA graphs %.2f GiB -> KV "
                 "cache %.2f GiB", limit / GiB, in_use / GiB, self.activation_peak / GiB, self.graphs_reserve / GiB,
                 memory / GiB)
        if memory < block_bytes:
            raise ValueError(
                f"the GPU has no room for a KV cache: {total / GiB:.1f} GiB x `gpu_memory_utilization` "
                f"{cfg.gpu_memory_utilization} = {limit / GiB:.1f} GiB, of which {in_use / GiB:.1f} GiB are in use "
                f"(this rank's weights and the CUDA context, and any other process) and a step of "
                f"`max_num_batched_tokens` {tokens} needs {self.activation_peak / GiB:.2f} GiB of activations; "
                f"lower `max_num_batched_tokens`, raise `gpu_memory_utilization`, or split the model with a larger `tp`")
        return memory

    def prepare(self, batch: ScheduledBatch, input_ids: torch.Tensor | None = None) -> StepInput:
        """Flatten a scheduled batch into the model's inputs (rank 0).

        ``input_ids``: for a decode step planned ahead (every row one token at ``num_computed``, every row sampled),
        its tokens as the previous step left them on the device; they are not on the host yet.
        """
        bs = self.block_size
        ids: list[int] = []
        slots: list[np.ndarray | int] = []
        pos: list[np.ndarray | int] = []
        q_lens, ctx, cached, logits_idx, prompt_idx, prompt_rows = [], [], [], [], [], []
        total = 0
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_tokens)):
            start = seq.num_computed
            total += n
            if input_ids is None:
                ids.extend(seq.tokens[start:start + n])
            if n == 1:  # decode: plain ints are cheaper than arrays
                pos.append(start)
                slots.append(seq.block_table[start // bs] * bs + start % bs)
            else:
                p = np.arange(start, start + n)
                pos.append(p)
                slots.append(np.asarray(seq.block_table)[p // bs] * bs + p % bs)
            q_lens.append(n)
            ctx.append(start + n)
            cached.append(start)
            if input_ids is not None or batch.samples(i):
                logits_idx.append(total - 1)
            last = min(start + n, seq.num_prompt - 1)
            if seq.params.prompt_logprobs and input_ids is None and last > start:
                prompt_rows.append((i, start, last - start))
                prompt_idx.extend(range(total - n, total - n + last - start))
        width = max(len(s.block_table) for s in batch.seqs)
        if not self.use_triton:
            width = -(-width // TABLE_WIDTH_BUCKET) * TABLE_WIDTH_BUCKET  # stable shapes for the SDPA path's plans
        tables = np.zeros((len(batch.seqs), width), dtype=np.int32)
        for i, seq in enumerate(batch.seqs):
            tables[i, : len(seq.block_table)] = seq.block_table
        cu = np.zeros(len(q_lens) + 1, dtype=np.int32)
        np.cumsum(q_lens, out=cu[1:])
        flat = lambda parts: np.concatenate([np.atleast_1d(x) for x in parts]).astype(np.int64)  # noqa: E731
        if input_ids is None:
            input_ids = torch.tensor(ids, dtype=torch.int64)
        assert input_ids.numel() == total, (input_ids.numel(), total)
        return StepInput(input_ids, torch.from_numpy(flat(pos)), torch.from_numpy(cu),
                         torch.tensor(ctx, dtype=torch.int32), torch.from_numpy(flat(slots)), torch.from_numpy(tables),
                         max(q_lens), max(ctx), torch.tensor(logits_idx + prompt_idx, dtype=torch.int64),
                         StepParts.of(q_lens, cached), tuple(prompt_rows))

    @property
    def can_overlap(self) -> bool:
        """Whether decode steps may be launched ahead: one rank only (a step ahead takes its tokens from the last
        step's sampling on rank 0's GPU, which the wire to the other ranks, step.py, does not carry yet)."""
        return self.tp.size == 1 and self.config.overlap_decode

    @torch.inference_mode()
    def execute(self, step: StepInput) -> torch.Tensor:
        """Run the step on every rank; returns float32 logits (rows = ``logits_indices``)."""
        if self.tp.size > 1:
            wire.send(step, self._wire_device)
        return self._forward(step)

    def _forward(self, step: StepInput) -> torch.Tensor:
        # Every copy to the device is non-blocking: a blocking one would wait for a decode step launched ahead.
        to = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        if self.graphs is not None and self.graphs.fits(step.context_lens.numel(), step.max_q_len):
            logits = self.graphs.replay(step.input_ids, step.positions, step.slot_mapping, step.context_lens,
                                        step.block_tables)
            return logits[to(step.logits_indices)]  # a copy: the next replay overwrites the graph's output
        meta = AttentionMetadata(to(step.cu_seqlens_q), to(step.context_lens), step.max_q_len, step.max_context_len,
                                 to(step.slot_mapping), to(step.block_tables),
                                 step.parts if self.config.attention_by_parts else None, self.config.cudnn_prompts)
        hidden = self.model(to(step.input_ids), to(step.positions), meta, self.kv_caches)
        return self.model.compute_logits(hidden[to(step.logits_indices)]).float()

    def _decode_forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        with torch.inference_mode():
            return self.model.compute_logits(self.model(input_ids, positions, meta, self.kv_caches)).float()

    @property
    def _wire_device(self) -> torch.device:
        """Where steps travel between ranks: NCCL's GPU (no host round trip for the step's tensors), gloo's CPU."""
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")

    def heartbeat(self) -> None:
        """Keep idle followers' collective from timing out."""
        if self.tp.size > 1:
            wire.send_signal(wire.NOOP, self._wire_device)

    def stop_followers(self) -> None:
        if self.tp.size > 1:
            wire.send_signal(wire.STOP, self._wire_device)

    @torch.inference_mode()
    def follow(self) -> None:
        """Ranks > 0: run whatever rank 0 broadcasts until it says stop."""
        assert self.tp.rank > 0
        while True:
            step = wire.receive(self._wire_device)
            if isinstance(step, StepInput):
                self._forward(step)
            elif step == wire.STOP:
                return
