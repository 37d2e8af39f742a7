"""The paged KV cache's blocks, and automatic prefix caching over them.

A sequence owns a list of blocks (its block table). With prefix caching, a block whose ``block_size`` tokens are all
in the cache is registered under a chained hash of every token id up to its end (the hash of the previous block
and its own ids), so the hash names the whole prefix, not just the block. A new sequence whose first blocks' hashes
are registered attaches those blocks instead of computing them: their K/V are the same because K/V at a position
depend only on the tokens up to it. Blocks are reference-counted; a block nobody holds goes back to the free list
but keeps its contents and its registration until the free list hands it out again, oldest freed first (LRU).

Under tensor parallelism rank 0 schedules and broadcasts each step's block tables, so every rank uses the blocks
rank 0 chose.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from shardgen.actors.engine.sequence import Sequence


def chain_hash(previous: bytes, token_ids: list[int]) -> bytes:
    """The hash of a block whose prefix hashes to ``previous``: blake2b, so two prefixes never share blocks by a
    collision in practice (the token ids are compared as well)."""
    return hashlib.blake2b(previous + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False) -> None:
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # first: freed longest ago
        self.refs = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.tokens_of: list[tuple[int, ...] | None] = [None] * num_blocks
        self.cached: dict[bytes, int] = {}  # prefix hash -> the block holding its last block_size tokens

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out: unreferenced, cached contents or not."""
        return len(self.free)

    def blocks_needed(self, seq: Sequence, upto_tokens: int) -> int:
        return max(0, -(-upto_tokens // self.block_size) - len(seq.block_table))

    def allocate(self, seq: Sequence, n: int) -> None:
        assert n <= len(self.free)
        for _ in range(n):
            block, _ = self.free.popitem(last=False)
            self._forget(block)
            self.refs[block] = 1
            seq.block_table.append(block)

    def release(self, seq: Sequence) -> None:
        # Last blocks first: a prefix's early blocks, which more sequences share, are handed out again last.
        for block in reversed(seq.block_table):
            self.refs[block] -= 1
            assert self.refs[block] >= 0, block
            if self.refs[block] == 0:
                self.free[block] = None
        seq.block_table = []
        seq.block_hashes = []

    def attach_prefix(self, seq: Sequence) -> int:
        """Attach the registered blocks that hold ``seq``'s first tokens to its (empty) block table; returns how
        many tokens they hold. The block of the last token is never attached: the last token must be computed to
        sample from it, and a step never writes into a block that others share."""
        if not self.prefix_caching or seq.block_table or seq.params.prompt_logprobs:
            return 0  # prompt log-probabilities need every prompt position's logits: nothing is skipped
        bs, previous = self.block_size, b""
        for i in range((len(seq.tokens) - 1) // bs):
            ids = seq.tokens[i * bs:(i + 1) * bs]
            h = chain_hash(previous, ids)
            block = self.cached.get(h)
            if block is None or self.tokens_of[block] != tuple(ids):
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            previous = h
        return len(seq.block_table) * bs

    def fork(self, seq: Sequence, source: Sequence) -> int:
        """Share ``source``'s full, computed blocks of the prompt they have in common with ``seq`` (another sample of
        the same request, its block table empty); returns how many tokens they hold. As in ``attach_prefix``, the
        block of the prompt's last token stays ``seq``'s own. Works with prefix caching on or off."""
        assert not seq.block_table and seq.tokens[:source.num_prompt] == source.tokens[:source.num_prompt]
        shared = min((len(seq.tokens) - 1) // self.block_size, source.num_computed // self.block_size)
        for block in source.block_table[:shared]:
            assert self.refs[block] > 0, block  # the source holds it
            self.refs[block] += 1
        seq.block_table = source.block_table[:shared]
        seq.block_hashes = source.block_hashes[:shared]
        return shared * self.block_size

    def register(self, seq: Sequence) -> None:
        """Register ``seq``'s blocks that are full and computed (called after every step that computed tokens)."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_hashes), seq.num_computed // bs):
            ids = seq.tokens[i * bs:(i + 1) * bs]
            h = chain_hash(seq.block_hashes[-1] if seq.block_hashes else b"", ids)
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached and self.hash_of[block] is None:  # another sequence may have computed it too
                self.cached[h], self.hash_of[block], self.tokens_of[block] = block, h, tuple(ids)

    def _forget(self, block: int) -> None:
        """Drop a block's registration before it is handed out for other tokens."""
        h = self.hash_of[block]
        if h is not None:
            if self.cached.get(h) == block:
                del self.cached[h]
            self.hash_of[block] = self.tokens_of[block] = None
