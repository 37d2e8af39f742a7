"""fp8 activations x int4 weights (actors/int4/w4a8.py) and their byte layout (int4.pack_fp8act), on CPU: the layout
keeps every nibble; the kernels, run by Triton's interpreter in float32, compute exactly the fp8 rows times the
dequantized weight. tests/actors/int4/test_w4a8_cuda.py runs them compiled."""

import pytest
import torch

from shardgen.actors import int4
from tests.helpers import in_triton_interpreter


@pytest.mark.parametrize("shape,group_size", [((40, 256), 64), ((64, 512), 128), ((8, 1024), 256)])
def test_pack_fp8act_keeps_every_nibble_scale_and_zero_point(shape, group_size):
    torch.manual_seed(0)
    plain = int4.quantize(torch.randn(shape), group_size)
    packed, scale, zero = int4.pack_fp8act(plain)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2) and packed.is_contiguous()
    assert torch.equal(int4.unpack_fp8act(packed), int4.unpack(plain.qdata))
    assert torch.equal(scale, plain.scale) and torch.equal(zero, plain.zero_point)


def test_pack_fp8act_refuses_k_that_is_not_a_multiple_of_128():
    with pytest.raises(ValueError, match="multiple of 128"):
        int4.pack_fp8act(int4.quantize(torch.randn(8, 192), 64))


def test_a_nibble_alone_in_a_byte_is_the_e4m3_number_u_times_2_to_the_minus_9():
    u = torch.arange(16, dtype=torch.uint8)
    assert torch.equal(u.view(torch.float8_e4m3fn).float() * 512, u.float())


def test_quantize_rows_scales_each_row_to_the_e4m3_range_and_sums_runs_of_64():
    from shardgen.actors.int4 import w4a8

    x = torch.randn(3, 256) * torch.tensor([[1.0], [100.0], [0.0]])
    got = w4a8.quantize_rows(x)
    assert got.q.dtype == w4a8.FP8 and got.scale.shape == (3,) and got.sums.shape == (3, 4)
    assert got.q[:2].float().abs().amax(dim=1).tolist() == [448.0, 448.0]
    assert not got.q[2].float().any()
    torch.testing.assert_close(got.sums, got.q.float().reshape(3, 4, 64).sum(-1))
    torch.testing.assert_close(got.dequantize()[:2], x[:2], rtol=0.07, atol=1e-6)  # e4m3: 3 mantissa bits


def kernel_vs_reference() -> dict[str, float]:
    """Relative error of every candidate-like config (tiles, K steps, splits; partial tiles in M and N) against the
    kernel's own fp8 rows times the dequantized weight, float32."""
    from shardgen.actors.int4 import w4a8

    errors = {}
    for (n, k), g in (((72, 256), 64), ((40, 512), 128), ((64, 1024), 256)):
        torch.manual_seed(n)
        plain = int4.quantize(torch.randn(n, k) * 0.02 + 0.01, g)
        packed = int4.pack_fp8act(plain)
        ref_w = int4.dequantize(plain, torch.float32)
        for m in (1, 5, 20):
            x = w4a8.quantize_rows(torch.randn(m, k))
            want = x.q.float() * x.scale[:, None] @ ref_w.t()
            for cfg in (w4a8.Fp8Config(16, 32, 128), w4a8.Fp8Config(16, 64, 256), w4a8.Fp8Config(16, 32, 128, 2),
                        w4a8.Fp8Config(32, 64, 128, 4)):
                if cfg.fits(m, n, k):
                    got = w4a8.linear(x, *packed, g, cfg)
                    errors[f"{cfg.name()} {n}x{k} G={g} M={m}"] = float((got - want).norm() / want.norm())
    return errors


def test_w4a8_kernel_matches_fp8_rows_times_the_dequantized_weight_in_triton_interpreter():
    pytest.importorskip("triton")
    errors = in_triton_interpreter("import json; from tests.actors.int4.test_w4a8 import kernel_vs_reference; "
                                   "print(json.dumps(kernel_vs_reference()))")
    print(errors)
    assert len(errors) == 3 * 3 * 4 - 3, errors  # K = 256 has no split of 4 x 128
    assert max(errors.values()) < 1e-5, errors
