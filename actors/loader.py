"""Load one tensor-parallel rank of a model: read its slices, then convert them to the hardware's layout."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from actors import int4
from actors.checkpoint import Checkpoint
from actors.config import ModelConfig
from actors.distributed import SINGLE, TPGroup
from actors.model import CausalLM


@dataclass
class LoadedModel:
    model: CausalLM
    config: ModelConfig
    layout: str  # int4 layout after conversion (actors.int4.LAYOUT_*), or "dense" if nothing was int4
    int4_weights: int
    load_s: float
    convert_s: float


def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """``auto`` is bfloat16 on CUDA and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    choices = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if dtype not in choices:
        raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(choices)}")
    return choices[dtype]


def load_model(
    model_dir: str | Path,
    tp: TPGroup = SINGLE,
    device: torch.device | str = "cpu",
    dtype: str | torch.dtype = "auto",
    preshuffle: bool = True,
) -> LoadedModel:
    """Build this rank's model, read only its slice of every weight, and convert int4 weights for ``device``.

    ``preshuffle=False`` keeps the plain int4 layout on SM90+ (for benchmarks).
    """
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    config = ModelConfig.from_dir(model_dir)
    config.check_tp(tp.size)
    start = time.perf_counter()
    with Checkpoint(model_dir) as ckpt:
        groups = {e.name.rsplit(".", 1)[0]: e.group_size for e in ckpt.entries.values() if e.is_int4}
        model = CausalLM(config, tp, dtype, device, groups)
        model.load_weights(ckpt)
    loaded = time.perf_counter()
    layout = int4.hardware_layout(device, preshuffle) if groups else "dense"
    count = int4.convert_module_weights(model, layout, dtype) if groups else 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return LoadedModel(model.eval(), config, layout, count, loaded - start, time.perf_counter() - loaded)
