"""The engine without Ray: continuous batching, stop conditions, sampling, preemption."""

import dataclasses

import pytest
import torch

from shardgen.actors.engine.sequence import (
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    Request,
    SamplingParams,
    sample_params,
)
from tests.helpers import hf_greedy, make_engine, random_prompts


def test_continuous_batching_keeps_the_engine_full_and_matches_running_alone(model):
    reference, loaded = model
    lengths = [3, 90, 7, 41, 2, 66, 12, 5, 30, 8, 55, 4, 19, 77, 6, 11]
    new = [40, 3, 25, 9, 31, 2, 17, 38, 5, 22, 7, 33, 12, 4, 28, 15]
    cap = 4
    engine = make_engine(loaded, max_num_seqs=cap, max_num_batched_tokens=64)
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=n)) for i, (p, n) in enumerate(zip(random_prompts(lengths), new))]
    together = engine.generate(reqs)
    running = engine.stats.running_per_step
    # Until the last requests are admitted, the engine runs at its cap (minus steps where sequences just finished).
    last_admission = max(i for i, r in enumerate(running) if r == cap)
    busy = running[: last_admission + 1]
    print(f"steps {len(running)}, running per step before the tail: mean {sum(busy) / len(busy):.2f} of cap {cap}; "
          f"tail {len(running) - len(busy)} steps")
    assert sum(busy) / len(busy) >= 0.9 * cap
    assert max(running) == cap
    for req, got in zip(reqs, together):
        alone = make_engine(loaded, max_num_seqs=1).generate([req])[0]
        assert got.token_ids == alone.token_ids and got.finish_reason == FINISH_LENGTH
        assert got.token_ids == hf_greedy(reference, req.prompt_token_ids, req.params.max_new_tokens)


def test_requests_added_while_running_join_the_batch(model):
    _, loaded = model
    engine = make_engine(loaded, max_num_seqs=8)
    first = engine.add([Request("a", random_prompts([5])[0], SamplingParams(max_new_tokens=20))])
    engine.step()
    engine.step()
    second = engine.add([Request("b", random_prompts([6], 1)[0], SamplingParams(max_new_tokens=5))])
    engine.step()  # a's decode step launched ahead (before b arrived) is read first
    engine.step()
    assert engine.stats.running_per_step[-1] == 2  # b joined while a was decoding
    while not (first[0].done() and second[0].done()):
        engine.step()
    assert len(first[0].result()[0].token_ids) == 20 and len(second[0].result()[0].token_ids) == 5


def test_eos_and_stop_token_ids_finish_with_stop_and_are_not_in_the_output(model):
    _, loaded = model
    p = random_prompts([9])[0]
    free = make_engine(loaded).generate([Request("x", p, SamplingParams(max_new_tokens=10))])[0].token_ids
    stop_at = free[4]
    first = free.index(stop_at)
    got = make_engine(loaded, eos={stop_at}).generate([Request("x", p, SamplingParams(max_new_tokens=10))])[0]
    assert got.finish_reason == FINISH_STOP and got.token_ids == free[:first]
    got = make_engine(loaded).generate([Request("x", p, SamplingParams(max_new_tokens=10, stop_token_ids=(stop_at,)))])[0]
    assert got.finish_reason == FINISH_STOP and got.token_ids == free[:first]
    got = make_engine(loaded, eos={stop_at}).generate([Request("x", p, SamplingParams(max_new_tokens=10, ignore_eos=True))])[0]
    assert got.finish_reason == FINISH_LENGTH and got.token_ids == free


def test_stop_strings_finish_on_the_text(model):
    _, loaded = model
    p = random_prompts([9])[0]
    free = make_engine(loaded).generate([Request("x", p, SamplingParams(max_new_tokens=12))])[0].token_ids
    detok = lambda ids: " ".join(f"t{t}" for t in ids)  # noqa: E731
    stop = f"t{free[5]}"
    got = make_engine(loaded, detokenize=detok).generate([Request("x", p, SamplingParams(max_new_tokens=12, stop=(stop,)))])[0]
    # cut before the stop string: the text up to it, and the token ids wholly before it
    before = free[: free.index(free[5])]
    assert got.finish_reason == FINISH_STOP and got.token_ids == before and got.text == detok(before) + " " * bool(before)


