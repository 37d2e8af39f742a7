"""The hardware layouts a loaded plain int4 slice is converted to, the choice between them, and the linear that
runs a weight in any of them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torchao.quantization import Int4Tensor

from shardgen.actors.int4.format import (
    contiguous,
    dequantize,
    group_size_of,
    is_int4,
    param_attributes,
    unpack,
)
from shardgen.actors.int4.rules import (
    HUMMING_LAYOUTS,
    LAYOUT_CHOICES,
    LAYOUT_CPU,
    LAYOUT_DUAL,
    LAYOUT_HUMMING_FP8,
    LAYOUT_PLAIN,
    LAYOUT_PRESHUFFLED,
    LAYOUT_TILED,
    check_cuda_group_size,
)

if TYPE_CHECKING:
    from shardgen.actors.int4.humming import HummingRuntime

TILED_PACK = 64  # k-values a run of 8 int32 words of the tiled layout holds
# int4-dual: steps of at most this many rows run humming's W4A16, larger ones fbgemm's preshuffled GEMM. On one H100
# (benchmarks/int4_gemm.py, 8B shapes) humming is 1.3-3x faster than preshuffled up to M = 128 and slower from 256
# on, except on down (benchmarks/README.md).
DUAL_HUMMING_MAX_M = 128


def pack_tiled(t: Int4Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tiled layout of shardgen's Triton kernels: (words int32 (K/8, N), scale (K/G, N), zero (K/G, N)).

    K-major, N contiguous: a tile of words [rows, BLOCK_N] is read with full-width coalesced loads, and so are
    the matching scales. Each run of 64 consecutive k is 8 word rows; nibble p (bits 4p..4p+3) of word row i of
    the run holds k = 8p + i, stored unsigned as q + 8 in [0, 15], so a kernel unpacks nibble p of a whole tile
    with one shift and one mask and reads the matching x in runs of 8. Scale and zero point are the checkpoint's
    own: the kernels compute with exactly the plain int4 weights.
    """
    n, k = t.shape
    if k % TILED_PACK != 0:
        raise ValueError(f"the tiled int4 layout needs K ({k}) to be a multiple of {TILED_PACK}")
    u = (unpack(t.qdata).to(torch.int64) + 8).reshape(n, k // TILED_PACK, 8, 8)  # (n, run, p, i)
    shifts = (torch.arange(8, device=u.device, dtype=torch.int64) * 4).view(1, 1, 8, 1)
    words = (u << shifts).sum(dim=2)  # (n, run, i); nibbles do not overlap, so the sum is an OR
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(n, k // 8)
    return words.t().contiguous(), t.scale.contiguous(), t.zero_point.contiguous()


def unpack_tiled(words: torch.Tensor) -> torch.Tensor:
    """int32 (K/8, N) tiled words -> int8 (N, K) values in [-8, 7]: the inverse of ``pack_tiled``'s packing."""
    w = words.t().to(torch.int64) & 0xFFFFFFFF
    n = w.shape[0]
    shifts = (torch.arange(8, device=w.device, dtype=torch.int64) * 4).view(1, 1, 8, 1)
    u = (w.reshape(n, -1, 1, 8) >> shifts) & 0xF  # (n, run, p, i)
    return (u - 8).to(torch.int8).reshape(n, -1)


def pack_fp8act(t: Int4Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The byte layout of shardgen's W4A8 kernels (actors/int4/w4a8.py): (bytes uint8 (N, K/2), scale (K/G, N),
    zero (K/G, N)).

    Per weight row, each block of 128 consecutive k is 64 bytes: byte j holds k = j in its low nibble and
    k = 64 + j in its high one, stored unsigned as u = q + 8. A kernel makes the block's two fp8 halves (BLOCK_N,
    64) with one AND and one shift (a nibble alone in a byte is the e4m3 number u * 2**-9), and multiplies each by a
    contiguous run of 64 columns of x. Scale and zero point are the checkpoint's own.
    """
    n, k = t.shape
    if k % 128 != 0:
        raise ValueError(f"the W4A8 int4 layout needs K ({k}) to be a multiple of 128")
    u = (unpack(t.qdata) + 8).to(torch.uint8).reshape(n, k // 128, 2, 64)
    packed = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, k // 2)
    return packed.contiguous(), t.scale.contiguous(), t.zero_point.contiguous()


def unpack_fp8act(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) W4A8 bytes -> int8 (N, K) values in [-8, 7]: the inverse of ``pack_fp8act``'s packing."""
    n = packed.shape[0]
    blocks = packed.reshape(n, -1, 1, 64)
    u = torch.cat((blocks & 0xF, blocks >> 4), dim=2)
    return (u.to(torch.int16) - 8).to(torch.int8).reshape(n, -1)


def _preshuffle_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from torchao.utils import _is_fbgemm_gpu_genai_available

    return _is_fbgemm_gpu_genai_available() and torch.cuda.get_device_capability(device) >= (9, 0)


def _tiled_available(device: torch.device) -> bool:
    from shardgen.actors.int4 import tiled

    if device.type == "cpu":
        return tiled.interpreting()
    return tiled.triton is not None and torch.cuda.get_device_capability(device) >= (8, 0)


def hardware_layout(device: torch.device | str, requested: str = "auto") -> str:
    """The layout int4 weights take on ``device``.

    ``auto``: on SM90 with humming installed, ``int4-dual`` (humming's W4A16 for steps of few rows, fbgemm's
    preshuffled GEMM for the rest; on one H100 it beat preshuffled alone on every workload of the bench, at the cost
    of a second packing of the weights), else preshuffled (SM90+), else plain; on the CPU, the dequantized weight.
    shardgen's tiled layout (its own Triton kernels, SM80+) is taken only by name: humming is faster at every shape
    and M where it beat preshuffled (benchmarks/README.md). A layout asked for by name that
    ``device`` cannot run is refused with the layouts it can. (The tiled layout runs on the CPU under Triton's
    interpreter: tests.)
    """
    device = torch.device(device)
    if requested not in LAYOUT_CHOICES:
        raise ValueError(f"`int4_layout` {requested!r} is not one of {', '.join(LAYOUT_CHOICES)}")
    if device.type == "cpu":
        if requested == LAYOUT_TILED and _tiled_available(device):
            return LAYOUT_TILED
        if requested != "auto":
            raise ValueError(f"`int4_layout` {requested} runs on CUDA GPUs; on the CPU int4 weights are dequantized "
                             f"at load (leave `int4_layout` at auto)")
        return LAYOUT_CPU
    from shardgen.actors.int4 import humming

    humming_ok, preshuffle_ok = humming.available(device), _preshuffle_available(device)
    usable = [layout for layout, ok in ((LAYOUT_DUAL, humming_ok and preshuffle_ok), (LAYOUT_PRESHUFFLED, preshuffle_ok),
                                         (LAYOUT_PLAIN, True), (LAYOUT_TILED, _tiled_available(device)),
                                         *((name, humming_ok) for name in HUMMING_LAYOUTS)) if ok]
    if requested == "auto":
        return usable[0]  # the fastest measured end to end that the device runs (see above)
    if requested not in usable:
        raise ValueError(f"`int4_layout` {requested} cannot run on {torch.cuda.get_device_name(device)}; "
                         f"it runs {', '.join(usable)} (or auto)")
    return requested


def convert_for_hardware(param: nn.Parameter, layout: str, dtype: torch.dtype,
                         runtime: TiledRuntime | HummingRuntime | None = None) -> nn.Parameter:
    """Turn a loaded plain-int4 parameter into the parameter the forward pass will use.

    - ``int4-preshuffled``: ``Int4PreshuffledTensor`` through torchao's
      ``convert_to_packed_tensor_based_on_current_hardware``. fbgemm shuffles the
      source in place, so the old parameter is garbage afterwards: callers must
      replace it and never read it again.
    - ``int4-tiled``: the int32 words of ``pack_tiled`` (K/8, N), with the scale and zero point as the
      parameter's ``tiled_scale`` / ``tiled_zero`` and the group size as ``int4_group_size``; ``linear`` runs it
      through shardgen's Triton kernels (``runtime``, shared by a model's weights, picks them).
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
    elif layout == LAYOUT_TILED:
        assert runtime is not None, "the tiled layout needs the model's TiledRuntime"
        new, tiled_scale, tiled_zero = pack_tiled(weight)
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
    if layout == LAYOUT_TILED:
        out.tiled_scale, out.tiled_zero, out.int4_group_size = tiled_scale, tiled_zero, group_size_of(weight)
        out.tiled_runtime = runtime
    if layout in HUMMING_LAYOUTS:
        out.humming = humming_meta
    if layout == LAYOUT_DUAL:
        out.humming, out.humming_weight = humming_meta, humming_weight
    return out


class TiledRuntime:
    """What the tiled int4 weights of one model share: the kernel choice of their GPU, and one scratch buffer
    (as large as the largest weight, in the model's dtype) into which the ``dequant`` path unpacks a weight for
    cuBLAS at prefill sizes. It is allocated with the weights, so the KV planner counts it as theirs."""

    def __init__(self, device: torch.device, kernel_cache_dir: Path | None, scratch_numel: int,
                 dtype: torch.dtype) -> None:
        from shardgen.actors.int4.kernel_choice import KernelChoice

        self.choice = KernelChoice(device, kernel_cache_dir)
        self.scratch = torch.empty(scratch_numel, dtype=dtype, device=device)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ b) for a weight in any layout ``convert_for_hardware`` makes; x contiguous."""
    layout = getattr(weight, "int4_layout", None)
    if layout == LAYOUT_DUAL and x.numel() <= DUAL_HUMMING_MAX_M * x.shape[-1]:
        return _humming_linear(x, weight.humming_weight, weight.humming, bias)
    if layout in HUMMING_LAYOUTS:
        return _humming_linear(x, weight.data, weight.humming, bias)
    if layout != LAYOUT_TILED:
        return F.linear(x, weight, bias)
    from shardgen.actors.int4 import tiled

    runtime: TiledRuntime = weight.tiled_runtime
    x2 = x.reshape(-1, x.shape[-1])
    k, n = weight.shape[0] * 8, weight.shape[1]
    config = runtime.choice.config(x2.shape[0], n, k, weight.int4_group_size)
    scratch = runtime.scratch if config.kernel == "dequant" else None
    y = tiled.linear(x2, weight.data, weight.tiled_scale, weight.tiled_zero, weight.int4_group_size, config,
                            scratch)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], n)


