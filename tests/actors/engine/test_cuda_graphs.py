"""Which batch sizes get a CUDA graph of their own (the graphs themselves run in test_engine_cuda.py)."""

import pytest

from shardgen.actors.engine.cuda_graphs import batch_buckets


@pytest.mark.parametrize("max_num_seqs,buckets", [
    (1, [1]), (3, [1, 2, 3]), (8, [1, 2, 4, 8]), (16, [1, 2, 4, 8, 16]), (40, [1, 2, 4, 8, 16, 32, 40]),
    (256, [1, 2, 4, 8, *range(16, 257, 16)]),
])
def test_buckets_are_small_powers_of_two_then_multiples_of_16_up_to_the_engines_limit(max_num_seqs, buckets):
    assert batch_buckets(max_num_seqs) == buckets


def test_every_batch_size_has_a_bucket_at_most_15_rows_larger():
    buckets = batch_buckets(256)
    for n in range(1, 257):
        fit = min(b for b in buckets if b >= n)
        assert fit - n < 16
