"""Sampling on its own: greedy, temperature, top-k, top-p, and seeds that make a row's tokens its own."""

import torch

from shardgen.actors.engine.sampler import PendingTokens, sample
from shardgen.actors.engine.sequence import SEED_MODULUS, SamplingParams


def test_seeded_sampling_depends_only_on_seed_and_position():
    logits = torch.randn(3, 50)
    params = [SamplingParams(temperature=0.9, top_p=0.8, seed=11), SamplingParams(temperature=1.2, top_k=5, seed=3),
              SamplingParams()]
    a = sample(logits, params, [0, 7, 0])
    b = sample(logits[[1, 0, 2]], [params[1], params[0], params[2]], [7, 0, 0])
    assert a == [b[1], b[0], b[2]]
    assert a[2] == int(logits[2].argmax())
    top_k = {sample(logits[1:2], [SamplingParams(temperature=5.0, top_k=5, seed=s)], [0])[0] for s in range(200)}
    assert top_k <= set(torch.topk(logits[1], 5).indices.tolist()) and len(top_k) > 1


def test_temperature_zero_top_k_one_and_a_tiny_top_p_are_greedy():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    greedy = logits.argmax(dim=-1).tolist()
    for p in (SamplingParams(), SamplingParams(temperature=2.0, top_k=1, seed=5),
              SamplingParams(temperature=2.0, top_p=1e-6, seed=5)):
        assert sample(logits, [p] * 4, [0, 1, 2, 3]) == greedy


def test_sampling_follows_the_softmax_at_the_temperature():
    logits = torch.tensor([[0.0, 1.0, 2.0]])
    draws = [sample(logits, [SamplingParams(temperature=0.5, seed=s)], [0])[0] for s in range(4000)]
    want = torch.softmax(logits[0] / 0.5, dim=-1)
    got = torch.bincount(torch.tensor(draws), minlength=3).float() / len(draws)
    assert torch.allclose(got, want, atol=0.03), (got, want)


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    drawn = {sample(logits, [SamplingParams(temperature=1.0, top_p=0.7, seed=s)], [0])[0] for s in range(300)}
    assert drawn == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 reaches it


def test_a_seed_and_its_remainder_draw_the_same_tokens():
    logits = torch.randn(1, 40, generator=torch.Generator().manual_seed(2))
    for seed in (12345, 2**64 + 17, -3):
        a = [sample(logits, [SamplingParams(temperature=1.0, seed=seed)], [n])[0] for n in range(20)]
        b = [sample(logits, [SamplingParams(temperature=1.0, seed=seed % SEED_MODULUS)], [n])[0] for n in range(20)]
        assert a == b


def test_pending_tokens_are_the_greedy_tokens():
    logits = torch.randn(5, 30)
    pending = PendingTokens(logits)
    assert pending.tokens.tolist() == pending.tolist() == logits.argmax(dim=-1).tolist()
