"""Which int4 kernel config runs a linear of shape (N, K) at M rows, chosen by measurement on the GPU at hand.

A config tuned on one GPU is never assumed right on another. ``candidates`` lists what is worth trying
for a shape; ``benchmarks/int4_decode_gemm.py`` times all of them on a GPU and writes the winners as a table
(``actors/int4/kernel_tables/<device>.json``). A ``KernelChoice`` looks configs up by M in the table of its own GPU;
shapes the table lacks (another model, another TP degree, a GPU with no table) are timed at load by ``probe``, over
a short list, and kept in a cache file per device, shape and library versions.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from shardgen.actors.int4.tiled import PACK, KernelConfig

log = logging.getLogger(__name__)
TABLES = Path(__file__).parent / "kernel_tables"
# The row counts a table holds a config for; a step of M rows runs the config of the next one up.
PROBE_MS = (1, 16, 64, 128, 256, 2048)
# What this process has probed already, by device name and shape: a second model load does not time again.
_PROBED: dict[tuple[str, str], dict[str, dict]] = {}
# Under Triton's CPU interpreter (tests), by rows, so that a few prompts and their decode steps run every kernel.
INTERPRETER_CONFIGS = {"1": KernelConfig("gemv", block_n=32, block_k=64, chunk=64),
                       "8": KernelConfig("dot", block_m=16, block_n=32, block_k=128, chunk=128),
                       "16": KernelConfig("dotk", block_m=16, block_n=32, block_k=64),
                       "4096": KernelConfig("dequant")}


def split_factors(programs: int, k: int, block_k: int, n_sm: int) -> list[int]:
    """Split-K factors worth trying: 1, and more while the grid is under two waves of the GPU's SMs."""
    out = []
    for s in (1, 2, 4, 8, 16):
        if k % (block_k * s) != 0:
            continue
        if s == 1 or programs * (s // 2) < 2 * n_sm:
            out.append(s)
    return out


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


# (BLOCK_N, BLOCK_K) worth trying per kernel at M <= 16, M <= 64 and M <= 512, and the whole (BLOCK_M, BLOCK_N,
# BLOCK_K) tiles above that. The swapped ``dott`` kernel's BLOCK_N is the tensor cores' M side: 64 or 128.
_TILES = {
    "dot": (((64, 256), (128, 256), (128, 128), (256, 128)), ((64, 128), (64, 256), (128, 128)),
            ((64, 128), (128, 128)), ()),
    "dotk": (((64, 256), (128, 128), (128, 256), (256, 64)), ((64, 128), (128, 128), (128, 64)),
             ((128, 64), (128, 128), (256, 64)), ((128, 128, 64), (128, 256, 64))),
    "dott": (((64, 128), (64, 256), (128, 128), (128, 256)), ((64, 128), (128, 128), (128, 64)),
             ((64, 128), (128, 64), (128, 128)), ()),
}


def _tiles(kernel: str, m: int) -> list[tuple[int, int, int]]:
    """(BLOCK_M, BLOCK_N, BLOCK_K) of ``kernel`` worth trying at M rows."""
    up_to_16, up_to_64, up_to_512, above = _TILES[kernel]
    if m <= 16:
        return [(16, bn, bk) for bn, bk in up_to_16]
    if m <= 64:
        return [(bm, bn, bk) for bm in (32, 64) for bn, bk in up_to_64]
    if m <= 512:
        return [(bm, bn, bk) for bm in (64, 128) for bn, bk in up_to_512]
    return list(above)


def candidates(m: int, n: int, k: int, n_sm: int = 132) -> list[KernelConfig]:
    """Every config worth timing for an (M, K) x (K, N) int4 product on a GPU with ``n_sm`` SMs."""
    if k % PACK != 0:
        return []
    out: list[KernelConfig] = []
    if m <= 4:
        for bn, bk, chunk, warps in ((64, 256, 128, 4), (128, 256, 128, 4), (128, 512, 128, 8), (256, 256, 128, 8),
                                     (128, 256, 64, 4)):
            for s in split_factors(_cdiv(n, bn) * m, k, bk, n_sm):
                out.append(KernelConfig("gemv", block_n=bn, block_k=bk, chunk=chunk, split_k=s, num_warps=warps))
    # (kernel, its tiles, pipeline depths, the largest BLOCK_M x BLOCK_N that 4 warps take)
    for kernel, depths, four_warps in (("dot", (3,), 4096), ("dotk", (3, 4), 4096), ("dott", (3, 4), 8192)):
        tiles = _tiles(kernel, m)
        for bm, bn, bk in tiles:
            for s in split_factors(_cdiv(n, bn) * _cdiv(m, bm), k, bk, n_sm):
                out += [KernelConfig(kernel, block_m=bm, block_n=bn, block_k=bk, split_k=s,
                                     num_warps=4 if bm * bn <= four_warps else 8, num_stages=stages) for stages in depths]
    if m >= 64:
        out.append(KernelConfig("dequant"))
    return [c for c in out if c.fits(m, n, k)]


def shortlist(m: int, n: int, k: int, n_sm: int) -> list[KernelConfig]:
    """The few configs a start-up probe times at M rows: the winners of the shipped tables at that M (any
    GPU, any shape) that fit, and the dequant path from M = 64 on."""
    seen: dict[str, KernelConfig] = {}
    for table in TABLES.glob("*.json"):
        for by_m in json.loads(table.read_text())["shapes"].values():
            cfg = KernelConfig(**by_m[str(_bucket(m, [int(b) for b in by_m]))])
            if cfg.fits(m, n, k):
                seen[cfg.name()] = cfg
    if not seen:  # no table at all: the whole candidate list, thinned
        seen = {c.name(): c for c in candidates(m, n, k, n_sm)[::4]}
    if m >= 64:
        seen["dequant"] = KernelConfig("dequant")
    return list(seen.values())


def _bucket(m: int, measured: list[int]) -> int:
    """The smallest measured M >= m, or the largest."""
    above = [b for b in sorted(measured) if b >= m]
    return above[0] if above else max(measured)


def _key(n: int, k: int, group_size: int) -> str:
    return f"{n}x{k}/g{group_size}"


def graph_time_us(calls: list[Callable[[], object]], total_calls: int = 48, replays: int = 7) -> float:
    """GPU time of one call, from a CUDA graph of ``total_calls`` calls cycling through ``calls`` (median of
    ``replays``). Callers pass calls on enough copies of the weights that none is in L2 when it comes round."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    reps = max(1, total_calls // len(calls))
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (reps * len(calls)))
    del graph
    return sorted(times)[len(times) // 2]


def weight_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of a weight of ``nbytes`` a timing cycles through so that each is out of L2 when reused."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(16, math.ceil(3 * l2 / nbytes)))


def probe(n: int, k: int, group_size: int, device: torch.device) -> dict[str, dict]:
    """Time the shortlist at every M of ``PROBE_MS`` for one (N, K, G) on ``device``: {M: config as a dict}."""
    from triton.runtime.errors import OutOfResources

    from shardgen.actors.int4 import tiled

    n_sm = torch.cuda.get_device_properties(device).multi_processor_count
    nbytes = n * k // 2 + 4 * n * (k // group_size)
    copies = [(torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device=device),
               torch.rand(k // group_size, n, dtype=torch.bfloat16, device=device) * 1e-2,
               torch.rand(k // group_size, n, dtype=torch.bfloat16, device=device) * 1e-2)
              for _ in range(weight_copies(nbytes, device))]
    scratch = torch.empty(n * k, dtype=torch.bfloat16, device=device)
    best: dict[str, dict] = {}
    for m in PROBE_MS:
        x = torch.randn(m, k, dtype=torch.bfloat16, device=device)
        times = {}
        for cfg in shortlist(m, n, k, n_sm):
            calls = [lambda w=w, cfg=cfg: tiled.linear(x, *w, group_size, cfg, scratch) for w in copies]
            try:
                times[cfg] = graph_time_us(calls)
            except OutOfResources:
                continue
        winner = min(times, key=times.get)
        best[str(m)] = asdict(winner)
    return best


class KernelChoice:
    """The int4 kernel config for every (M, N, K, G) on one GPU: its shipped table, then its probe cache."""

    def __init__(self, device: torch.device, cache_dir: Path | None = None) -> None:
        self.device = device
        self.tables: dict[str, dict[str, dict]] = {}
        self._configs: dict[tuple[int, str], KernelConfig] = {}
        self.cache_file: Path | None = None
        if device.type == "cpu":  # Triton's interpreter (tests): nothing to time, every kernel gets its turn
            self.device_name = "cpu-interpreter"
            return
        self.device_name = torch.cuda.get_device_name(device)
        self.cached: dict[str, dict[str, dict]] = {}  # what this GPU's probes measured, as the cache file holds it
        if cache_dir is not None:
            import triton

            versions = f"torch{torch.__version__}-triton{triton.__version__}".replace("+", "_")
            self.cache_file = Path(cache_dir) / f"int4-kernels-{self.device_name.replace(' ', '_')}-{versions}.json"
            if self.cache_file.exists():
                try:
                    self.cached = json.loads(self.cache_file.read_text())["shapes"]
                except (ValueError, KeyError):
                    log.warning("ignoring unreadable int4 kernel cache %s; it will be measured again", self.cache_file)
        self.tables.update(self.cached)
        shipped = TABLES / f"{self.device_name.replace(' ', '_')}.json"
        if shipped.exists():  # measured by the full benchmark: wins over a probe's short list
            self.tables.update(json.loads(shipped.read_text())["shapes"])

    def prepare(self, shapes: set[tuple[int, int, int]]) -> None:
        """Make sure every (N, K, G) has measured configs: probe those that neither table nor cache holds."""
        for n, k, g in shapes:
            if _key(n, k, g) not in self.tables and (self.device_name, _key(n, k, g)) in _PROBED:
                self.tables[_key(n, k, g)] = _PROBED[(self.device_name, _key(n, k, g))]
        missing = sorted(s for s in shapes if _key(*s) not in self.tables)
        if not missing:
            return
        if self.device.type == "cpu":
            for n, k, g in missing:
                self.tables[_key(n, k, g)] = {m: asdict(c) for m, c in INTERPRETER_CONFIGS.items()}
            return
        started = time.perf_counter()
        log.info("timing int4 kernels for %d linear shapes on %s (once; kept in %s)", len(missing),
                 self.device_name, self.cache_file or "this process")
        for n, k, g in missing:
            key = _key(n, k, g)
            self.tables[key] = self.cached[key] = _PROBED[(self.device_name, key)] = probe(n, k, g, self.device)
        log.info("int4 kernels timed in %.0f s", time.perf_counter() - started)
        if self.cache_file is not None:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_file.with_suffix(f".{os.getpid()}.tmp")  # ranks of one node may write at once
            tmp.write_text(json.dumps({"device": self.device_name, "shapes": self.cached}, indent=1))
            tmp.replace(self.cache_file)

    def config(self, m: int, n: int, k: int, group_size: int) -> KernelConfig:
        """The config to run M rows through the (N, K, G) weight; ``prepare`` must have seen the shape."""
        key = _key(n, k, group_size)
        cached = self._configs.get((m, key))
        if cached is None:
            by_m = self.tables[key]
            fitting = [KernelConfig(**by_m[str(b)]) for b in sorted(int(b) for b in by_m) if b >= m]
            fitting = [c for c in fitting if c.fits(m, n, k)]
            cached = self._configs[(m, key)] = fitting[0] if fitting else KernelConfig("dequant")
        return cached
