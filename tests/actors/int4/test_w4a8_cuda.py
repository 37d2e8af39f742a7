"""shardgen's W4A8 kernels (actors/int4/w4a8.py) on the GPU: the per-token fp8 quantization against its PyTorch form, and
the GEMM against the same fp8 rows times the dequantized int4 weight in float32.

The GEMM computes exactly that product (fp8 x fp8 products are exact, the group sums are float32) up to the order
of float32 sums and the final bf16 rounding: relative error ~2e-3. The tolerance 1e-2 fails any wrong nibble,
half-block, group scale, zero-point term, tile edge or split (errors >= 5e-2)."""

import pytest
import torch
from triton.runtime.errors import OutOfResources

from shardgen.actors import int4
from shardgen.actors.int4 import w4a8
from tests.helpers import require_gpu_kernels

pytestmark = pytest.mark.gpu
require_gpu_kernels()

TOL = 1e-2


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("m,k", [(1, 4096), (37, 14336), (300, 1024)])
def test_quantize_rows_equals_its_pytorch_form_bit_for_bit(m, k):
    torch.manual_seed(m)
    x = (torch.randn(m, k, device="cuda") * torch.rand(m, 1, device="cuda") * 10).to(torch.bfloat16)
    x[0, :7] = 0  # zeros and a row's own maximum stay exact
    got = w4a8.quantize_rows(x)
    want = w4a8._quantize_rows_torch(x.reshape(m, k), x.shape, x.dtype)
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))
    assert torch.equal(got.scale, want.scale)
    torch.testing.assert_close(got.sums, want.sums, rtol=1e-6, atol=1e-3)


def test_a_row_of_zeros_quantizes_to_zeros():
    got = w4a8.quantize_rows(torch.zeros(2, 256, device="cuda", dtype=torch.bfloat16))
    assert not got.q.float().any() and torch.isfinite(got.scale).all()


@pytest.mark.parametrize("n,k,group_size", [(300, 1024, 64), (6144, 4096, 128), (4096, 14336, 128), (200, 2048, 256)])
@pytest.mark.parametrize("m", [1, 77, 300, 1000])
def test_w4a8_linear_equals_fp8_rows_times_the_dequantized_weight(n, k, group_size, m):
    torch.manual_seed(n + m)
    w = (torch.randn(n, k, device="cuda") * 0.02 + torch.randn(n, 1, device="cuda") * 0.01).to(torch.bfloat16)
    plain = int4.quantize(w, group_size)
    packed = int4.pack_fp8act(plain)
    assert torch.equal(int4.unpack_fp8act(packed[0]), int4.unpack(plain.qdata))
    x = w4a8.quantize_rows(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    want = x.q.float() * x.scale[:, None] @ int4.dequantize(plain, torch.float32).t()
    configs = w4a8.candidates(m, n, k)
    assert configs, (m, n, k)
    checked = 0
    for cfg in configs[:: max(1, len(configs) // 3)]:  # a spread of tiles, K steps and splits (each one compiles)
        try:
            got = w4a8.linear(x, *packed, group_size, cfg)
        except OutOfResources:
            continue
        assert got.dtype == torch.bfloat16 and got.shape == (m, n)
        assert rel(got, want) < TOL, (cfg.name(), rel(got, want))
        checked += 1
    assert checked
