"""The scheduler on its own (no model): what each step runs, admission, preemption and refusals."""

import pytest

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.scheduler import Scheduler
from shardgen.actors.engine.sequence import FINISH_ERROR, Request, SamplingParams, Sequence, Status


def seq(name: str, prompt_len: int, max_new_tokens: int = 8) -> Sequence:
    return Sequence(Request(name, list(range(1, prompt_len + 1)), SamplingParams(max_new_tokens=max_new_tokens)))


def scheduler(num_blocks: int, max_model_len: int, *seqs: Sequence, **config) -> Scheduler:
    """A scheduler of blocks of 4 tokens with ``seqs`` waiting."""
    sched = Scheduler(EngineConfig(**{"block_size": 4, "max_num_seqs": 8, "max_num_batched_tokens": 100, **config}),
                      num_blocks, max_model_len)
    for s in seqs:
        sched.add(s)
    return sched


def run_step(scheduler: Scheduler, batch) -> None:
    """What the engine does after a step: the scheduled tokens are computed; a sequence that reached its last token
    gets a new one."""
    for i, s in enumerate(batch.seqs):
        sampled = batch.samples(i)
        s.num_computed += batch.num_tokens[i]
        if sampled:
            s.tokens.append(7)


def test_decodes_come_first_then_prompt_chunks_fill_the_token_budget():
    a, b = seq("a", 6), seq("b", 12)
    sched = scheduler(64, 64, a, b, max_num_batched_tokens=10)
    batch, refused = sched.schedule()
    assert not refused and batch.seqs == [a, b] and batch.num_tokens == [6, 4]  # b's prompt is chunked
    assert batch.samples(0) and not batch.samples(1)
    run_step(sched, batch)
    batch, _ = sched.schedule()
    assert batch.seqs == [a, b] and batch.num_tokens == [1, 8]  # a decodes, b's prompt goes on
    assert len(a.block_table) == 2 and len(b.block_table) == 3  # blocks of 4 for what is computed this step


def test_max_num_seqs_caps_the_running_sequences():
    seqs = [seq(str(i), 3) for i in range(3)]
    sched = scheduler(64, 64, *seqs, max_num_seqs=2)
    batch, _ = sched.schedule()
    assert batch.seqs == seqs[:2] and list(sched.waiting) == [seqs[2]]


def test_when_the_cache_runs_out_the_newest_sequence_is_preempted_and_recomputed_later():
    a, b = seq("a", 8), seq("b", 8)
    sched = scheduler(4, 16, a, b)
    batch, _ = sched.schedule()
    assert batch.seqs == [a, b] and not sched.blocks.free  # 2 blocks each: the cache is full
    run_step(sched, batch)
    batch, _ = sched.schedule()  # a needs a third block for its 9th token: b goes
    assert batch.seqs == [a] and sched.num_preemptions == 1
    assert b.status == Status.WAITING and b.num_computed == 0 and b.block_table == [] and sched.waiting[0] is b


def test_projected_admission_waits_until_the_cache_can_hold_every_sequence_at_its_limit():
    a, b = seq("a", 4, max_new_tokens=12), seq("b", 4, max_new_tokens=12)  # 16 tokens at the end: 4 blocks each
    sched = scheduler(6, 24, a, b, admission="projected")
    batch, _ = sched.schedule()
    assert batch.seqs == [a] and list(sched.waiting) == [b]  # greedy admission would take both and preempt later


def test_a_prompt_that_leaves_no_room_to_generate_is_refused_as_an_error():
    long, ok = seq("long", 16), seq("ok", 5)
    sched = scheduler(64, 16, long, ok)
    batch, refused = sched.schedule()
    assert refused == [long] and batch.seqs == [ok]
    assert long.finish_reason == FINISH_ERROR and "16 tokens" in long.error and "`max_model_len` 16" in long.error


def test_a_cache_smaller_than_one_sequence_is_refused():
    with pytest.raises(ValueError, match=r"the KV cache holds 32 tokens \(8 blocks of 4\), less than one sequence of "
                                         r"`max_model_len` 64"):
        Scheduler(EngineConfig(block_size=4), 8, 64)


def test_a_decode_step_is_planned_ahead_only_when_schedule_could_not_decide_otherwise():
    a = seq("a", 4)
    sched = scheduler(3, 12, a)
    batch, _ = sched.schedule()
    run_step(sched, batch)
    ahead = sched.plan_decode_ahead([a])
    assert ahead is not None and ahead.num_tokens == [1] and len(a.block_table) == 2
    sched.add(seq("b", 2))
    assert sched.plan_decode_ahead([a]) is None  # a waiting sequence may be admitted instead
