"""Next-token sampling: min_tokens on the logits (penalties are applied before, by penalties.py), then greedy, or
temperature, top-k, top-p and min_p, with per-sequence seeds.

A seeded sequence draws its n-th
token from a generator seeded by (seed, n), so its tokens do not depend on which other sequences share the batch,
the replica, or the tensor-parallel layout.
"""

from __future__ import annotations

from typing import Sequence as Seq

import torch

from shardgen.actors.engine.sequence import SEED_MODULUS, SamplingParams, Sequence


def mask_early_stops(logits: torch.Tensor, seqs: list[Sequence], eos_token_ids: Seq[int]) -> torch.Tensor:
    """``logits`` (float32, (B, V), row i for ``seqs[i]``) with EOS and each row's stop tokens masked while the row
    has fewer than its ``min_tokens``, as vLLM and Hugging Face's MinNewTokensLengthLogitsProcessor do: a copy, or
    ``logits`` itself when no row needs it."""
    early = [i for i, s in enumerate(seqs) if s.num_output < s.params.min_tokens]
    vocab = logits.shape[1]
    pairs = [(i, t) for i in early for t in {*eos_token_ids, *seqs[i].params.stop_token_ids} if t < vocab]
    if not pairs:
        return logits
    logits = logits.clone()
    r, t = zip(*pairs)
    logits[torch.tensor(r, device=logits.device), torch.tensor(t, device=logits.device)] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row of ``logits`` (float32, (B, V)); ``steps[i]`` is how many tokens row i has generated."""
    greedy = logits.argmax(dim=-1)
    out = greedy.tolist()
    for i, p in enumerate(params):
        if p.temperature == 0:
            continue
        probs = filtered_probs(logits[i].float(), p)
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(_row_seed(p.seed, steps[i]))
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p (same as multinomial).
        noise = torch.empty_like(probs).exponential_(generator=gen)
        out[i] = int((probs / noise).argmax())
    return out


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of ``tokens`` under one row's logits (the model's own distribution: before temperature,
    top-k and top-p), and the ``k`` most likely (token id, log-probability) pairs."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k)
    return float(lp[tokens]), list(zip(top.indices.tolist(), top.values.tolist()))


class PendingTokens:
    """Greedy tokens of a step that may still be running: on the device (the input of a decode step planned ahead)
    and on their way to pinned host memory, copied without blocking the stream, so ``tolist`` waits for this step
    only, not for whatever was launched after it."""

    def __init__(self, logits: torch.Tensor) -> None:
        self.tokens = logits.argmax(dim=-1)  # on the logits' device
        self._event = None
        if self.tokens.is_cuda:
            self._host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self._host.copy_(self.tokens, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = self.tokens

    def tolist(self) -> list[int]:
        if self._event is not None:
            self._event.synchronize()
        return self._host.tolist()


def filtered_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """One row's sampling distribution (not renormalised): temperature, then top-k, top-p and min-p, in Hugging
    Face's order."""
    logits = logits / p.temperature
    if p.top_k and p.top_k < logits.numel():
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if p.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        drop = sorted_probs.cumsum(0) - sorted_probs >= p.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if p.min_p > 0:  # after top-k and top-p, as Hugging Face's MinPLogitsWarper: relative to the likeliest left
        probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
    return probs


def _row_seed(seed: int | None, step: int) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, (1,)).item())
    return (seed * 1_000_003 + step * 7_919 + 0x5EED) % SEED_MODULUS
