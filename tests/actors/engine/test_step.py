"""A step's journey from rank 0 to the other ranks (actors/engine/step.py): packed into a header and one buffer,
unpacked equal, and broadcast for real between two gloo processes."""

import traceback
from pathlib import Path

import torch

from shardgen.actors.engine import step as wire
from shardgen.actors.engine.step import StepInput
from shardgen.actors.model.attention import StepParts
from shardgen.actors.model.distributed import destroy_tp_group, free_port, init_tp_group
from tests.helpers import run_ranks


def mixed_step() -> StepInput:
    """Two decodes, a chunk over cached tokens, two uncached prompts; one sequence asked for prompt logprobs."""
    q_lens, cached = [1, 1, 5, 3, 4], [9, 20, 16, 0, 0]
    tokens = sum(q_lens)
    ctx = [q + c for q, c in zip(q_lens, cached)]
    return StepInput(torch.arange(100, 100 + tokens), torch.arange(tokens) * 3,
                     torch.tensor([0, 1, 2, 7, 10, 14], dtype=torch.int32), torch.tensor(ctx, dtype=torch.int32),
                     torch.arange(tokens) + 1000, torch.arange(15, dtype=torch.int32).view(5, 3),
                     max(q_lens), max(ctx), torch.tensor([0, 1, 6, 9, 13, 10, 11]),
                     StepParts.of(q_lens, cached), ((3, 0, 2),))


def assert_same(a: StepInput, b: StepInput) -> None:
    for name in ("input_ids", "positions", "cu_seqlens_q", "context_lens", "slot_mapping", "block_tables",
                 "logits_indices"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert (a.max_q_len, a.max_context_len, a.parts, a.prompt_rows) == (b.max_q_len, b.max_context_len, b.parts,
                                                                        b.prompt_rows)


def test_a_step_packed_and_unpacked_is_the_same_step():
    for step in (mixed_step(), StepInput.prefill([3, 7, 1], 4)):
        header, buffer = wire.pack(step)
        assert header.shape == (wire.HEADER,)
        assert_same(wire.unpack(header.tolist(), buffer), step)


def test_a_decode_step_needs_nothing_on_the_followers_host_but_its_header():
    step = StepInput.prefill([1, 1, 1], 16)
    step.parts = None
    header, buffer = wire.pack(step)
    sizes = 3 * 3 + 2 * 3 + 1 + 3 * 1 + 3
    assert buffer.numel() == sizes  # no host tail: only the header is copied to a follower's host
    assert_same(wire.unpack(header.tolist(), buffer), step)


def _rank_main(rank: int, port: int, out: str) -> None:
    try:
        init_tp_group(rank, 2, f"127.0.0.1:{port}", "cpu", timeout_s=60)
        cpu = torch.device("cpu")
        if rank == 0:
            wire.send_signal(wire.NOOP, cpu)
            wire.send(mixed_step(), cpu)
            wire.send(StepInput.prefill([2, 5], 4), cpu)
            wire.send_signal(wire.STOP, cpu)
        else:
            got = []
            while (step := wire.receive(cpu)) != wire.STOP:
                got.append(step)
            torch.save(got, Path(out) / "received.pt")
        destroy_tp_group()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def test_rank_0s_steps_reach_a_follower_over_gloo_in_order_until_stop(tmp_path):
    run_ranks(_rank_main, 2, tmp_path, free_port(), str(tmp_path), timeout=120)
    got = torch.load(tmp_path / "received.pt", weights_only=False)
    assert got[0] == wire.NOOP and len(got) == 3
    assert_same(got[1], mixed_step())
    assert_same(got[2], StepInput.prefill([2, 5], 4))
