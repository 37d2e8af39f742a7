"""The arithmetic of humming's int4 layouts that runs without a GPU: how a plain weight's zero point becomes
humming's, and when the layouts are offered. The kernels themselves are checked in test_int4_cuda.py."""

import pytest
import torch

from shardgen.actors import int4
from shardgen.actors.int4 import humming


def test_the_float_zero_point_gives_back_the_plain_weight():
    torch.manual_seed(0)
    t = int4.quantize(torch.randn(64, 256) * 0.05 + 0.01, 128)
    zp = humming.float_zero_point(t, torch.float32)  # (N, K/G), humming's orientation
    u = int4.unpack(t.qdata).float() + 8
    rebuilt = (u - zp.repeat_interleave(128, dim=1)) * t.scale.t().float().repeat_interleave(128, dim=1)
    torch.testing.assert_close(rebuilt, int4.dequantize(t), rtol=0, atol=1e-5)


def test_in_bf16_the_zero_point_is_off_by_at_most_a_rounding_of_its_own():
    """What the kernel sees: zp rounded to bf16 moves the weight by at most half a bf16 step of zp, times s."""
    torch.manual_seed(1)
    t = int4.quantize((torch.randn(256, 512) * 0.05).to(torch.bfloat16), 128)
    exact = humming.float_zero_point(t, torch.float32)
    rounded = humming.float_zero_point(t, torch.bfloat16).float()
    step = 2.0 ** (torch.floor(torch.log2(exact.abs())) - 7)  # bf16 keeps 8 significant bits
    assert ((rounded - exact).abs() <= step / 2 + 1e-7).all()


def test_the_humming_layouts_are_not_offered_on_the_cpu():
    assert not humming.available(torch.device("cpu"))
    for layout in (*int4.HUMMING_LAYOUTS, int4.LAYOUT_DUAL):
        with pytest.raises(ValueError, match=f"`int4_layout` {layout} runs on CUDA GPUs"):
            int4.hardware_layout("cpu", layout)


def test_a_model_dtype_other_than_bfloat16_is_refused_with_what_to_change():
    with pytest.raises(ValueError, match="run bfloat16 models.*`dtype` bfloat16"):
        humming.HummingRuntime(torch.device("cpu"), None, fp8_activations=False, dtype=torch.float16)


def _humming_weight(t, dtype=torch.bfloat16) -> torch.Tensor:
    """What humming's W4A16 multiplies (N, K): ``(u - zp) * s`` with zp in ``dtype`` and ``u - zp`` rounded to it."""
    u = int4.unpack(t.qdata).float() + 8
    zp = humming.float_zero_point(t, dtype).float().repeat_interleave(128, dim=1)
    return (u - zp).to(dtype).float() * t.scale.t().float().repeat_interleave(128, dim=1)


def test_the_zero_point_rounding_is_exactly_what_moves_the_weight():
    torch.manual_seed(2)
    t = int4.quantize((torch.randn(64, 256) * 0.05).to(torch.bfloat16), 128)
    rounding = humming.zero_point_rounding(t, torch.bfloat16).float()  # (K/G, N)
    u = int4.unpack(t.qdata).float() + 8
    zp = humming.float_zero_point(t, torch.bfloat16).float().repeat_interleave(128, dim=1)
    moved = (u - zp) * t.scale.t().float().repeat_interleave(128, dim=1) - int4.dequantize(t)
    torch.testing.assert_close(-moved, rounding.t().repeat_interleave(128, dim=1), rtol=1e-2, atol=1e-7)


def test_the_group_sums_correction_brings_inputs_of_one_sign_back_to_bf16_accuracy():
    """After a ReLU every input of a group has one sign: the bf16 zero point's offset adds up over the group's 128
    products, several times bf16's error; corrected by group_sums(x) @ rounding it is back near bf16's."""
    torch.manual_seed(3)
    t = int4.quantize((torch.randn(512, 2048) * 0.02).to(torch.bfloat16), 128)
    x = torch.relu(torch.randn(16, 2048)).to(torch.bfloat16).double()
    exact = x @ int4.dequantize(t).double().t()
    rel = lambda y: ((y - exact).norm() / exact.norm()).item()  # noqa: E731
    bf16 = rel(x @ int4.dequantize(t).to(torch.bfloat16).double().t())
    kernel = x @ _humming_weight(t).double().t()
    sums = humming.group_sums(x.to(torch.bfloat16), 128).double()
    corrected = kernel + sums @ humming.zero_point_rounding(t, torch.bfloat16).double()
    assert rel(kernel) > 4 * bf16
    assert rel(corrected) < 2 * bf16
