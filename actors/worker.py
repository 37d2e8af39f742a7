"""``ShardWorker``: one tensor-parallel rank of a replica, as a Ray actor.

Each worker joins its replica's torch.distributed group, loads only its slice
of the checkpoint, converts it for its hardware, and allocates its KV cache.
Rank 0 then runs the engine in a background thread and takes requests through
``generate``; the other ranks follow rank 0's steps.

torch and the engine are imported in ``setup``, not here: the process that creates the
workers (a Ray Data actor) imports this module too, and would otherwise spend seconds
importing torch, torchao and fbgemm before it could even ask for them.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.sequence import Completion, Request

if TYPE_CHECKING:
    from shardgen.actors.engine.engine import Engine


@dataclass(frozen=True)
class ReplicaSpec:
    """What every rank of a replica needs to build its part (built at the edge, pickled to the actors)."""

    model_dir: str
    tp: int = 1
    device: str = "cpu"  # "cpu" or "cuda"
    dtype: str = "auto"
    int4_layout: str = "auto"  # actors.int4.LAYOUT_CHOICES
    kernel_cache_dir: str | None = None  # where humming's compiled int4 kernels are kept
    engine: EngineConfig = field(default_factory=EngineConfig)
    cpu_threads: int = 1
    run_id: str = "adhoc"  # names this run's placement groups, so the run can release them
    allow_pickle: bool = False  # read .bin/.pt weights (torch.load(weights_only=True)) when there are no safetensors


class ShardWorker:
    def __init__(self, rank: int, spec: ReplicaSpec) -> None:
        self.rank, self.spec = rank, spec
        self._created_at = time.time()
        self.engine: Engine | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Rank 0: requests handed out in groups, each group's futures and which of them were collected already.
        self._groups: dict[int, tuple[list[Future], set[int]]] = {}
        self._group_ids = itertools.count()

    def rendezvous_address(self) -> str:
        """Rank 0: where the other ranks find it (this node's IP and a free port)."""
        import ray

        from shardgen.actors.model.distributed import free_port

        return f"{ray.util.get_node_ip_address()}:{free_port()}"

    def setup(self, address: str) -> dict:
        """Join the group, load and convert this rank's slice, size the KV cache, capture graphs, start serving.
        Returns what was built and how long each part took (also printed to the worker's log)."""
        begun = time.perf_counter()
        import torch

        from shardgen.actors.engine.build import build_engine
        from shardgen.actors.model.distributed import init_tp_group
        from shardgen.actors.model.loader import load_model
        from shardgen.actors.model.tokenizer import eos_token_ids, load_tokenizer

        imported = time.perf_counter()
        spec = self.spec
        if spec.device == "cuda":
            device = torch.device("cuda", 0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        else:
            device = torch.device("cpu")
            torch.set_num_threads(spec.cpu_threads)
        tp = init_tp_group(self.rank, spec.tp, address, device)
        joined = time.perf_counter()
        loaded = load_model(spec.model_dir, tp, device, spec.dtype, spec.int4_layout, spec.allow_pickle,
                            spec.kernel_cache_dir)
        built = time.perf_counter()
        if self.rank == 0:
            tokenizer = load_tokenizer(spec.model_dir)
            self.engine = engine = build_engine(
                loaded, spec.engine, tp, device, eos_token_ids(spec.model_dir, loaded.config.eos_token_ids, tokenizer),
                detokenize=lambda ids: tokenizer.decode(ids, skip_special_tokens=True), tokenizer=tokenizer)
            self._thread = threading.Thread(target=engine.run_forever, args=(self._stop,), daemon=True, name="engine")
        else:
            engine = build_engine(loaded, spec.engine, tp, device)
            self._thread = threading.Thread(target=engine.runner.follow, daemon=True, name="follower")
        runner = engine.runner
        self._thread.start()
        timings = {"created_at": round(self._created_at, 1), "imports_s": round(imported - begun, 1),
                   "group_s": round(joined - imported, 1),
                   "load_s": round(built - joined, 1), "read_s": round(loaded.load_s, 1),
                   "convert_s": round(loaded.convert_s, 1), "kv_cache_and_graphs_s": round(time.perf_counter() - built, 1),
                   "ready_at": round(time.time(), 1)}
        print(f"shardgen rank {self.rank} ready: {json.dumps(timings)}", flush=True)
        return {
            "timings": timings, "rank": self.rank, "layout": loaded.layout, "int4_weights": loaded.int4_weights,
            "kv_blocks": runner.num_blocks, "block_size": spec.engine.block_size,
            "max_model_len": engine.scheduler.max_model_len, "cuda_graphs": runner.graphs is not None,
            "activation_peak_gib": runner.activation_peak / 2**30, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        }

    def ping(self) -> int:
        """Liveness check of the replica (served while the engine runs)."""
        return self.rank

    def stalled_s(self) -> float:
        """Rank 0: seconds its engine has had work without finishing a step (served while the engine runs)."""
        assert self.engine is not None
        return self.engine.stalled_s()

    def submit(self, requests: list[Request]) -> int:
        """Rank 0: add requests to the engine (alongside any others in flight); returns the group's id for
        ``collect``."""
        assert self.engine is not None, "requests are served by rank 0"
        group = next(self._group_ids)
        self._groups[group] = (self.engine.add(requests), set())
        return group

    def collect(self, group: int, wait_s: float) -> tuple[list[tuple[int, Completion]], bool]:
        """Rank 0: the group's completions that finished since the last call, as (index, completion), waiting up
        to ``wait_s`` for one; and whether the whole group is now collected (its id is then forgotten). A request's
        samples come together, one (index, completion) each."""
        futures, collected = self._groups[group]
        pending = [f for i, f in enumerate(futures) if i not in collected]
        wait(pending, timeout=wait_s, return_when=FIRST_COMPLETED)
        done = [(i, c) for i, f in enumerate(futures) if i not in collected and f.done() for c in f.result()]
        collected.update(i for i, _ in done)
        finished = len(collected) == len(futures)
        if finished:
            del self._groups[group]
        return done, finished

    def token_counts(self) -> tuple[int, int]:
        """Rank 0: tokens its engine has generated so far, and prompt tokens it took from the prefix cache instead of
        computing them (served while the engine runs)."""
        assert self.engine is not None
        return self.engine.stats.generated_tokens, self.engine.scheduler.num_cached_tokens

    def stats(self) -> dict:
        assert self.engine is not None
        s = self.engine.stats
        return {"steps": s.steps, "prompt_tokens": s.prompt_tokens, "generated_tokens": s.generated_tokens,
                "running_per_step": list(s.running_per_step), "preemptions": self.engine.scheduler.num_preemptions,
                "cached_prompt_tokens": self.engine.scheduler.num_cached_tokens}

    def shutdown(self) -> None:
        from shardgen.actors.model.distributed import destroy_tp_group

        self._stop.set()
        if self._thread is not None and self.rank == 0:
            self._thread.join(timeout=30)
        destroy_tp_group()
