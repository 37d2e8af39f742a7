"""``shardgen quantize``: a float Hugging Face model directory -> a plain int4 shardgen checkpoint.

Works one tensor at a time (read, quantize, write, drop), so host memory stays
near the largest tensor. Every linear weight inside the decoder layers becomes
int4; embeddings and norms stay as they are; lm_head only when asked.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from shardgen.actors import int4
from shardgen.actors.model.checkpoint import INDEX_FILE, Checkpoint
from shardgen.actors.model.checkpoint_writer import PlannedTensor, save_checkpoint
from shardgen.actors.model.config import ModelConfig, QuantConfig

_LAYER_LINEAR = re.compile(r"^model\.(decoder\.)?layers\.\d+\..*\.weight$")  # OPT keeps them under model.decoder
_NOT_COPIED = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".tmp")


@dataclass
class QuantizeReport:
    output: Path
    int4_weights: int = 0
    kept_dense: list[str] = field(default_factory=list)
    unquantizable: list[str] = field(default_factory=list)
    bytes_in: int = 0
    bytes_out: int = 0
    seconds: float = 0.0
    removed: list[str] = field(default_factory=list)  # an earlier checkpoint's files that --overwrite removed


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    group_size: int = 128,
    quantize_lm_head: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> QuantizeReport:
    """Quantize the model in ``src`` into ``dst``. See the module docstring."""
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    int4.check_group_size(group_size, "`group_size`")
    cfg = ModelConfig.from_dir(src)
    if cfg.quant is not None:
        raise ValueError(f"{src} is already quantized (config.json has a quantization_config); pass the float model")
    if dst.resolve() == src.resolve() or src.resolve().is_relative_to(dst.resolve()):
        raise ValueError(f"{dst} {'is' if dst.resolve() == src.resolve() else 'holds'} the source model {src}; "
                         f"write the int4 checkpoint to a directory of its own")
    if dst.is_file():
        raise ValueError(f"{dst} is a file; give a directory for the int4 checkpoint")
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise ValueError(f"{dst} is not empty; choose another output directory or pass `overwrite` (it removes "
                             f"only the files of a checkpoint)")
    report = QuantizeReport(dst)
    with Checkpoint(src, allow_pickle) as ckpt:
        plan: list[PlannedTensor] = []
        for name in ckpt.names():
            entry = ckpt.entry(name)
            if entry.is_int4:
                raise ValueError(f"{src}: {name} is int4 already; pass the float model")
            report.bytes_in += math.prod(entry.shape) * entry.dtype.itemsize
            if cfg.tie_word_embeddings and name == "lm_head.weight":
                continue
            # an MoE router (".gate", beside the experts) stays in the float dtype, as transformers keeps it
            wanted = bool(_LAYER_LINEAR.match(name)) and len(entry.shape) == 2 and not name.endswith(".gate.weight")
            if not wanted:
                plan.append(PlannedTensor(name, entry.shape, entry.dtype, None, _reader(ckpt, name)))
                continue
            if entry.shape[1] % group_size:
                report.unquantizable.append(f"{name} (K={entry.shape[1]} is not a multiple of {group_size})")
                plan.append(PlannedTensor(name, entry.shape, entry.dtype, None, _reader(ckpt, name)))
                continue
            plan.append(PlannedTensor(name, entry.shape, entry.dtype, group_size, _quantizer(ckpt, name, group_size)))
        untie = False
        if quantize_lm_head:
            head = "lm_head.weight" if "lm_head.weight" in ckpt else f"{cfg.checkpoint_prefix}embed_tokens.weight"
            entry = ckpt.entry(head)
            if entry.shape[1] % group_size:
                report.unquantizable.append(f"lm_head.weight (K={entry.shape[1]} is not a multiple of {group_size})")
            else:
                plan = [t for t in plan if t.name != "lm_head.weight"]
                plan.append(PlannedTensor("lm_head.weight", entry.shape, entry.dtype, group_size, _quantizer(ckpt, head, group_size)))
                untie = cfg.tie_word_embeddings
        report.kept_dense = [t.name for t in plan if t.group_size is None]
        report.int4_weights = sum(t.group_size is not None for t in plan)
        if not report.int4_weights:
            raise ValueError(_nothing_to_quantize(src, group_size, [ckpt.entry(n).shape[1] for n in ckpt.names()
                                                                    if _LAYER_LINEAR.match(n)
                                                                    and len(ckpt.entry(n).shape) == 2]))
        if overwrite:
            report.removed = remove_checkpoint_files(dst, src)
        save_checkpoint(dst, plan, max_shard_bytes)
        report.bytes_out = sum(t.nbytes() for t in plan)

    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = QuantConfig(group_size).to_hf_dict()
    if untie:
        raw["tie_word_embeddings"] = False
    (dst / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for path in src.iterdir():
        if path.is_file() and path.name not in ("config.json", INDEX_FILE) and not path.name.endswith(_NOT_COPIED):
            shutil.copy2(path, dst / path.name)
    report.seconds = time.perf_counter() - start
    return report


def _nothing_to_quantize(src: Path, group_size: int, ks: list[int]) -> str:
    working = [g for g in int4.GROUP_SIZES if ks and all(k % g == 0 for k in ks)]
    fix = (f"pass `group_size` {max(working)}" if working else
           f"no group size shardgen runs ({', '.join(map(str, int4.GROUP_SIZES))}) divides them")
    return (f"{src}: no layer can be int4 at group size {group_size} (the decoder's linear layers have K = "
            f"{sorted(set(ks)) or 'none'}, and K must be a multiple of G); {fix}")


def remove_checkpoint_files(dst: Path, src: Path) -> list[str]:
    """``--overwrite``: delete the files a quantize writes (weights, index, config.json, the files it copies from
    ``src``), and nothing else; returns their names."""
    copied = {p.name for p in src.iterdir() if p.is_file()}
    gone = [p for p in dst.iterdir() if p.is_file() and (p.suffix == ".safetensors" or p.name in copied
                                                         or p.name in ("config.json", INDEX_FILE))]
    for p in gone:
        p.unlink()
    return sorted(p.name for p in gone)


def _reader(ckpt: Checkpoint, name: str):
    return lambda: ckpt.read(name)


def _quantizer(ckpt: Checkpoint, name: str, group_size: int):
    return lambda: int4.quantize(ckpt.read(name), group_size)