def test_max_model_len_ends_with_length_and_too_long_prompts_are_errors(model):
    _, loaded = model
    engine = make_engine(loaded, max_model_len=20)
    ok, too_long = engine.generate([Request("ok", random_prompts([15])[0], SamplingParams(max_new_tokens=50)),
                                    Request("long", random_prompts([25])[0], SamplingParams(max_new_tokens=5))])
    assert ok.finish_reason == FINISH_LENGTH and len(ok.token_ids) == 5
    assert too_long.finish_reason == FINISH_ERROR and "25 tokens" in too_long.error and "`max_model_len` 20" in too_long.error
    exact = engine.generate([Request("exact", random_prompts([20])[0], SamplingParams(max_new_tokens=5))])[0]
    assert exact.finish_reason == FINISH_ERROR  # no room left for even one token
    edge = engine.generate([Request("edge", random_prompts([19])[0], SamplingParams(max_new_tokens=5))])[0]
    assert edge.finish_reason == FINISH_LENGTH and len(edge.token_ids) == 1


def test_a_small_cache_preempts_and_still_gives_the_same_tokens(model):
    _, loaded = model
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=30)) for i, p in enumerate(random_prompts([20, 25, 18, 22]))]
    roomy = make_engine(loaded, max_num_seqs=4).generate(reqs)
    tight = make_engine(loaded, kv_tokens=128, max_num_seqs=4, max_model_len=128)
    got = tight.generate(reqs)
    assert tight.scheduler.num_preemptions > 0
    assert [g.token_ids for g in got] == [r.token_ids for r in roomy]


def test_prompts_that_share_a_prefix_compute_it_once_and_give_what_caching_off_gives(model):
    reference, loaded = model
    system = random_prompts([40], seed=11)[0]  # 10 blocks of 4
    prompts = [system + suffix for suffix in random_prompts([6] * 8, seed=12)]
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=12)) for i, p in enumerate(prompts)]
    # A step of 46 tokens holds the first prompt alone: its blocks are registered before the others are admitted.
    cached = make_engine(loaded, max_num_seqs=8, max_num_batched_tokens=46)
    got = cached.generate(reqs)
    off = make_engine(loaded, max_num_seqs=8, max_num_batched_tokens=46, prefix_caching=False)
    want = off.generate(reqs)
    assert cached.stats.prompt_tokens == 46 + 7 * 6 and cached.scheduler.num_cached_tokens == 7 * 40
    assert off.stats.prompt_tokens == 8 * 46 and off.scheduler.num_cached_tokens == 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert got[5].token_ids == hf_greedy(reference, prompts[5], 12)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("max_new_tokens", [1, 10])
def test_n_samples_compute_the_prompt_once_and_each_samples_as_its_own_seed_alone(model, prefix_caching, max_new_tokens):
    """Samples 1..n-1 start with sample 0's full prompt blocks (10 of 4 tokens here) and compute only the last 2
    prompt tokens, caching on or off, even when sample 0 finishes in the step its prompt completes; sample i gives the
    tokens its own seed gives alone (so a (row, sample) is reproducible) and reports sample 0's prompt logprobs."""
    _, loaded = model
    prompt = random_prompts([42], seed=21)[0]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.9, seed=5, n=4, prompt_logprobs=True,
                            ignore_eos=True)
    engine = make_engine(loaded, prefix_caching=prefix_caching)
    got = engine.generate([Request("a", prompt, params)])
    assert [(c.request_id, c.sample_index) for c in got] == [("a", i) for i in range(4)]
    assert engine.stats.prompt_tokens == 42 + 3 * 2 and engine.scheduler.num_cached_tokens == 0
    alone = [make_engine(loaded).generate([Request("a", prompt, p)])[0].token_ids
             for p in [dataclasses.replace(params, n=1)] + [sample_params(params, i) for i in (1, 2, 3)]]
    assert [c.token_ids for c in got] == alone
    assert all(len(c.token_ids) == max_new_tokens for c in got)
    if max_new_tokens > 1:
        assert len({tuple(c.token_ids) for c in got}) > 1  # different seeds, different samples
    assert all(c.prompt_logprobs == got[0].prompt_logprobs and len(c.prompt_logprobs) == 42 for c in got)


