"""How the int4 kernel config of a linear is looked up by rows (actors/int4/kernel_choice.py); the timing itself runs on
the GPU (benchmarks/int4_decode_gemm.py, tests/actors/int4/test_tiled_cuda.py)."""

from dataclasses import asdict

import pytest
import torch

from shardgen.actors.int4.tiled import KernelConfig
from shardgen.actors.int4.kernel_choice import KernelChoice, candidates

GEMV = KernelConfig("gemv", block_n=64, block_k=256, chunk=128)
DOT = KernelConfig("dot", block_m=16, block_n=128, block_k=256)
DOTK = KernelConfig("dotk", block_m=64, block_n=128, block_k=128)


def choice_with(table: dict[str, KernelConfig], n: int = 4096, k: int = 4096) -> KernelChoice:
    choice = KernelChoice(torch.device("cpu"))
    choice.tables[f"{n}x{k}/g128"] = {m: asdict(c) for m, c in table.items()}
    return choice


def test_rows_run_the_config_measured_at_the_next_row_count_up():
    choice = choice_with({"1": GEMV, "16": DOT, "256": DOTK})
    assert choice.config(1, 4096, 4096, 128) == GEMV
    assert choice.config(5, 4096, 4096, 128) == DOT
    assert choice.config(16, 4096, 4096, 128) == DOT
    assert choice.config(200, 4096, 4096, 128) == DOTK


def test_more_rows_than_any_table_entry_dequantize_for_cublas():
    assert choice_with({"1": GEMV, "256": DOTK}).config(8192, 4096, 4096, 128).kernel == "dequant"


def test_a_config_that_cannot_take_the_rows_gives_way_to_the_next_one_up():
    # gemv takes at most 8 rows: measured best at 16 on some GPU, it must not run 12.
    assert choice_with({"16": GEMV, "64": DOTK}).config(12, 4096, 4096, 128) == DOTK


@pytest.mark.parametrize("m", [1, 16, 64, 128, 256, 2048])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)])
def test_every_candidate_fits_its_shape_and_small_m_gets_every_kernel(m, n, k):
    configs = candidates(m, n, k)
    assert configs and all(c.fits(m, n, k) for c in configs)
    kinds = {c.kernel for c in configs}
    want = {"gemv", "dot", "dotk"} if m == 1 else {"dot", "dotk", "dequant"} if 64 <= m <= 512 else kinds
    assert want <= kinds, (m, kinds)
