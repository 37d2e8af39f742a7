"""The hardware layouts a loaded plain int4 slice is converted to, the choice between them, and the linear that
runs a weight in any of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from shardgen.actors.int4.format import (
    contiguous,
    dequantize,
    group_size_of,
    is_int4,
    param_attributes,
)
from shardgen.actors.int4.rules import (
    HUMMING_LAYOUTS,
    LAYOUT_CHOICES,
    LAYOUT_CPU,
    LAYOUT_DUAL,
    LAYOUT_HUMMING_FP8,
    LAYOUT_PLAIN,
    LAYOUT_PRESHUFFLED,
    check_cuda_group_size,
)

if TYPE_CHECKING:
    from shardgen.actors.int4.humming import HummingRuntime

# int4-dual: steps of at most this many rows run humming's W4A16, larger ones fbgemm's preshuffled GEMM. On one H100
# (benchmarks/int4_gemm.py, 8B shapes) humming is 1.2-2.6x faster than preshuffled up to M = 64, level or faster at
# 128, and slower from 256 on except on down (benchmarks/README.md).
DUAL_HUMMING_MAX_M = 128


def _preshuffle_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from torchao.utils import _is_fbgemm_gpu_genai_available

    return _is_fbgemm_gpu_genai_available() and torch.cuda.get_device_capability(device) >= (9, 0)


def hardware_layout(device: torch.device | str, requested: str = "auto") -> str:
    """The layout int4 weights take on ``device``.

    ``auto``: on SM90 with humming installed, ``int4-dual`` (humming's W4A16 for steps of few rows, fbgemm's
    preshuffled GEMM for the rest; on one H100 it beat preshuffled alone on every workload of the bench, at the cost
    of a second packing of the weights), else preshuffled (SM90+), else plain; on the CPU, the dequantized weight.
    A layout asked for by name that ``device`` cannot run is refused with the layouts it can.
    """
    device = torch.device(device)
    if requested not in LAYOUT_CHOICES:
        raise ValueError(f"`int4_layout` {requested!r} is not one of {', '.join(LAYOUT_CHOICES)}")
    if device.type == "cpu":
        if requested != "auto":
            raise ValueError(f"`int4_layout` {requested} runs on CUDA GPUs; on the CPU int4 weights are dequantized "
                             f"at load (leave `int4_layout` at auto)")
        return LAYOUT_CPU
    from shardgen.actors.int4 import humming

    humming_ok, preshuffle_ok = humming.available(device), _preshuffle_available(device)
    usable = [layout for layout, ok in ((LAYOUT_DUAL, humming_ok and preshuffle_ok), (LAYOUT_PRESHUFFLED, preshuffle_ok),
                                         (LAYOUT_PLAIN, True),
                                         *((name, humming_ok) for name in HUMMING_LAYOUTS)) if ok]
    if requested == "auto":
        return usable[0]  # the fastest measured end to end that the device runs (see above)
    if requested not in usable:
        raise ValueError(f"`int4_layout` {requested} cannot run on {torch.cuda.get_device_name(device)}; "
                         f"it runs {', '.join(usable)} (or auto)")
    return requested


def convert_for_hardware(param: nn.Parameter, layout: str, dtype: torch.dtype,
                         runtime: HummingRuntime | None = None) -> nn.Parameter:
    """Turn a loaded plain-int4 parameter into the parameter the forward pass will use.

    - ``int4-preshuffled``: ``Int4PreshuffledTensor`` through torchao's
      ``convert_to_packed_tensor_based_on_current_hardware``. fbgemm shuffles the
      source in place, so the old parameter is garbage afterwards: callers must
      replace it and never read it again.
    - ``int4-humming`` / ``int4-humming-fp8act``: humming's packed weight, with what its kernels need beside it as
      the parameter's ``humming`` (actors/int4/humming.py; ``runtime`` is the model's ``HummingRuntime``).
    - ``int4-dual``: both of the above: the preshuffled tensor as the parameter, humming's packed weight as its
      ``humming_weight`` (made first: fbgemm's shuffle destroys the source). ``linear`` picks by the step's rows.
    - ``int4-plain``: the plain ``Int4Tensor``, inner tensors made contiguous.
    - ``cpu-dequantized``: the dequantized float weight in ``dtype``.

    The new parameter has ``requires_grad=False`` and keeps every attribute the
    old one had (``weight_loader``, ``input_dim``, ``output_dim``, ...).
    """
    weight = param.data
    assert is_int4(weight), f"expected a plain Int4Tensor, got {type(weight).__name__}"
    assert not getattr(param, "int4_converted", False), "this storage was converted already"
    # A row-parallel slice converted while non-contiguous is silently wrong.
    weight = contiguous(weight)
    if layout == LAYOUT_DUAL:
        assert runtime is not None, "the dual layout needs the model's HummingRuntime"
        humming_weight, humming_meta = runtime.convert(weight, dtype)
    if layout in (LAYOUT_PRESHUFFLED, LAYOUT_DUAL):
        from torchao.prototype.tensor_conversion.api import (
            convert_to_packed_tensor_based_on_current_hardware,
        )

        new = convert_to_packed_tensor_based_on_current_hardware(weight)
        assert not is_int4(new), "preshuffled layout asked for on hardware that does not support it"
    elif layout in HUMMING_LAYOUTS:
        assert runtime is not None, "the humming layouts need the model's HummingRuntime"
        new, humming_meta = runtime.convert(weight, dtype)
    elif layout == LAYOUT_PLAIN:
        new = weight
    elif layout == LAYOUT_CPU:
        new = dequantize(weight, dtype)
    else:
        raise ValueError(f"unknown int4 layout {layout!r}")
    out = nn.Parameter(new, requires_grad=False)
    for key, value in param_attributes(param).items():
        setattr(out, key, value)
    out.int4_converted = True
    out.int4_layout = layout
    if layout in HUMMING_LAYOUTS:
        out.humming = humming_meta
    if layout == LAYOUT_DUAL:
        out.humming, out.humming_weight = humming_meta, humming_weight
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for a weight in any layout ``convert_for_hardware`` makes; x contiguous."""
    layout = getattr(weight, "int4_layout", None)
    if layout == LAYOUT_DUAL and x.numel() <= DUAL_HUMMING_MAX_M * x.shape[-1]:
        return _humming_linear(x, weight.humming_weight, weight.humming, bias)
    if layout in HUMMING_LAYOUTS:
        return _humming_linear(x, weight.data, weight.humming, bias)
    return F.linear(x, weight, bias)


def _humming_linear(x: torch.Tensor, packed: torch.Tensor, meta: object, bias: torch.Tensor | None) -> torch.Tensor:
    from shardgen.actors.int4 import humming

    y = humming.linear(x.reshape(-1, x.shape[-1]), packed, meta)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], meta.n)


