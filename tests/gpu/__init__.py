"""Tests that need a CUDA GPU with fbgemm-gpu-genai; each module skips itself elsewhere."""

import pytest
import torch


def require_gpu_kernels() -> None:
    """Skip the calling test module unless a CUDA GPU and fbgemm-gpu-genai are present."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401
    except ImportError:
        pytest.skip("needs fbgemm-gpu-genai (pip install shardgen[gpu])", allow_module_level=True)
