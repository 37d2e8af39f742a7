"""humming's Hopper GEMMs (PyPI ``humming-kernels``, the vllm-project's humming) over a plain int4 slice.

Two layouts, both made per rank after loading from the plain ``Int4Tensor`` slice, with the checkpoint's exact
codes and group scales:

- ``int4-humming`` (W4A16): bf16 activations x uint4 weights with a float zero point per group. The plain format
  stores ``w = q * s + z`` with q in [-8, 7]; humming computes ``(u - zp) * s`` with u = q + 8, so
  ``zp = 8 - z / s``. humming takes zp in the activations' dtype: in bf16, zp in [0, 16) is off by up to 2**-5 of a
  quantization step, the same for every weight of a group, which adds up over a group whose inputs share a sign
  (after a ReLU: 2.8e-2 relative error where bf16 weights give 2.9e-3). So each output is corrected by what the
  rounding moved: ``y += group_sums(x) @ ((zp_bf16 - zp) * s)``, a (M, K/G) x (K/G, N) GEMM (``group_term``,
  ``zero_point_rounding``), which brings the error back to 3.9e-3 (benchmarks/README.md, "humming's zero point").
- A mixture's experts in ``int4-humming`` (and ``int4-dual``) are stacked (E, N, K) and run by humming's W4A16
  grouped GEMM (``grouped_contiguous``: rows grouped by expert, ``expert_layout`` their first-row offsets), with the
  same codes, scales and zero points (``convert_experts``).
- ``int4-humming-fp8act`` (W4A8): every token's activations quantized to e4m3 with one scale (inside the call),
  times the signed codes q with their group scales on fp8 tensor cores. humming's fp8 path has no float zero point,
  so the zero point goes through a split: ``x . w = sum_g s_g (x_g . q_g) + sum_g z_g (sum of x over group g)``;
  the second term is the same small GEMM of the group sums (M x K/G), here with the zero points (K/G x N).

humming compiles its kernels (NVRTC) the first time a weight shape is seen, for every M interval of its
heuristics at once; ``HummingRuntime.prepare`` does that at load, before any CUDA graph is captured, and the
cubins are kept under ``cache_dir`` so that a second run starts in seconds.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torchao.quantization import Int4Tensor

from shardgen.actors.int4.format import group_size_of, unpack

log = logging.getLogger(__name__)
# humming's Stream-K locks: one buffer per model is enough because a model's linears run one after another on one
# stream (humming's own layers keep one each so that layers on different streams cannot share it).
LOCKS = 2048
# humming's compute config for a mixture's experts: rows grouped by expert, one group after the other.
GROUPED = '{"gemm_type": "grouped_contiguous"}'
# A mixture's grouped weight is launched once in each of humming's M intervals when converted (at most this many
# rows), its rows spread over every expert: some shapes fail to launch in some intervals (the tiny Mixtral of
# tests/actors/model/test_moe_cuda.py, 4 experts of 2048 x 512 and 512 x 1024, failed to encode its zero points'
# TMA descriptor at 264 rows on an H100, 2026-12-07, after 256 had run); those experts run one by one.
MAX_TRIAL_ROWS = 16384


def available(device: torch.device) -> bool:
    """humming-kernels is installed and ``device`` is a GPU whose kernels it builds and shardgen has measured (SM90)."""
    import importlib.util

    if device.type != "cuda" or importlib.util.find_spec("humming") is None:
        return False
    return torch.cuda.get_device_capability(device)[0] == 9


@dataclass(frozen=True)
class HummingWeight:
    """What a linear over a humming weight needs besides the packed weight itself (the parameter's data)."""

    config: object  # humming's LayerConfig: dtypes, shape and group size, the key of the compiled kernels
    scale: torch.Tensor
    zero_point: torch.Tensor | None  # W4A16: humming's transformed float zero points
    # (K/G, N), added as group_sums(x) @ group_term: W4A16's zero-point rounding, W4A8's zero points (its split)
    group_term: torch.Tensor
    group_size: int
    n: int
    runtime: HummingRuntime


class HummingRuntime:
    """What the humming weights of one model share: the Stream-K locks, the kernel cache, the configs compiled."""

    def __init__(self, device: torch.device, cache_dir: Path | None, fp8_activations: bool,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        if dtype != torch.bfloat16:
            raise ValueError(f"the humming int4 layouts run bfloat16 models (measured and tested so), not {dtype}; use "
                             f"`dtype` bfloat16 (auto on CUDA) or another `int4_layout`")
        if cache_dir is not None:
            # humming reads its cache directory from the environment once, on first use: set it before the import.
            os.environ.setdefault("HUMMING_CACHE_DIR", str(Path(cache_dir) / "humming"))
        import importlib

        importlib.import_module("humming")  # fails here, at load, when the GPU extra is missing

        self.device = device
        self.fp8_activations = fp8_activations
        self.locks = torch.zeros(LOCKS, dtype=torch.int32, device=device)
        self.configs: set[tuple[str, str | None]] = set()  # (layer config, compute config) to compile

    def convert(self, t: Int4Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, HummingWeight]:
        """humming's packed weight of a plain int4 slice, and what ``linear`` needs beside it."""
        from humming.schema import BaseInputSchema, BaseWeightSchema
        from humming.transform import prepare_and_transform_humming_tensors

        n, k = t.shape
        g = group_size_of(t)
        tensors = {"weight": _packed_codes(t), "weight_scale": t.scale.t().contiguous()}
        if self.fp8_activations:
            weight_cfg = {"quant_method": "humming", "dtype": "int4", "group_size": g}
            input_schema = BaseInputSchema.from_config({"quant_method": "humming", "dtype": "float8e4m3"})
        else:
            weight_cfg = {"quant_method": "humming", "dtype": "uint4", "group_size": g, "has_zero_point": True,
                          "is_fp_zero_point": True}
            input_schema = None
            tensors["zero_point"] = float_zero_point(t, dtype)
        group_term = t.zero_point.contiguous() if self.fp8_activations else zero_point_rounding(t, dtype)
        config, out = prepare_and_transform_humming_tensors(
            tensors, n, k, BaseWeightSchema.from_config(weight_cfg),
            input_schema.to_humming_schema(dtype) if input_schema is not None else None,
            torch_dtype=dtype, device=self.device)
        self.configs.add((config.to_str(), None))
        return out["weight"], HummingWeight(
            config=config, scale=out["weight_scale"], zero_point=out.get("zero_point"),
            group_term=group_term, group_size=g, n=n, runtime=self)

    def convert_experts(self, ts: list[Int4Tensor], dtype: torch.dtype) -> GroupedHumming | None:
        """One projection of every expert (plain int4 slices of one shape) as humming's stacked W4A16 weight for its
        grouped GEMM; None for W4A8 (its zero-point split has no grouped form here: the experts run one by one)."""
        from humming.schema import BaseWeightSchema
        from humming.transform import prepare_and_transform_humming_tensors

        if self.fp8_activations:
            return None
        n, k = ts[0].shape
        g = group_size_of(ts[0])
        tensors = {"weight": torch.stack([_packed_codes(t) for t in ts]),
                   "weight_scale": torch.stack([t.scale.t() for t in ts]).contiguous(),
                   "zero_point": torch.stack([float_zero_point(t, dtype) for t in ts]).contiguous()}
        weight_cfg = {"quant_method": "humming", "dtype": "uint4", "group_size": g, "has_zero_point": True,
                      "is_fp_zero_point": True}
        config, out = prepare_and_transform_humming_tensors(
            tensors, n, k, BaseWeightSchema.from_config(weight_cfg), None, num_experts=len(ts), torch_dtype=dtype,
            device=self.device)
        # (E, N, K/G), K/G padded to a multiple of 8: torch's grouped GEMM needs rows of 16 bytes
        rounding = torch.stack([zero_point_rounding(t, dtype).t() for t in ts])
        rounding = torch.nn.functional.pad(rounding, (0, -rounding.shape[2] % 8)).contiguous().to(self.device)
        grouped = GroupedHumming(config, out["weight"], out["weight_scale"], out["zero_point"], rounding, g, self)
        started = time.perf_counter()
        try:
            for m in self._trial_rows(config):  # compiles each M interval's kernel now (prepare would) and runs it
                counts = torch.full((len(ts),), m // len(ts), dtype=torch.int64, device=self.device)
                counts[: m % len(ts)] += 1
                grouped(torch.zeros(m, k, dtype=dtype, device=self.device), counts)
        except RuntimeError as e:
            log.warning("humming's grouped GEMM cannot run %d experts of %d x %d (%s); they run one by one",
                        len(ts), n, k, str(e).splitlines()[0][:200])
            return None
        if (config.to_str(), GROUPED) not in self.configs:  # the first of a shape compiles its kernels
            log.info("humming grouped GEMM for %d experts of %d x %d ready in %.1f s", len(ts), n, k,
                     time.perf_counter() - started)
        self.configs.add((config.to_str(), GROUPED))
        return grouped

    def _trial_rows(self, config: object) -> list[int]:
        """One row count in each of the M intervals humming tunes a grouped weight's kernel for (its largest, up
        to MAX_TRIAL_ROWS): each interval launches a kernel of its own."""
        from humming.kernel.humming import HummingKernel

        tuning = HummingKernel._resolve_configs(config.to_str(), GROUPED, None, self.device)[2]
        if isinstance(tuning, dict):  # one kernel for every M
            return [1]
        return sorted({min(hi, MAX_TRIAL_ROWS) for lo, hi, _ in tuning if lo < MAX_TRIAL_ROWS})

    def prepare(self) -> None:
        """Compile (or load from the cache) every kernel the converted weights will run, for every M interval."""
        from humming.kernel.humming import HummingKernel

        started = time.perf_counter()
        for key, compute in sorted(self.configs, key=str):
            HummingKernel.prepare_kernels(key, compute, None, self.device)
        log.info("humming kernels for %d weight shapes ready in %.1f s", len(self.configs),
                 time.perf_counter() - started)


@dataclass
class GroupedHumming:
    """A projection of every expert of a layer in humming's grouped W4A16 form (experts.py's ``GroupedExperts``)."""

    config: object
    weight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    group_term: torch.Tensor  # (E, N, K/G padded to 8): each expert's zero-point rounding, as the dense layout's
    group_size: int
    runtime: HummingRuntime

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from humming.forward import humming_forward

        ends = counts.cumsum(0)
        first_rows = torch.nn.functional.pad(ends, (1, 0))  # (E + 1,): where each expert's rows start
        y = humming_forward(self.config, inputs=xs, weight=self.weight, weight_scale=self.scale,
                            zero_point=self.zero_point, expert_layout=first_rows, locks=self.runtime.locks,
                            compute_config=GROUPED)
        sums = group_sums(xs, self.group_size)
        if sums.shape[1] != self.group_term.shape[2]:  # K/G not a multiple of 8 (Qwen3-30B-A3B's down: 6)
            sums = torch.nn.functional.pad(sums, (0, self.group_term.shape[2] - sums.shape[1]))
        return y.add_(torch._grouped_mm(sums, self.group_term.transpose(-2, -1), offs=ends.to(torch.int32)))


def _packed_codes(t: Int4Tensor) -> torch.Tensor:
    """humming's packing of a plain slice's codes: u = q + 8 in [0, 15] (offset binary), eight to an int32."""
    from humming import ops

    return ops.pack_weight((unpack(t.qdata).to(torch.int32) + 8).contiguous(), 4)


def float_zero_point(t: Int4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """humming's zero point (N, K/G) for a plain weight: ``(u - zp) * s == q * s + z`` with u = q + 8, so
    ``zp = 8 - z / s``; computed in float32 and rounded once to ``dtype``, the precision the kernel applies it in."""
    return (8 - t.zero_point.float() / t.scale.float()).t().to(dtype).contiguous()


def zero_point_rounding(t: Int4Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(K/G, N): what humming's weights lack of the plain ones, a group and output each, with the zero point rounded
    to ``dtype``: ``(u - zp_rounded) * s + (zp_rounded - zp) * s == (u - zp) * s == q * s + z``."""
    exact = 8 - t.zero_point.float() / t.scale.float()
    return ((exact.to(dtype).float() - exact) * t.scale.float()).to(dtype).contiguous()


def group_sums(x2: torch.Tensor, group_size: int) -> torch.Tensor:
    """(M, K) -> (M, K/G): each row's sum over each group of G inputs (accumulated in float32, as torch does)."""
    m, k = x2.shape
    return x2.view(m, k // group_size, group_size).sum(-1)


def linear(x2: torch.Tensor, weight: torch.Tensor, meta: HummingWeight) -> torch.Tensor:
    """x2 (M, K) contiguous, in the model's dtype -> (M, N)."""
    from humming.forward import humming_forward

    # W4A8: humming quantizes the rows to e4m3 itself (one scale a token) before its GEMM.
    y = humming_forward(meta.config, inputs=x2, weight=weight, weight_scale=meta.scale, zero_point=meta.zero_point,
                        locks=meta.runtime.locks)
    return y.addmm_(group_sums(x2, meta.group_size), meta.group_term)

