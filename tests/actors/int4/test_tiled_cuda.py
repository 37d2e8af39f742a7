"""shardgen's Triton int4 kernels on the GPU against the dequantized plain int4 weight through cuBLAS.

Both sides use the same bf16 weight (the kernels dequantize exactly as ``int4.dequantize`` does, then round to
bf16), so the only difference is the order of the fp32 sums: relative error ~1e-3 with bf16 outputs. The tolerance
2e-2 passes that and fails any wrong nibble, group or split (errors >= 0.1).
"""

import pytest
import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from shardgen.actors import int4
from shardgen.actors.int4 import kernel_choice, tiled
from tests.helpers import require_gpu_kernels

pytestmark = pytest.mark.gpu
require_gpu_kernels()

TOL = 2e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tiled_weight(n: int, k: int, group_size: int, seed: int = 0):
    torch.manual_seed(seed)
    w = (torch.randn(n, k, device="cuda") * 0.02 + torch.randn(n, 1, device="cuda") * 0.01).to(torch.bfloat16)
    plain = int4.quantize(w, group_size)
    return plain, int4.pack_tiled(plain), int4.dequantize(plain, torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("group_size", [64, 128, 256])
def test_dequantize_into_gives_the_plain_weight_within_one_bf16_rounding(group_size):
    """The kernel computes q * s + z as f * 16s + (z - 24s) in one FMA: the fp32 value differs from
    int4.dequantize's by at most a few fp32 steps of 24|s| (the terms cancel for weights near zero), so a bf16
    weight may differ by one rounding step, or by that absolute error where it is tiny; never by a nibble."""
    plain, (words, scale, zero), ref = tiled_weight(300, 1024, group_size)
    out = torch.empty(1024, 300, device="cuda", dtype=torch.bfloat16)
    tiled.dequantize_into(words, scale, zero, group_size, out)
    diff = (out.t().float() - ref.float()).abs()
    s = plain.scale.float().abs().repeat_interleave(group_size, dim=0).t()  # (N, K)
    assert (diff <= ref.float().abs() * 2**-7 + 24 * s * 2**-21).all()
    assert (diff < s / 4).all()  # a wrong nibble is off by a whole scale
    assert (diff == 0).float().mean() > 0.99


@pytest.mark.parametrize("m", [1, 3, 40, 300])
@pytest.mark.parametrize("shape,group_size", [((1000, 1024), 128), ((256, 2048), 64), ((4096, 1536), 256)])
def test_every_candidate_config_matches_cublas_on_the_dequantized_weight(m, shape, group_size):
    n, k = shape
    plain, (words, scale, zero), ref = tiled_weight(n, k, group_size, seed=m)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    want = F.linear(x, ref)
    scratch = torch.empty(n * k, device="cuda", dtype=torch.bfloat16)
    # One config of each kernel and split factor (compiling all candidates takes minutes; the bench runs them all).
    configs = list({(c.kernel, c.split_k, c.chunk): c for c in kernel_choice.candidates(m, n, k)}.values())
    assert configs, "no config fits"
    errors, too_large = {}, []
    for c in configs:
        try:
            errors[c.name()] = rel(tiled.linear(x, words, scale, zero, group_size, c, scratch), want)
        except OutOfResources:  # a tile too large for this GPU (G < BLOCK_K loads a scale per weight); never chosen
            too_large.append(c.name())
    assert {c.kernel for c in configs} == {n.split("-")[0].replace("dequant+cublas", "dequant") for n in errors}, \
        (errors, too_large)
    assert max(errors.values()) < TOL, errors
