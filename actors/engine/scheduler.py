"""Continuous batching over a paged KV cache.

Every step takes all running sequences that need one more token (decode), then
fills the rest of the token budget with prompt chunks (chunked prefill) from
sequences mid-prefill and then from the waiting queue, up to ``max_num_seqs``
running sequences. Sequences leave as they finish and new ones join on the next
step. When the cache runs out, the most recently admitted sequence is preempted
(its blocks freed, recomputed later). With prefix caching (actors/engine/blocks.py) a sequence starts with the
blocks of its longest cached prefix attached and computes only the rest, a preempted one included. The later
samples of a request (``n`` > 1) join at the head of the queue holding sample 0's prompt blocks already.

Admission (``EngineConfig.admission``): ``greedy`` admits whatever the next chunk fits in, and relies on
preemption when sequences outgrow the cache; ``projected`` admits a sequence only if the cache can also hold every
running sequence at its length limit (prompt + max_new_tokens, or max_model_len), so nothing admitted is preempted
for lack of blocks. Long fixed-length outputs (the throughput workload) recompute less with ``projected``; outputs
that stop far before their limit fill the cache less.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from shardgen.actors.engine.blocks import BlockManager
from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.sequence import FINISH_ERROR, Sequence, Status


@dataclass
class ScheduledBatch:
    """Which sequences run this step and how many of their tokens (starting at ``num_computed``)."""

    seqs: list[Sequence]
    num_tokens: list[int]

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def samples(self, i: int) -> bool:
        """Whether sequence i reaches its last token this step, so a next token is sampled for it."""
        s = self.seqs[i]
        return s.num_computed + self.num_tokens[i] == len(s.tokens)


class Scheduler:
    """Schedules one replica's sequences under its engine's limits (``config``: the limits and the block size;
    the block count and the longest sequence are what the runner sized)."""

    def __init__(self, config: EngineConfig, num_blocks: int, max_model_len: int) -> None:
        if num_blocks * config.block_size < max_model_len:
            raise ValueError(
                f"the KV cache holds {num_blocks * config.block_size} tokens ({num_blocks} blocks of "
                f"{config.block_size}), less than one sequence of `max_model_len` {max_model_len}; "
                f"lower `max_model_len` or give the cache more memory"
            )
        self.config = config
        self.max_model_len = max_model_len
        self.blocks = BlockManager(num_blocks, config.block_size, config.prefix_caching)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt (or recomputed) tokens not computed because their blocks were cached

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def add_first(self, seqs: list[Sequence]) -> None:
        """Queue ``seqs`` ahead of every waiting sequence (in their order)."""
        self.waiting.extendleft(reversed(seqs))

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[ScheduledBatch, list[Sequence]]:
        """The next step's batch, and sequences refused outright (finished with an error)."""
        cfg = self.config
        budget = cfg.max_num_batched_tokens
        seqs: list[Sequence] = []
        counts: list[int] = []
        refused: list[Sequence] = []

        # Running sequences first, oldest first: decodes take one token, unfinished prefills a chunk.
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(len(seq.tokens) - seq.num_computed, budget)
            if not self._reserve(seq, n, seqs):
                continue  # seq (or a later one) was preempted; self.running changed
            seqs.append(seq)
            counts.append(n)
            budget -= n
            i += 1

        # Then new sequences while there is room; ``projected``: room for every running sequence to finish, too.
        reserved = sum(self._blocks_to_finish(s) for s in self.running) if cfg.admission == "projected" else 0
        while self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            seq = self.waiting[0]
            needed_total = -(-len(seq.tokens) // cfg.block_size)
            if len(seq.tokens) >= self.max_model_len or needed_total > self.blocks.num_blocks:
                self.waiting.popleft()
                seq.status, seq.finish_reason = Status.FINISHED, FINISH_ERROR
                seq.error = (f"prompt: {len(seq.tokens)} tokens leave no room to generate within "
                             f"`max_model_len` {self.max_model_len}; shorten it or raise `max_model_len`")
                refused.append(seq)
                continue
            forked = bool(seq.block_table)  # a later sample holding sample 0's blocks (BlockManager.fork)
            if not forked:
                seq.num_computed = self.blocks.attach_prefix(seq)
            n = min(len(seq.tokens) - seq.num_computed, budget)
            need = self.blocks.blocks_needed(seq, seq.num_computed + n)
            to_finish = self._blocks_to_finish(seq) if cfg.admission == "projected" else 0
            if need > self.blocks.num_free or reserved + to_finish > self.blocks.num_free:
                if not forked:
                    self.blocks.release(seq)  # its cached blocks stay cached
                    seq.num_computed = 0
                break
            if cfg.admission == "projected":
                reserved += to_finish - need
            if not forked:  # a sample's share of its prompt is counted once, with sample 0's prompt
                self.num_cached_tokens += seq.num_computed
            self.waiting.popleft()
            self.blocks.allocate(seq, need)
            seq.status = Status.RUNNING
            self.running.append(seq)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts), refused

    def plan_decode_ahead(self, seqs: list[Sequence]) -> ScheduledBatch | None:
        """The decode step after the current one, planned before the current step's tokens are known: ``seqs`` (every
        running sequence, each with its current token counted in ``num_computed``) each take their next token.

        None when the regular ``schedule`` could decide differently: sequences are waiting to be admitted, or a
        sequence needs a new block and there are not enough free ones (``schedule`` would preempt).
        """
        if self.waiting or len(seqs) != len(self.running):
            return None
        need = [self.blocks.blocks_needed(s, s.num_computed + 1) for s in seqs]
        if sum(need) > self.blocks.num_free:
            return None
        for seq, n in zip(seqs, need):
            self.blocks.allocate(seq, n)
        return ScheduledBatch(list(seqs), [1] * len(seqs))

    def _blocks_to_finish(self, seq: Sequence) -> int:
        """Blocks ``seq`` still lacks to reach its length limit (prompt + max_new_tokens, at most max_model_len)."""
        final = min(seq.num_prompt + seq.params.max_new_tokens, self.max_model_len)
        return max(0, -(-final // self.config.block_size) - len(seq.block_table))

    def _reserve(self, seq: Sequence, n: int, scheduled: list[Sequence]) -> bool:
        """Make sure ``seq`` has blocks for ``n`` more tokens, preempting the newest others if needed."""
        need = self.blocks.blocks_needed(seq, seq.num_computed + n)
        while need > self.blocks.num_free:
            victim = self.running[-1]
            if victim in scheduled:
                victim = seq  # never preempt work already in this step's batch
            self._preempt(victim)
            if victim is seq:
                return False
        self.blocks.allocate(seq, need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed = 0
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.status, seq.finish_reason = Status.FINISHED, reason
        self.running.remove(seq)
        self.blocks.release(seq)