def test_n_samples_under_preemption_give_what_a_roomy_cache_gives_and_a_refused_prompt_one_error(model):
    _, loaded = model
    params = SamplingParams(max_new_tokens=20, temperature=0.8, seed=9, n=3, ignore_eos=True)
    reqs = [Request(str(i), p, params) for i, p in enumerate(random_prompts([17, 22, 9], seed=23))]
    reqs.append(Request("long", random_prompts([130], seed=24)[0], params))
    roomy = make_engine(loaded, max_num_seqs=9, max_model_len=128).generate(reqs)
    tight_engine = make_engine(loaded, kv_tokens=128, max_num_seqs=9, max_model_len=128)
    tight = tight_engine.generate(reqs)
    assert tight_engine.scheduler.num_preemptions > 0
    assert [(c.request_id, c.sample_index, c.token_ids) for c in tight] == [
        (c.request_id, c.sample_index, c.token_ids) for c in roomy]
    assert [c.request_id for c in tight].count("long") == 1 and tight[-1].finish_reason == "error"
    assert len(tight) == 3 * 3 + 1


def test_a_preempted_sequence_takes_back_its_cached_blocks_and_gives_the_same_tokens(model):
    _, loaded = model
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=30)) for i, p in enumerate(random_prompts([20, 25, 18, 22]))]
    want = make_engine(loaded, max_num_seqs=4, prefix_caching=False).generate(reqs)
    tight = make_engine(loaded, kv_tokens=128, max_num_seqs=4, max_model_len=128)
    got = tight.generate(reqs)
    assert tight.scheduler.num_preemptions > 0 and tight.scheduler.num_cached_tokens > 0
    assert [g.token_ids for g in got] == [w.token_ids for w in want]


def test_projected_admission_fills_the_cache_without_preempting_and_gives_the_same_tokens(model):
    _, loaded = model
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=30)) for i, p in enumerate(random_prompts([20, 25, 18, 22, 9]))]
    roomy = make_engine(loaded, max_num_seqs=5).generate(reqs)
    tight = make_engine(loaded, kv_tokens=128, max_num_seqs=5, max_model_len=128, admission="projected")
    got = tight.generate(reqs)
    assert tight.scheduler.num_preemptions == 0
    assert [g.token_ids for g in got] == [r.token_ids for r in roomy]
    # 32 blocks of 4: two sequences at their limit (14 blocks each) fit, a third does not
    assert max(tight.stats.running_per_step) == 2




def _mixed_requests() -> list[Request]:
    """Greedy requests that end every way a decode step can: by length, on EOS, on a stop token, on a stop string."""
    ps = random_prompts([9, 14, 3, 30, 7, 21, 5, 12], seed=5)
    ends = [dict(max_new_tokens=40), dict(max_new_tokens=25), dict(max_new_tokens=33, stop_token_ids=(17, 250)),
            dict(max_new_tokens=9), dict(max_new_tokens=40, stop=("t4",)), dict(max_new_tokens=1),
            dict(max_new_tokens=30, ignore_eos=True), dict(max_new_tokens=40, temperature=0.7, seed=3)]
    return [Request(str(i), p, SamplingParams(**e)) for i, (p, e) in enumerate(zip(ps, ends))]


