"""Sampling on its own: penalties (and the device counts they use), min_tokens and min_p against Hugging Face's own logits processors; greedy,
temperature, top-k, top-p, and seeds that make a row's tokens its own."""

import pytest
import torch

from shardgen.actors.engine.penalties import Penalties
from shardgen.actors.engine.sampler import PendingTokens, filtered_probs, mask_early_stops, sample
from shardgen.actors.engine.sequence import SEED_MODULUS, Request, SamplingParams, Sequence

VOCAB, EOS = 60, 59


def sequence(prompt: list[int], output: list[int], params: SamplingParams) -> Sequence:
    seq = Sequence(Request("r", prompt, params))
    seq.tokens.extend(output)
    return seq


def adjust_logits(logits: torch.Tensor, seqs: list[Sequence], eos: list[int]) -> torch.Tensor:
    """The engine's order: penalties from fresh device counts, then min_tokens."""
    return mask_early_stops(Penalties(torch.device("cpu")).apply(logits, seqs), seqs, eos)


def test_repetition_penalty_and_min_tokens_equal_hugging_faces_processors():
    from transformers import MinNewTokensLengthLogitsProcessor, RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    prompt, output = [3, 5, 5, 9], [9, 12, 3, 40]
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(repetition_penalty=0.7),
              SamplingParams(min_tokens=6, stop_token_ids=(12,)), SamplingParams()]
    seqs = [sequence(prompt, output, p) for p in params]
    got = adjust_logits(logits, seqs, [EOS])
    ids = torch.tensor([prompt + output])
    for i, penalty in ((0, 1.3), (1, 0.7)):
        want = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], want)
    want = MinNewTokensLengthLogitsProcessor(len(prompt), 6, [EOS, 12])(ids, logits[2:3].clone())
    torch.testing.assert_close(got[2:3], want)
    assert torch.equal(got[3], logits[3])  # a row without any is untouched
    assert adjust_logits(logits, [seqs[3]] * 4, [EOS]) is logits  # and a batch without any is not copied
    done = sequence(prompt, output + [1, 1], SamplingParams(min_tokens=6))
    assert torch.equal(adjust_logits(logits[:1], [done], [EOS]), logits[:1])  # 6 tokens: EOS is allowed again


def test_presence_and_frequency_penalties_subtract_per_completion_token_as_openai_defines_them():
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(1))
    seq = sequence([4, 4, 8], [8, 20, 20, 20], SamplingParams(presence_penalty=0.5, frequency_penalty=-0.25))
    got = adjust_logits(logits, [seq], [EOS])
    want = logits.clone()
    want[0, 8] -= 0.5 - 0.25  # once in the completion (the prompt's tokens do not count)
    want[0, 20] -= 0.5 - 0.25 * 3
    torch.testing.assert_close(got, want)


def test_device_counts_follow_tokens_counted_on_the_device_or_caught_up_from_the_host_and_slots_are_reused_clean():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.4)
    penalties = Penalties(torch.device("cpu"), min_slots=2)
    a, b, plain = sequence([1, 2], [], params), sequence([7], [7, 7], params), sequence([5], [], SamplingParams())
    penalties.apply(logits, [a, plain, b])
    # a decode step's tokens counted on the device, then appended by the host: counted once
    penalties.count([a, plain, b], torch.tensor([30, 31, 32]), [0, 1, 2])
    a.tokens.append(30), plain.tokens.append(31), b.tokens.append(32)
    b.tokens.append(33)  # and a token only the host saw (a step not launched ahead)
    got = penalties.apply(logits, [a, plain, b])
    torch.testing.assert_close(got, adjust_logits(logits, [a, plain, b], [EOS]))
    assert torch.equal(got[1], logits[1])
    c = sequence([40], [], params)  # a third penalised sequence: the slots double, keeping a's and b's counts
    torch.testing.assert_close(penalties.apply(logits, [a, b, c]), adjust_logits(logits, [a, b, c], [EOS]))
    assert penalties.num_slots == 4
    penalties.forget(a)
    d = sequence([9], [], params)  # takes a's slot: none of a's prompt or output is seen
    torch.testing.assert_close(penalties.apply(logits[:1], [d]), adjust_logits(logits[:1], [d], [EOS]))
    assert penalties.num_slots == 4


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 0, 1.0, 0.1), (0.7, 10, 0.9, 0.05),
                                                           (1.5, 0, 0.8, 0.3)])
def test_the_sampled_distribution_equals_hugging_faces_warpers(temperature, top_k, top_p, min_p):
    from transformers import (
        LogitsProcessorList,
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(2)) * 2
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + [TopPLogitsWarper(top_p), MinPLogitsWarper(min_p)])
    want = torch.softmax(warpers(torch.tensor([[0]]), logits.clone()), dim=-1)[0]
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    got = filtered_probs(logits[0], p)
    torch.testing.assert_close(got / got.sum(), want)
    drawn = {sample(logits, [SamplingParams(**{**vars(p), "seed": s})], [0])[0] for s in range(300)}
    assert drawn <= set(torch.nonzero(want).flatten().tolist())


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
