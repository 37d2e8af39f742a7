"""shardgen's Triton int4 kernels on the tiled layout, run on CPU by Triton's interpreter, in float32 (the
interpreter truncates where the GPU rounds to bf16); tests/gpu/test_int4_kernels_cuda.py runs them compiled."""

import json
import os
import subprocess
import sys

import pytest
import torch

from actors import int4

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.mark.parametrize("shape,group_size", [((40, 256), 64), ((64, 512), 128), ((8, 1024), 256)])
def test_pack_tiled_keeps_every_nibble_scale_and_zero_point(shape, group_size):
    torch.manual_seed(0)
    plain = int4.quantize(torch.randn(shape), group_size)
    words, scale, zero = int4.pack_tiled(plain)
    assert words.dtype == torch.int32 and words.shape == (shape[1] // 8, shape[0]) and words.is_contiguous()
    assert torch.equal(int4.unpack_tiled(words), int4.unpack(plain.qdata))
    assert torch.equal(scale, plain.scale) and torch.equal(zero, plain.zero_point)


def test_pack_tiled_refuses_k_that_is_not_a_multiple_of_64():
    plain = int4.quantize(torch.randn(8, 96), 32)
    with pytest.raises(ValueError, match="multiple of 64"):
        int4.pack_tiled(plain)


def kernels_vs_reference() -> dict[str, float]:
    """Relative error of every kernel (gemv, dot, dequantize + matmul; with and without split-K) against the
    dequantized weight, float32 activations."""
    from actors import int4_kernels as K

    errors = {}
    for (n, k), g in (((40, 256), 64), ((72, 512), 128)):
        torch.manual_seed(n)
        plain = int4.quantize(torch.randn(n, k) * 0.02, g)
        words, scale, zero = int4.pack_tiled(plain)
        ref_w = int4.dequantize(plain, torch.float32)
        d = K.dequantize_into(words, scale, zero, g, torch.empty(k, n))
        errors[f"dequantize {n}x{k}"] = float((d - ref_w.t()).abs().max())
        for m in (1, 3, 20):
            x = torch.randn(m, k)
            want = x @ ref_w.t()
            for cfg in (K.KernelConfig("gemv", block_n=32, block_k=128, chunk=64, split_k=2),
                        K.KernelConfig("gemv", block_n=16, block_k=256, chunk=128),
                        K.KernelConfig("dot", block_m=16, block_n=32, block_k=128, split_k=2),
                        K.KernelConfig("dot", block_m=16, block_n=64, block_k=256), K.KernelConfig("dequant")):
                if cfg.fits(m, n, k):
                    got = K.linear(x, words, scale, zero, g, cfg, torch.empty(n * k))
                    errors[f"{cfg.name()} {n}x{k} M={m}"] = float((got - want).norm() / want.norm())
    return errors


def test_int4_kernels_match_the_dequantized_weight_in_triton_interpreter():
    pytest.importorskip("triton")
    code = ("import json; from tests.actors.test_int4_kernels import kernels_vs_reference; "
            "print(json.dumps(kernels_vs_reference()))")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    print(errors)
    assert len(errors) == 2 * (1 + 5 + 5 + 3), errors  # per shape: dequantize, 5 configs at M=1 and 3, gemv not at M=20
    assert max(errors.values()) < 1e-5, errors
