import pytest
import torch
from torch import nn

from shardgen.actors import int4


# fbgemm_gpu.experimental.gen_ai.quantize (fbgemm-gpu-genai 1.6.0), copied verbatim as the
# independent reference: fbgemm itself cannot load without CUDA.
def fbgemm_pack_int4(x: torch.Tensor) -> torch.Tensor:
    low_x = x[:, ::2]
    high_x = x[:, 1::2]
    high_x = torch.bitwise_left_shift(high_x, 4)
    low_x = torch.bitwise_and(low_x, 0xF)
    return torch.bitwise_or(low_x, high_x).contiguous()


def fbgemm_int4_row_quantize_zp(x: torch.Tensor, group_size: int = 128):
    n_bit = 4
    to_quant = torch.split(x.to(torch.float), group_size, dim=-1)
    max_val = [chunk.amax(dim=1, keepdim=True) for chunk in to_quant]
    min_val = [chunk.amin(dim=1, keepdim=True) for chunk in to_quant]
    max_int = 2**n_bit - 1
    min_int = 0
    scales = [(max_chunk - min_chunk).clamp(min=1e-6) / max_int for max_chunk, min_chunk in zip(max_val, min_val)]
    zeros = [min_chunk + scale_chunk * (2 ** (n_bit - 1)) for min_chunk, scale_chunk in zip(min_val, scales)]
    out = [
        chunk.sub(min_chunk).div(scale_chunk).round().clamp_(min_int, max_int)
        for chunk, min_chunk, scale_chunk in zip(to_quant, min_val, scales)
    ]
    out = [(chunk - 2 ** (n_bit - 1)).to(dtype=torch.int8) for chunk in out]
    out = torch.cat(out, dim=-1)
    scales = torch.cat(scales, dim=-1).t().contiguous()
    zeros = torch.cat(zeros, dim=-1).t().contiguous()
    return out, scales, zeros