def convert_module_weights(module: nn.Module, layout: str, dtype: torch.dtype,
                           kernel_cache_dir: Path | None = None) -> int:
    """Convert every plain-int4 parameter under ``module`` in place of the old one; returns how many. The humming
    layouts keep their compiled kernels under ``kernel_cache_dir``.

    A mixture's experts go first: a module with ``expert_projections()`` (model/moe.py) is handed one grouped GEMM a
    projection (experts.py) through ``use_grouped``, where one runs ``layout`` (``LAYOUT_DENSE`` too: a float model's
    experts are grouped alike); otherwise its experts are converted one by one as any linear."""
    weights = [p.data for p in module.parameters() if is_int4(p.data)]
    runs_humming = layout in (*HUMMING_LAYOUTS, LAYOUT_DUAL)
    if layout in (LAYOUT_PRESHUFFLED, LAYOUT_PLAIN) or runs_humming:
        for w in weights:
            check_cuda_group_size(group_size_of(w))
    runtime = None
    if runs_humming and weights:
        from shardgen.actors.int4.humming import HummingRuntime

        runtime = HummingRuntime(weights[0].qdata.device, kernel_cache_dir, layout == LAYOUT_HUMMING_FP8, dtype)
    count = 0
    # Only the mixture blocks are listed: a list of every module would keep each expert alive until the last layer
    # is grouped, holding the whole model twice (a bf16 Qwen3-30B-A3B ran out of an H100's memory so, 2026-12-07).
    for block in [sub for sub in module.modules() if hasattr(sub, "expert_projections")]:
        count += _group_experts(block, layout, dtype, runtime)
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if is_int4(param.data) and not getattr(param, "int4_converted", False):
                setattr(sub, name, convert_for_hardware(param, layout, dtype, runtime))
                count += 1
    if runs_humming and runtime is not None:
        runtime.prepare()  # compiled now, before any CUDA graph is captured
    return count


def _group_experts(block: nn.Module, layout: str, dtype: torch.dtype, runtime: HummingRuntime | None) -> int:
    """Hand ``block`` its experts' grouped GEMMs if every projection has one; returns the int4 weights converted."""
    from shardgen.actors.int4.experts import group_experts

    projections = block.expert_projections()
    grouped = {}
    for name, params in projections.items():
        grouped[name] = group_experts([p.data for p in params], layout, dtype, runtime)
        if grouped[name] is None:
            return 0
    count = sum(is_int4(p.data) for params in projections.values() for p in params)
    on_gpu = projections["down"][0].device.type == "cuda"
    del projections, params
    block.use_grouped(grouped)  # drops the per-expert parameters
    # The experts go now, by reference counting (a parameter holds its module's weight_loader weakly, layers.py),
    # before the next layer's stacked copy is made: a bf16 Qwen3-30B-A3B (57 GiB) held both and ran out of an
    # H100's memory while grouping when they waited for the cycle collector (2026-12-07).
    if on_gpu:
        # The experts' freed blocks are many small ones that the next layer's stacked weight cannot reuse.
        torch.cuda.empty_cache()
    return count