@pytest.mark.parametrize("setting", ["roomy", "tight cache", "max_model_len"])
def test_decode_steps_launched_ahead_give_the_same_completions(model, setting):
    """Launching each greedy decode step before the previous one's tokens are read changes nothing a user sees:
    the same tokens and finish reasons, whatever stops a sequence, with preemption, and with requests arriving
    while a step is in flight."""
    _, loaded = model
    detok = lambda ids: " ".join(f"t{t}" for t in ids)  # noqa: E731
    free = make_engine(loaded).generate([Request("probe", random_prompts([9], seed=5)[0], SamplingParams(max_new_tokens=8))])
    eos = {free[0].token_ids[6]}  # a token greedy decoding really produces, so some sequence stops on EOS
    extra = {"tight cache": dict(kv_tokens=96, max_model_len=96), "max_model_len": dict(max_model_len=40)}.get(setting, {})
    results = {}
    for overlap in (False, True):
        engine = make_engine(loaded, eos=eos, detokenize=detok, max_num_seqs=6, overlap_decode=overlap, **extra)
        reqs = _mixed_requests()
        futures = engine.add(reqs[:5])
        for _ in range(12):
            engine.step()
        futures += engine.add(reqs[5:])  # arrive mid-run, maybe while a step is in flight
        while not all(f.done() for f in futures):
            engine.step()
        results[overlap] = ([(f.result()[0].token_ids, f.result()[0].finish_reason) for f in futures], engine.stats,
                            engine.scheduler.num_preemptions)
    (sync, sync_stats, _), (ahead, ahead_stats, preemptions) = results[False], results[True]
    print(f"{setting}: {ahead_stats.steps_ahead} of {ahead_stats.steps} steps launched ahead; finish reasons "
          f"{[r for _, r in ahead]}")
    assert sync_stats.steps_ahead == 0 and ahead_stats.steps_ahead > 0
    assert ahead == sync
    assert FINISH_STOP in [r for _, r in ahead] and FINISH_LENGTH in [r for _, r in ahead]
    assert (preemptions > 0) == (setting == "tight cache")


def test_logprobs_are_the_models_own_log_softmax_at_each_token_as_transformers_computes_it(model):
    """Against transformers on the dequantized weights (float32, CPU): the chosen token's log-probability before
    temperature and top-k, and the K most likely tokens, at every step; a row without logprobs reports none."""
    reference, loaded = model
    prompts = random_prompts([7, 12], seed=3)
    asked = SamplingParams(max_new_tokens=6, temperature=0.8, top_k=5, seed=1, logprobs=3, ignore_eos=True)
    done = make_engine(loaded).generate([Request("a", prompts[0], asked),
                                         Request("b", prompts[1], SamplingParams(max_new_tokens=4))])
    got, plain = done
    assert plain.logprobs is None and plain.top_logprobs is None
    assert len(got.logprobs) == len(got.top_logprobs) == len(got.token_ids) == 6
    with torch.no_grad():
        ids = torch.tensor([prompts[0] + got.token_ids])
        ref = torch.log_softmax(reference(ids).logits[0].float(), dim=-1)
    for j, token in enumerate(got.token_ids):
        step = ref[len(prompts[0]) + j - 1]
        assert abs(got.logprobs[j] - float(step[token])) <= 1e-4
        top = torch.topk(step, 3)
        assert [t for t, _ in got.top_logprobs[j]] == top.indices.tolist()
        assert max(abs(v - w) for (_, v), w in zip(got.top_logprobs[j], top.values.tolist())) <= 1e-4


def test_prompt_logprobs_match_transformers_across_prefill_chunks_and_preemption(model):
    """Each prompt token's log-probability given the tokens before it, with the prompt prefilled in chunks of 5 and
    a cache small enough to preempt: recomputed positions are not recorded twice."""
    reference, loaded = model
    prompts = random_prompts([13, 9], seed=4)
    params = SamplingParams(max_new_tokens=20, prompt_logprobs=True, ignore_eos=True)
    engine = make_engine(loaded, kv_tokens=40, max_model_len=40, max_num_batched_tokens=5)
    done = engine.generate([Request(str(i), p, params) for i, p in enumerate(prompts)])
    assert engine.scheduler.num_preemptions > 0
    for prompt, got in zip(prompts, done):
        assert len(got.prompt_logprobs) == len(prompt) and got.prompt_logprobs[0] is None
        with torch.no_grad():
            ref = torch.log_softmax(reference(torch.tensor([prompt])).logits[0].float(), dim=-1)
        want = [float(ref[j - 1, prompt[j]]) for j in range(1, len(prompt))]
        assert max(abs(a - b) for a, b in zip(got.prompt_logprobs[1:], want)) <= 1e-4


