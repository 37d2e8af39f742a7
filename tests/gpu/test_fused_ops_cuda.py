"""The fused kernels compiled for the GPU, in bf16, against their PyTorch code on the same GPU."""

import pytest
import torch

from tests.actors.test_fused_ops import fused_vs_torch

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
