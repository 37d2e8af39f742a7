"""A mixture's experts in one GEMM a projection: every expert's slice of a projection stacked (E, N, K), and the rows
of all experts in one call, grouped by expert (``counts[e]`` rows each, in expert order). The counts stay on the
device (no host synchronisation), so a mixture's decode steps run under CUDA graphs like a dense model's.

- float weights (a bf16 model; int4 dequantized on the CPU): torch's grouped GEMM, ``torch._grouped_mm``;
- int4 in the humming layouts on SM90 (``int4-humming``, and ``int4-dual``, whose experts run humming only):
  humming's W4A16 grouped GEMM over the stacked packed weights, with the checkpoint's codes, group scales and float
  zero points as the dense ``int4-humming`` layout has them (humming.py);
- anything else (``group_experts`` returns None): the block runs its experts one after the other (model/moe.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from shardgen.actors.int4.format import dequantize, is_int4
from shardgen.actors.int4.rules import LAYOUT_CPU, LAYOUT_DENSE, LAYOUT_DUAL, LAYOUT_HUMMING

if TYPE_CHECKING:
    from shardgen.actors.int4.humming import HummingRuntime


class GroupedExperts(Protocol):
    def __call__(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (rows, K), grouped by expert with ``counts`` (E,) int64 rows each -> (rows, N)."""
        ...


@dataclass
class DenseGrouped:
    """Float experts (E, N, K) through ``torch._grouped_mm`` (CUDA: bf16 on SM90 and later; CPU: any float)."""

    weight: torch.Tensor

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)  # each group's end row
        return torch._grouped_mm(xs, self.weight.transpose(-2, -1), offs=offsets)


def group_experts(weights: list[torch.Tensor], layout: str, dtype: torch.dtype,
                  runtime: HummingRuntime | None = None) -> GroupedExperts | None:
    """One projection of every expert of a layer (each a float tensor or a plain ``Int4Tensor`` slice, as loaded)
    made into one grouped GEMM for ``layout``, or None where no grouped GEMM runs it."""
    if layout in (LAYOUT_DENSE, LAYOUT_CPU):
        first = weights[0]
        if first.is_cuda and (torch.cuda.get_device_capability(first.device)[0] < 9 or dtype != torch.bfloat16):
            return None  # torch's CUDA grouped GEMM runs bf16 on Hopper and later
        return DenseGrouped(torch.stack([dequantize(w, dtype) if is_int4(w) else w for w in weights]))
    if layout in (LAYOUT_HUMMING, LAYOUT_DUAL) and runtime is not None:
        assert all(is_int4(w) for w in weights), "humming groups plain int4 experts"
        return runtime.convert_experts(weights, dtype)
    return None
