"""What shardgen's int4 allows, in plain Python (no torch), so that a run's options are checked before the heavy
imports: the group sizes each device runs, the tensor-parallel split of a row-parallel int4 weight, and the names of
the hardware layouts."""

from __future__ import annotations

# fbgemm's bf16 x int4 GEMMs (plain and preshuffled) compute wrong results below this group size on CUDA:
# relative error 0.45-0.64 at G=32 against 0.0024 at G=64..256 (benchmarks/int4_group_sizes.py).
MIN_CUDA_GROUP_SIZE = 64
# Group sizes shardgen runs (torchao's Int4WeightOnlyConfig choices): all on the CPU, from MIN_CUDA_GROUP_SIZE on CUDA.
GROUP_SIZES = (32, 64, 128, 256)

# The layout names that show up in logs, Parquet metadata and benchmarks.
LAYOUT_PRESHUFFLED = "int4-preshuffled"
LAYOUT_PLAIN = "int4-plain"
LAYOUT_CPU = "cpu-dequantized"
LAYOUT_DENSE = "dense"  # a model with no int4 weights (its experts still group: experts.py)
LAYOUT_HUMMING = "int4-humming"  # humming's W4A16 GEMMs (humming.py), SM90
LAYOUT_HUMMING_FP8 = "int4-humming-fp8act"  # humming's W4A8 GEMMs: e4m3 activations, the same int4 codes
# Both packings of every weight: humming's W4A16 for steps of few rows, fbgemm's preshuffled for the rest (layouts.py).
LAYOUT_DUAL = "int4-dual"
# What a run's int4_layout accepts; "auto" is the fastest layout the device has.
LAYOUT_CHOICES = ("auto", LAYOUT_PRESHUFFLED, LAYOUT_PLAIN, LAYOUT_HUMMING, LAYOUT_HUMMING_FP8,
                  LAYOUT_DUAL)
HUMMING_LAYOUTS = (LAYOUT_HUMMING, LAYOUT_HUMMING_FP8)  # the layouts that run humming's GEMMs at every M


def check_group_size(group_size: int, source: str) -> None:
    """Refuse a group size that none of shardgen's int4 kernels run, naming the ones each device runs."""
    if group_size not in GROUP_SIZES:
        cuda = [g for g in GROUP_SIZES if g >= MIN_CUDA_GROUP_SIZE]
        raise ValueError(f"{source}: int4 group size {group_size} is not one shardgen runs; on the CPU: "
                         f"{', '.join(map(str, GROUP_SIZES))}; on CUDA: {', '.join(map(str, cuda))}")


def check_cuda_group_size(group_size: int) -> None:
    """Refuse a group size that CUDA's int4 kernels (both fbgemm layouts) get wrong."""
    if group_size < MIN_CUDA_GROUP_SIZE:
        raise ValueError(
            f"int4 group size {group_size} cannot run on CUDA: fbgemm's int4 kernels give wrong results below "
            f"{MIN_CUDA_GROUP_SIZE} (relative error ~0.5); re-quantize with `group_size` 64 or 128, or use `device` cpu")


def row_slice_problem(k: int, tp_size: int, group_size: int) -> str | None:
    """Why a row-parallel int4 weight of K input columns cannot be split over ``tp_size`` ranks (None: it can).
    Every rank must own whole groups, so K/T must be a multiple of G."""
    if (k // tp_size) % group_size == 0:
        return None
    return (f"row-parallel int4 slice K/T = {k}/{tp_size} = {k // tp_size} is not a multiple of the group size "
            f"G = {group_size}")


def valid_tp_sizes(k: int, group_size: int, limit: int = 64) -> list[int]:
    """The T that split a row-parallel int4 weight of K input columns into whole groups."""
    return [t for t in range(1, limit + 1) if k % t == 0 and row_slice_problem(k, t, group_size) is None]