def _humming_linear(x: torch.Tensor, packed: torch.Tensor, meta: object, bias: torch.Tensor | None) -> torch.Tensor:
    from shardgen.actors.int4 import humming

    y = humming.linear(x.reshape(-1, x.shape[-1]), packed, meta)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], meta.n)


def convert_module_weights(module: nn.Module, layout: str, dtype: torch.dtype,
                           kernel_cache_dir: Path | None = None) -> int:
    """Convert every plain-int4 parameter under ``module`` in place of the old one; returns how many.

    For the tiled layout, the kernels of every weight shape are chosen first (a probe on GPUs or shapes that
    the shipped tables lack, cached under ``kernel_cache_dir``)."""
    weights = [p.data for p in module.parameters() if is_int4(p.data)]
    runs_humming = layout in (*HUMMING_LAYOUTS, LAYOUT_DUAL)
    if layout in (LAYOUT_PRESHUFFLED, LAYOUT_PLAIN) or runs_humming:
        for w in weights:
            check_cuda_group_size(group_size_of(w))
    runtime = None
    if runs_humming and weights:
        from shardgen.actors.int4.humming import HummingRuntime

        runtime = HummingRuntime(weights[0].qdata.device, kernel_cache_dir, layout == LAYOUT_HUMMING_FP8, dtype)
    if layout == LAYOUT_TILED and weights:
        for w in weights:
            if w.shape[1] % TILED_PACK != 0 or group_size_of(w) % TILED_PACK != 0:
                raise ValueError(f"an int4 weight of shape {tuple(w.shape)} with group size {group_size_of(w)} cannot "
                                 f"take the tiled layout: K and the group size must be multiples of {TILED_PACK}; "
                                 f"use `int4_layout` int4-preshuffled or int4-plain")
        runtime = TiledRuntime(weights[0].qdata.device, kernel_cache_dir, max(w.shape[0] * w.shape[1] for w in weights),
                               dtype)
        runtime.choice.prepare({(w.shape[0], w.shape[1], group_size_of(w)) for w in weights})
    count = 0
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False)):
            if is_int4(param.data) and not getattr(param, "int4_converted", False):
                setattr(sub, name, convert_for_hardware(param, layout, dtype, runtime))
                count += 1
    if runs_humming and runtime is not None:
        runtime.prepare()  # compiled now, before any CUDA graph is captured
    return count

