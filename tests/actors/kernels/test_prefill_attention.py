"""How a step's uncached sequences are split between FlashAttention and cuDNN launches (the kernels themselves run
in tests/actors/kernels/test_attention_cuda.py)."""

import torch

from shardgen.actors.kernels.prefill_attention import CUDNN_LENGTH_STEP, CUDNN_MIN_TOKENS, PrefillLaunch, cudnn_supports, plan_launches

LONG = CUDNN_MIN_TOKENS


def test_short_sequences_share_one_flash_launch():
    assert plan_launches([5, 300, 1000], use_cudnn=True) == [PrefillLaunch("flash", 0, 3, 1000)]


def test_each_long_sequence_gets_its_own_cudnn_launch_padded_to_the_length_step():
    padded = -(-(LONG + 1) // CUDNN_LENGTH_STEP) * CUDNN_LENGTH_STEP
    assert plan_launches([4096, LONG + 1], use_cudnn=True) == [
        PrefillLaunch("cudnn", 0, 1, 4096), PrefillLaunch("cudnn", 1, 2, padded)]
    assert padded % CUDNN_LENGTH_STEP == 0 and LONG + 1 <= padded < LONG + 1 + CUDNN_LENGTH_STEP


def test_runs_of_short_sequences_between_long_ones_keep_their_order():
    assert plan_launches([7, 9, 4096, 3, LONG, 11], use_cudnn=True) == [
        PrefillLaunch("flash", 0, 2, 9), PrefillLaunch("cudnn", 2, 3, 4096), PrefillLaunch("flash", 3, 4, 3),
        PrefillLaunch("cudnn", 4, 5, -(-LONG // CUDNN_LENGTH_STEP) * CUDNN_LENGTH_STEP), PrefillLaunch("flash", 5, 6, 11)]


def test_without_cudnn_everything_is_one_flash_launch():
    assert plan_launches([4096, 7, 8192], use_cudnn=False) == [PrefillLaunch("flash", 0, 3, 8192)]


def test_cpus_and_sliding_windows_never_take_cudnn():
    q = torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    assert not cudnn_supports(q, None)
    assert not cudnn_supports(q, 128)