def reference_quantize(w: torch.Tensor, group_size: int):
    """What torchao's Int4Tensor.from_hp does with fbgemm's functions."""
    wq, scale, zero = fbgemm_int4_row_quantize_zp(w, group_size)
    return fbgemm_pack_int4(wq), scale.to(w.dtype), zero.to(w.dtype)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("shape", [(1, 128), (64, 256), (300, 512), (1024, 384)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_quantize_is_bit_exact_with_fbgemm(shape, group_size, dtype):
    torch.manual_seed(hash((shape, group_size)) % 2**31)
    w = (torch.randn(shape) * torch.rand(shape[0], 1) * 3 + torch.randn(shape[0], 1)).to(dtype)
    t = int4.quantize(w, group_size)
    qdata, scale, zero = reference_quantize(w, group_size)
    assert isinstance(t, int4.Int4Tensor)
    assert t.shape == shape and t.block_size == [1, group_size]
    assert t.qdata.dtype == torch.int8 and torch.equal(t.qdata, qdata)
    assert t.scale.dtype == dtype and torch.equal(t.scale, scale)
    assert torch.equal(t.zero_point, zero)


def test_quantize_handles_constant_groups_like_fbgemm():
    w = torch.zeros(8, 64)
    w[3] = 1.5
    t = int4.quantize(w, 32)
    qdata, scale, zero = reference_quantize(w, 32)
    assert torch.equal(t.qdata, qdata) and torch.equal(t.scale, scale) and torch.equal(t.zero_point, zero)


def test_quantize_refuses_k_not_multiple_of_group():
    with pytest.raises(ValueError, match=r"K \(96\).*group size \(64\)"):
        int4.quantize(torch.randn(4, 96), 64)


def test_unpack_inverts_fbgemm_packing():
    q = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
    assert torch.equal(int4.unpack(fbgemm_pack_int4(q)), q)


def test_dequantize_follows_the_plain_format_numerics():
    w = torch.randn(32, 128)
    t = int4.quantize(w, 32)
    q = int4.unpack(t.qdata).float()
    scale = t.scale.t().repeat_interleave(32, dim=1)
    zero = t.zero_point.t().repeat_interleave(32, dim=1)
    assert torch.equal(int4.dequantize(t), q * scale + zero)
    # int4 with 16 levels per group: error at most half a step (plus float rounding)
    assert ((int4.dequantize(t) - w).abs() <= scale / 2 + 1e-5).all()


@pytest.mark.parametrize("tp_size", [2, 4])
@pytest.mark.parametrize("dim", [0, 1])
def test_shard_then_dequantize_equals_dequantize_then_shard(tp_size, dim):
    torch.manual_seed(tp_size * 10 + dim)
    t = int4.quantize(torch.randn(64, 512, dtype=torch.bfloat16), 64)
    full = int4.dequantize(t)
    size = t.shape[dim] // tp_size
    for rank in range(tp_size):
        s = int4.shard(t, dim, rank, tp_size)
        assert s.qdata.is_contiguous() and s.scale.is_contiguous() and s.zero_point.is_contiguous()
        assert torch.equal(int4.dequantize(s), full.narrow(dim, rank * size, size))


def test_shard_copies_instead_of_aliasing_the_source():
    # Conversion shuffles its source in place: a shard must never share storage with the whole.
    t = int4.quantize(torch.randn(64, 256), 32)
    s = int4.shard(t, 1, 1, 2)
    assert s.qdata.untyped_storage().data_ptr() != t.qdata.untyped_storage().data_ptr()
    before = int4.dequantize(s)
    t.qdata.zero_()
    assert torch.equal(int4.dequantize(s), before)


def test_misaligned_row_parallel_slice_is_refused_naming_layer_k_t_and_g():
    t = int4.quantize(torch.randn(16, 384), 128)
    with pytest.raises(ValueError) as e:
        int4.shard(t, 1, 0, 2, name="model.layers.0.mlp.down_proj")
    msg = str(e.value)
    assert "model.layers.0.mlp.down_proj" in msg and "384" in msg and "192" in msg and "128" in msg and "`tp`" in msg


def test_slice_not_dividing_the_dimension_is_refused():
    t = int4.quantize(torch.randn(10, 128), 32)
    with pytest.raises(ValueError, match="does not split over `tp` 4"):
        int4.shard(t, 0, 0, 4, name="q_proj")


def test_copy_rows_fills_merged_int4_parameter_in_part_order():
    a = int4.quantize(torch.randn(8, 64), 32)
    b = int4.quantize(torch.randn(4, 64), 32)
    merged = int4.empty((12, 64), 32, torch.float32, "cpu")
    int4.copy_rows(merged, b, 8)
    int4.copy_rows(merged, a, 0)
    assert torch.equal(int4.dequantize(merged), torch.cat([int4.dequantize(a), int4.dequantize(b)]))


def test_copy_rows_refuses_a_tensor_that_does_not_fit():
    dst = int4.empty((8, 64), 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not fit"):
        int4.copy_rows(dst, int4.quantize(torch.randn(8, 64), 32), 4)


def _int4_param() -> nn.Parameter:
    p = nn.Parameter(int4.quantize(torch.randn(64, 256), 64), requires_grad=False)
    p.weight_loader = lambda *a: None
    p.input_dim, p.output_dim, p.custom_flag = 1, 0, "kept"
    return p


@pytest.mark.parametrize("layout", [int4.LAYOUT_CPU, int4.LAYOUT_PLAIN])
def test_conversion_keeps_every_parameter_attribute_and_no_grad(layout):
    p = _int4_param()
    before = int4.param_attributes(p)
    expected = int4.dequantize(p.data)
    out = int4.convert_for_hardware(p, layout, torch.float32)
    assert isinstance(out, nn.Parameter) and out.requires_grad is False
    for key, value in before.items():
        assert getattr(out, key) is value, key
    assert out.int4_layout == layout
    got = out.data if layout == int4.LAYOUT_CPU else int4.dequantize(out.data)
    assert torch.equal(got, expected)


def test_conversion_makes_a_noncontiguous_row_parallel_slice_contiguous():
    t = int4.quantize(torch.randn(64, 256), 64)
    strided = t[:, 128:]  # torchao's own slice: views, not contiguous
    assert not strided.qdata.is_contiguous()
    out = int4.convert_for_hardware(nn.Parameter(strided, requires_grad=False), int4.LAYOUT_PLAIN, torch.float32)
    assert out.data.qdata.is_contiguous() and out.data.scale.is_contiguous()
    assert torch.equal(int4.dequantize(out.data), int4.dequantize(t)[:, 128:])


def test_converting_a_parameter_twice_is_refused():
    out = int4.convert_for_hardware(_int4_param(), int4.LAYOUT_PLAIN, torch.float32)
    with pytest.raises(AssertionError, match="converted already"):
        int4.convert_for_hardware(out, int4.LAYOUT_PLAIN, torch.float32)


def test_cpu_gets_the_cpu_layout():
    assert int4.hardware_layout("cpu") == int4.LAYOUT_CPU


def test_convert_module_weights_replaces_only_int4_parameters():
    lin = nn.Linear(256, 64, bias=True)
    lin.weight = _int4_param()
    bias = lin.bias
    assert int4.convert_module_weights(lin, int4.LAYOUT_CPU, torch.float32) == 1
    assert lin.weight.dtype == torch.float32 and not int4.is_int4(lin.weight.data)
    assert lin.bias is bias
    assert int4.convert_module_weights(lin, int4.LAYOUT_CPU, torch.float32) == 0


def test_group_sizes_the_cuda_kernels_get_wrong_are_refused_with_the_fix():
    for ok in (64, 128, 256):
        int4.check_cuda_group_size(ok)
    with pytest.raises(ValueError, match="int4 group size 32 cannot run on CUDA.*`group_size` 64 or 128, or use `device` cpu"):
        int4.check_cuda_group_size(32)
