"""Load one tensor-parallel rank of a model: read its slices, then convert them to the hardware's layout."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from shardgen.actors import int4
from shardgen.actors.model.checkpoint import Checkpoint, TensorEntry
from shardgen.actors.model.config import ModelConfig, resolved_dtype_name
from shardgen.actors.model.distributed import SINGLE, TPGroup
from shardgen.actors.model.model import CausalLM


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    layout: str  # int4 layout after conversion (actors.int4.LAYOUT_*), or LAYOUT_DENSE if nothing was int4
    int4_weights: int
    load_s: float
    convert_s: float


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    dtype = resolved_dtype_name(dtype, torch.device(device).type)
    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in choices:
        raise ValueError(f"`dtype` {dtype!r} is not one of auto, {', '.join(choices)}")
    return choices[dtype]


def load_model(
    model_dir: str | Path,
    tp: TPGroup = SINGLE,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
    int4_layout: str = "auto",
    allow_pickle: bool = False,
    kernel_cache_dir: str | Path | None = None,
) -> LoadedModel:
    """Build this rank's model, read only its slice of every weight, and convert int4 weights for ``device``.

    ``int4_layout``: one of ``int4.LAYOUT_CHOICES``; ``auto`` is the fastest the device runs, another name forces
    that layout (for comparisons). ``kernel_cache_dir``: where the humming layouts keep their compiled
    kernels (None: humming's own default).
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    config = ModelConfig.from_dir(model_dir)
    start = time.perf_counter()
    with Checkpoint(model_dir, allow_pickle) as ckpt:
        model = CausalLM(config, tp, dtype, device, int4_groups(ckpt))  # checks --tp against each layer's format
        model.load_weights(ckpt)
    loaded = time.perf_counter()
    quantized = any(int4.is_int4(p) for p in model.parameters())
    layout = int4.hardware_layout(device, int4_layout) if quantized else int4.LAYOUT_DENSE
    cache = Path(kernel_cache_dir) if kernel_cache_dir is not None else None
    count = int4.convert_module_weights(model, layout, dtype, cache)  # a dense model's experts are grouped too
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LoadedModel(model.eval(), config, layout, count, loaded - start, time.perf_counter() - loaded)


def int4_groups(ckpt: Checkpoint) -> dict[str, int]:
    """Checkpoint module name -> int4 group size, for every int4 weight."""
    return {e.name.rsplit(".", 1)[0]: e.group_size for e in ckpt.entries.values() if e.is_int4}


def check_checkpoint(model_dir: str | Path, tp_size: int = 1, allow_pickle: bool = False) -> ModelConfig:
    """Check, before any worker starts, that every rank of ``--tp tp_size`` finds each tensor it needs with the
    shape config.json implies: the ranks' own weight loaders run on the meta device, so only headers are read."""
    config = ModelConfig.from_dir(model_dir)
    with Checkpoint(model_dir, allow_pickle) as ckpt:
        groups = int4_groups(ckpt)
        config.check_tp(tp_size, groups)
        for rank in sorted({0, tp_size - 1}):  # the last rank's vocab shard may be shorter
            CausalLM(config, TPGroup(rank, tp_size), torch.float32, "meta", groups).load_weights(_HeadersOnly(ckpt))
    return config


class _HeadersOnly:
    """A checkpoint view whose reads return meta tensors of the requested slice (checks without reading data)."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.dir, self.entries = ckpt.dir, ckpt.entries
        self.names, self.entry = ckpt.names, ckpt.entry

    def read(self, name: str, dim: int | None = None, start: int = 0, length: int | None = None) -> torch.Tensor:
        e: TensorEntry = self.entry(name)
        shape = list(e.shape)
        if dim is not None:
            shape[dim] = length
        if e.is_int4:
            return int4.empty(tuple(shape), e.group_size, e.dtype, "meta")
        return torch.empty(shape, dtype=e.dtype, device="meta")
