"""Repetition, presence and frequency penalties from per-sequence token counts kept on the device.

Each penalised sequence holds a slot: a row of output-token counts (float32, one per vocabulary entry), a row
saying which tokens its prompt holds, and its three penalties. A slot is filled from the sequence's prompt once,
when the sequence is first sampled; after that a step adds its tokens with one scatter (``count``), from the
device tokens of a decode step, so penalised greedy rows can still have the next decode step launched before
their tokens reach the host. Applying the penalties is a few batched device operations on the penalised rows only;
rows without penalties are not touched. A slot costs 5 bytes per vocabulary entry (640 KiB at 128K tokens); slots
are allocated as penalised sequences arrive, doubling, outside the KV cache's budget (in the memory that
``gpu_memory_utilization`` leaves), and are reused when their sequences finish.
"""

from __future__ import annotations

import torch

from shardgen.actors.engine.sequence import Sequence, penalized


class Penalties:
    """The penalised sequences' token counts on ``device``; the engine's one instance, used from its loop only."""

    def __init__(self, device: torch.device, min_slots: int = 8) -> None:
        self.device = device
        self.min_slots = min_slots
        self.counts: torch.Tensor | None = None  # (slots, vocab) float32: each token's occurrences in the output
        self.in_prompt: torch.Tensor | None = None  # (slots, vocab) bool
        self.values: torch.Tensor | None = None  # (slots, 3) float32: repetition, presence, frequency
        self._slot: dict[Sequence, int] = {}
        self._counted: dict[Sequence, int] = {}  # output tokens already in the sequence's counts
        self._free: list[int] = []

    def apply(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """``logits`` (float32, (B, V), row i for ``seqs[i]``) with each penalised row's penalties applied as vLLM
        and Hugging Face's RepetitionPenaltyLogitsProcessor do (the repetition penalty on tokens of the prompt or
        the output; presence and frequency on the output's): a new tensor, or ``logits`` itself if no row has any.
        Tokens a sequence generated since its counts were last updated are added first."""
        rows = [i for i, s in enumerate(seqs) if penalized(s.params)]
        if not rows:
            return logits
        picked = [seqs[i] for i in rows]
        self._admit([s for s in picked if s not in self._slot], logits.shape[1])
        self._catch_up(picked)
        index = self._tensor([i for i in rows] + [self._slot[s] for s in picked]).view(2, -1)
        row, slot = index[0], index[1]
        counts = self.counts[slot]
        values = self.values[slot]
        x = logits[row]
        seen = self.in_prompt[slot] | (counts > 0)
        repetition = values[:, 0:1]
        x = torch.where(seen, torch.where(x > 0, x / repetition, x * repetition), x)
        x = x - values[:, 1:2] * (counts > 0) - values[:, 2:3] * counts
        return logits.index_copy(0, row, x)

    def count(self, seqs: list[Sequence], tokens: torch.Tensor, rows: list[int]) -> None:
        """Add ``tokens[rows[i]]`` (device tokens, not yet on the host) to ``seqs[i]``'s counts, for the penalised
        sequences that hold a slot. The host appends the same tokens later; they are not counted twice."""
        pairs = [(self._slot[s], r) for s, r in zip(seqs, rows) if s in self._slot]
        if not pairs:
            return
        index = self._tensor([p[0] for p in pairs] + [p[1] for p in pairs]).view(2, -1)
        ids = tokens[index[1]].long()
        self.counts.index_put_((index[0], ids), torch.ones(ids.shape, device=self.device), accumulate=True)
        for s, _ in zip(seqs, rows):
            if s in self._slot:
                self._counted[s] += 1

    def forget(self, seq: Sequence) -> None:
        """A finished sequence's slot is free for the next one."""
        slot = self._slot.pop(seq, None)
        if slot is not None:
            del self._counted[seq]
            self._free.append(slot)

    @property
    def num_slots(self) -> int:
        return 0 if self.counts is None else self.counts.shape[0]

    def _admit(self, seqs: list[Sequence], vocab: int) -> None:
        """Give each new penalised sequence a slot: cleared, with its prompt's tokens and its penalties."""
        if not seqs:
            return
        if len(self._free) < len(seqs):
            self._grow(len(seqs) - len(self._free), vocab)
        slots = [self._free.pop() for _ in seqs]
        for s, slot in zip(seqs, slots):
            self._slot[s], self._counted[s] = slot, 0
        index = self._tensor(slots)
        self.counts[index] = 0.0
        self.in_prompt[index] = False
        p = [s.params for s in seqs]
        self.values[index] = torch.tensor([[x.repetition_penalty, x.presence_penalty, x.frequency_penalty] for x in p],
                                          dtype=torch.float32).to(self.device, non_blocking=True)
        prompt_slots = [slot for s, slot in zip(seqs, slots) for _ in range(s.num_prompt)]
        prompt_ids = [t for s in seqs for t in s.tokens[: s.num_prompt]]
        if prompt_ids:
            index = self._tensor(prompt_slots + prompt_ids).view(2, -1)
            self.in_prompt[index[0], index[1]] = True

    def _catch_up(self, seqs: list[Sequence]) -> None:
        """Add the output tokens the host has and the counts do not (a sequence's first sampling, or steps whose
        tokens were only read on the host): one scatter for every sequence."""
        slots, ids = [], []
        for s in seqs:
            new = s.tokens[s.num_prompt + self._counted[s]:]
            if new:
                slots.extend([self._slot[s]] * len(new))
                ids.extend(new)
                self._counted[s] += len(new)
        if ids:
            index = self._tensor(slots + ids).view(2, -1)
            self.counts.index_put_((index[0], index[1]), torch.ones(len(ids), device=self.device), accumulate=True)

    def _grow(self, needed: int, vocab: int) -> None:
        old = self.num_slots
        new = max(self.min_slots, 2 * old, old + needed)
        counts = torch.zeros(new, vocab, dtype=torch.float32, device=self.device)
        in_prompt = torch.zeros(new, vocab, dtype=torch.bool, device=self.device)
        values = torch.ones(new, 3, dtype=torch.float32, device=self.device)
        if old:
            counts[:old], in_prompt[:old], values[:old] = self.counts, self.in_prompt, self.values
        self.counts, self.in_prompt, self.values = counts, in_prompt, values
        self._free.extend(range(new - 1, old - 1, -1))

    def _tensor(self, values: list[int]) -> torch.Tensor:
        """One host-to-device copy of a list of indices, from pinned memory on a GPU so it does not block."""
        host = torch.tensor(values, dtype=torch.int64)
        if self.device.type == "cuda":
            return host.pin_memory().to(self.device, non_blocking=True)
        return host