@pytest.mark.parametrize("overlap", [False, True])
def test_penalties_and_min_tokens_give_hugging_faces_greedy_tokens_and_leave_the_batch_alone(model, overlap):
    """repetition_penalty and min_tokens through the paged engine: the same greedy tokens as transformers'
    ``generate(repetition_penalty=..., min_new_tokens=...)`` on the dequantized model; an unpenalised row in the same
    batch gets the tokens it gets alone. With decode steps launched ahead, penalised rows are too (their counts are
    updated on the device), with the same tokens."""
    reference, loaded = model
    prompts = random_prompts([9, 23, 14], seed=7)
    plain = hf_greedy(reference, prompts[2], 12)
    eos = plain[1]  # greedy would stop after one token: min_tokens must hold it off
    ids = lambda p: torch.tensor([p])  # noqa: E731

    def hf(prompt, **kw):
        with torch.no_grad():
            out = reference.generate(ids(prompt), attention_mask=torch.ones_like(ids(prompt)), max_new_tokens=12,
                                     do_sample=False, pad_token_id=reference.config.vocab_size - 1, **kw)
        return out[0, len(prompt):].tolist()

    engine = make_engine(loaded, eos={eos}, overlap_decode=overlap)
    reqs = [Request("rep", prompts[0], SamplingParams(max_new_tokens=12, repetition_penalty=1.5)),
            Request("plain", prompts[1], SamplingParams(max_new_tokens=12, ignore_eos=True)),
            Request("min", prompts[2], SamplingParams(max_new_tokens=12, min_tokens=6))]
    rep, alone, early = engine.generate(reqs)
    completion = lambda out: out[:-1] if out and out[-1] == eos else out  # noqa: E731 (EOS is not in a completion)
    assert rep.token_ids == completion(hf(prompts[0], repetition_penalty=1.5, eos_token_id=eos))
    assert rep.token_ids != hf_greedy(reference, prompts[0], 12)[: len(rep.token_ids)]  # the penalty mattered
    assert early.token_ids == completion(hf(prompts[2], min_new_tokens=6, eos_token_id=eos))
    assert len(early.token_ids) >= 6 and eos not in early.token_ids
    assert alone.token_ids == hf_greedy(reference, prompts[1], 12)
    assert (engine.stats.steps_ahead > 0) == overlap


def test_out_of_memory_in_a_step_fails_every_request_naming_the_settings_to_lower_and_never_hangs(model, monkeypatch):
    """What a CUDA OOM inside a step does (simulated: the runner raises torch's OutOfMemoryError): the serving loop
    fails every waiting request with a message naming what to lower, and stops; nothing waits forever."""
    import threading

    _, loaded = model
    engine = make_engine(loaded, max_num_batched_tokens=512)

    def oom(step):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(engine.runner, "execute", oom)
    with pytest.raises(RuntimeError, match=r"out of GPU memory in an engine step \(CUDA out of memory. Tried to "
                                           r"allocate 20.00 GiB\); lower `max_num_batched_tokens` \(now 512\)"):
        engine.generate([Request("a", random_prompts([5])[0], SamplingParams(max_new_tokens=3))])
    served = make_engine(loaded)
    monkeypatch.setattr(served.runner, "execute", oom)
    futures = served.add([Request(str(i), p, SamplingParams(max_new_tokens=3)) for i, p in
                          enumerate(random_prompts([5, 9]))])
    stop = threading.Event()
    loop = threading.Thread(target=lambda: pytest.raises(torch.OutOfMemoryError, served.run_forever, stop))
    loop.start()
    loop.join(timeout=30)
    assert not loop.is_alive()
    for f in futures:
        with pytest.raises(RuntimeError, match="engine failed: out of GPU memory in an engine step"):
            f.result(timeout=1)


def test_a_step_that_never_ends_shows_as_a_stall_while_an_idle_engine_shows_none(model, monkeypatch):
    """The health check's view of a rank hung in a collective: the step does not return, the actor still answers,
    and the engine's stall grows (Replica.check_alive rebuilds the replica past ``step_timeout_s``)."""
    import threading
    import time

    _, loaded = model
    engine = make_engine(loaded)
    assert engine.stalled_s() == 0.0
    release = threading.Event()
    execute = engine.runner.execute
    monkeypatch.setattr(engine.runner, "execute", lambda step: (release.wait(), execute(step))[1])
    engine.add([Request("a", random_prompts([5])[0], SamplingParams(max_new_tokens=2))])
    stuck = threading.Thread(target=engine.step, daemon=True)
    stuck.start()
    time.sleep(0.5)
    assert engine.stalled_s() >= 0.4
    release.set()
    stuck.join(timeout=30)
    assert engine.stalled_s() < 0.4  # a step ended: progress again
