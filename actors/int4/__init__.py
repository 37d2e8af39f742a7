"""Everything shardgen knows about torchao's plain int4 layout, in one package.

- ``rules``: group sizes, the TP split of int4 weights, layout names (plain Python: the CLI checks with it);
- ``format``: what a plain int4 weight is, quantize and dequantize;
- ``sharding``: which bytes of a weight a tensor-parallel rank holds, read and copied;
- ``layouts``: the hardware layouts a loaded slice is converted to, and the linear over any of them;
- ``humming``: the layouts that run humming's Hopper GEMMs;
- ``experts``: a mixture's experts in one grouped GEMM a projection.

Callers write ``from shardgen.actors import int4`` and ``int4.<name>``; each name is loaded from its module on first
use, so that importing the rules costs no torch import.
"""

from __future__ import annotations

import importlib
from typing import Any

_MODULES = {
    "rules": ("MIN_CUDA_GROUP_SIZE", "GROUP_SIZES", "LAYOUT_PRESHUFFLED", "LAYOUT_PLAIN", "LAYOUT_CPU", "LAYOUT_DENSE",
              "LAYOUT_HUMMING", "LAYOUT_HUMMING_FP8", "LAYOUT_DUAL", "HUMMING_LAYOUTS", "LAYOUT_CHOICES", "check_group_size",
              "check_cuda_group_size", "row_slice_problem", "valid_tp_sizes"),
    "format": ("INT4_DATA_NAMES", "is_int4", "group_size_of", "quantize", "unpack", "dequantize", "empty",
               "contiguous", "param_attributes"),
    "sharding": ("check_shardable", "shard_index", "read_shard", "narrow", "shard", "copy_rows"),
    "layouts": ("hardware_layout", "convert_for_hardware", "DUAL_HUMMING_MAX_M", "linear", "convert_module_weights"),
    "experts": ("GroupedExperts", "group_experts"),
}
_MODULE_OF = {name: module for module, names in _MODULES.items() for name in names}
__all__ = ["Int4Tensor", *_MODULE_OF]


def __getattr__(name: str) -> Any:
    if name == "Int4Tensor":
        from torchao.quantization import Int4Tensor

        return Int4Tensor
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
