"""The fused kernels compiled for the GPU, in bf16, against their PyTorch code on the same GPU."""

import pytest
import torch

from tests.actors.kernels.test_fused_ops import fp8_store_vs_torch, fused_vs_torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")


def test_fused_kernels_match_pytorch_in_bfloat16_on_the_gpu():
    errors = fused_vs_torch(torch.bfloat16, "cuda")
    print(errors)
    assert len(errors) == 6 and max(errors.values()) < 1e-2, errors  # bf16 rounds at 2^-8 of a value
    assert errors["store_kv"] == 0.0  # a copy: bit-exact


def test_fused_kernels_match_pytorch_in_float32_on_the_gpu():
    errors = fused_vs_torch(torch.float32, "cuda")
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_store_into_an_fp8_cache_matches_pytorch_on_the_gpu(dtype):
    """Each value to within e4m3's rounding of its own head's range (half a step of 32 at 448: 16/448 = 3.6%), and
    as PyTorch rounds it except for rare ties (the kernel's division is not IEEE-rounded)."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability 8.9+")
    errors = fp8_store_vs_torch(dtype, "cuda")
    print(errors)
    assert errors["scales"] < 1e-6 and errors["differing"] < 0.01 and errors["vs_input"] <= 16 / 448 + 1e-3, errors
