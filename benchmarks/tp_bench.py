"""Tensor parallelism vs replicas on one multi-GPU host: the engine at R replicas x T ranks (one GPU a rank).

    python -m benchmarks.tp_bench --shape 8b --layouts 1x2,2x1
    python -m benchmarks.tp_bench --shape 70b --layouts 1x2 --scale 0.25

Every rank is a process that sees only its own GPU (as under Ray), joins its replica's NCCL group, reads its
slice of a plain int4 checkpoint written once (random weights, G=128, lm_head bf16; see ``benchmarks/bench.py``),
converts it, and sizes its KV cache from what is left. Each replica's rank 0 runs the engine on every R-th
prompt of the workload; the replicas start each workload together (a barrier) and the workload's time is the
slowest replica's. Results: a table, and JSON merged into ``benchmarks/results/tp_bench-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path


import torch

from benchmarks.bench import DEFAULT_WORKLOADS, warm_up
from benchmarks.synthetic import LLAMA_8B, LLAMA_70B, WORKLOADS, workload_prompts, write_checkpoint

SHAPES = {"8b": LLAMA_8B, "70b": LLAMA_70B}
GiB = 2**30


@dataclass(frozen=True)
class Layout:
    replicas: int
    tp: int

    @classmethod
    def parse(cls, text: str) -> "Layout":
        r, t = text.lower().split("x")
        return cls(int(r), int(t))

    @property
    def gpus(self) -> int:
        return self.replicas * self.tp

    def __str__(self) -> str:
        return f"R={self.replicas} x T={self.tp}"


def _rank_main(layout: Layout, replica: int, rank: int, port: int, args: dict, barrier, queue) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = str(replica * layout.tp + rank)
    try:
        from shardgen.actors.engine.build import build_engine
        from shardgen.actors.engine.config import EngineConfig
        from shardgen.actors.model.distributed import destroy_tp_group, init_tp_group
        from shardgen.actors.model.loader import load_model
        from shardgen.actors.engine.sequence import Request, SamplingParams

        device = torch.device("cuda", 0)
        start = time.perf_counter()
        tp = init_tp_group(rank, layout.tp, f"127.0.0.1:{port}", device, timeout_s=900)
        loaded = load_model(args["checkpoint"], tp, device)
        weights = torch.cuda.memory_allocated()
        cfg = EngineConfig(max_num_seqs=args["max_num_seqs"], max_num_batched_tokens=args["max_num_batched_tokens"],
                           gpu_memory_utilization=args["gpu_memory_utilization"])
        engine = build_engine(loaded, cfg, tp, device)
        runner = engine.runner
        info = {"replica": replica, "rank": rank, "weights_gib": weights / GiB, "ready_s": time.perf_counter() - start,
                "read_s": loaded.load_s, "convert_s": loaded.convert_s, "layout": loaded.layout,
                "kv_cache_gib": runner.kv_cache_bytes / GiB,
                "cuda_graphs": runner.graphs is not None, "device": torch.cuda.get_device_name(device)}
        print(f"{layout} replica {replica} rank {rank}: ready in {info['ready_s']:.1f} s", flush=True)
        if rank > 0:
            runner.follow()
        else:
            warm_up(engine, cfg.max_num_batched_tokens)
            for workload in args["workloads"]:
                prompts, output_len = workload_prompts(workload, args["scale"])
                mine = prompts[replica::layout.replicas]
                params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
                barrier.wait(timeout=900)
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                done = engine.generate([Request(str(i), p, params) for i, p in enumerate(mine)])
                print(f"{layout} replica {replica}: {workload} done in {time.perf_counter() - t0:.1f} s", flush=True)
                queue.put(("workload", {"replica": replica, "workload": workload, "wall_s": time.perf_counter() - t0,
                                        "prompt_tokens": sum(len(p) for p in mine),
                                        "generated": sum(len(c.token_ids) for c in done),
                                        "ttft": [c.time_to_first_token_s for c in done]}))
            runner.stop_followers()
        info["peak_gpu_gib"] = torch.cuda.max_memory_allocated() / GiB
        queue.put(("rank", info))
        if layout.tp > 1:  # rank 0 hosts the group's store: nobody tears down while a peer still needs it
            torch.distributed.barrier()
        destroy_tp_group()
    except BaseException:
        queue.put(("error", f"replica {replica} rank {rank}:\n{traceback.format_exc()}"))
        barrier.abort()
        raise


def run_layout(layout: Layout, args: dict) -> dict:
    """Start every rank of every replica, collect what they report, and combine it per workload."""
    from shardgen.actors.model.distributed import free_port

    ctx = mp.get_context("spawn")
    barrier, queue = ctx.Barrier(layout.replicas), ctx.Queue()
    procs = []
    for replica in range(layout.replicas):
        port = free_port()
        procs += [ctx.Process(target=_rank_main, args=(layout, replica, rank, port, args, barrier, queue))
                  for rank in range(layout.tp)]
    for p in procs:
        p.start()
    ranks, runs, errors = [], [], []
    while len(ranks) < len(procs) and not errors:
        try:
            kind, body = queue.get(timeout=30)
        except Exception:  # queue.Empty: check that nobody died silently
            if any(p.exitcode not in (None, 0) for p in procs):
                errors.append(f"a rank exited with {[p.exitcode for p in procs]}")
            continue
        {"rank": ranks, "workload": runs, "error": errors}[kind].append(body)
    for p in procs:  # everything is reported: a rank stuck in teardown only costs a few seconds
        p.join(timeout=15)
        if p.is_alive():
            p.kill()
    if errors:
        raise RuntimeError(errors[0])
    results = []
    for workload in args["workloads"]:
        mine = [r for r in runs if r["workload"] == workload]
        wall = max(r["wall_s"] for r in mine)
        prompt_tokens, generated = sum(r["prompt_tokens"] for r in mine), sum(r["generated"] for r in mine)
        ttft = sorted(t for r in mine for t in r["ttft"])
        results.append({
            "shape": args["shape"], "layout": str(layout), "replicas": layout.replicas, "tp": layout.tp,
            "workload": workload, "prompts": len(ttft), "wall_s": round(wall, 2),
            "total_tok_s": round((prompt_tokens + generated) / wall), "generated_tok_s": round(generated / wall),
            "ttft_mean_s": round(sum(ttft) / len(ttft), 3), "ttft_p50_s": round(ttft[len(ttft) // 2], 3),
            "ranks": sorted(({k: round(v, 2) if isinstance(v, float) else v for k, v in r.items()} for r in ranks),
                            key=lambda r: (r["replica"], r["rank"])),
        })
        print(json.dumps(results[-1]), flush=True)
    return {"results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--layouts", default="1x2,2x1", help="Comma-separated RxT (replicas x tensor-parallel ranks).")
    parser.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS))
    parser.add_argument("--scale", type=float, default=1.0, help="Fraction of each workload's prompts.")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results"))
    a = parser.parse_args()
    layouts = [Layout.parse(x) for x in a.layouts.split(",")]
    workloads = a.workloads.split(",")
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workloads {unknown}; choose from {', '.join(WORKLOADS)}")
    gpus = torch.cuda.device_count()
    if any(layout.gpus > gpus for layout in layouts):
        parser.error(f"layouts {a.layouts} need up to {max(x.gpus for x in layouts)} GPUs; this host has {gpus}")
    checkpoint = a.checkpoint_dir or Path(f"/tmp/shardgen-bench-llama{a.shape}-int4")
    t = time.perf_counter()
    # In a child process: this one stays off the GPUs, so no rank shares its GPU with a stray CUDA context.
    writer = mp.get_context("spawn").Process(target=write_checkpoint, args=(checkpoint,), kwargs={"shape": SHAPES[a.shape]})
    writer.start()
    writer.join()
    if writer.exitcode != 0:
        raise SystemExit(f"writing the checkpoint failed (exit code {writer.exitcode})")
    size = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / GiB
    print(f"checkpoint {checkpoint} ({size:.2f} GiB) ready in {time.perf_counter() - t:.1f} s", flush=True)
    args = {"shape": a.shape, "checkpoint": str(checkpoint), "workloads": workloads, "scale": a.scale,
            "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
            "gpu_memory_utilization": a.gpu_memory_utilization}
    run = time.strftime("%Y-%m-%dT%H:%M:%S")
    results = []
    for layout in layouts:
        for r in run_layout(layout, args)["results"]:
            r["run"], r["checkpoint_gib"] = run, round(size, 2)
            results.append(r)
        device = f"{gpus}x {results[0]['ranks'][0]['device']}"
        save(results, a.results_dir, device)
    print(f"\ntp_bench on {device}, Llama {a.shape} shape, int4 G=128 preshuffled, checkpoint {size:.2f} GiB")
    print(f"{'workload':>14} {'layout':>12} {'prompts':>8} {'total tok/s':>12} {'gen tok/s':>10} {'TTFT s':>8} "
          f"{'ready s':>8} {'weights GiB/rank':>17} {'KV GiB/rank':>12}")
    for r in results:
        rk = r["ranks"]
        print(f"{r['workload']:>14} {r['layout']:>12} {r['prompts']:>8} {r['total_tok_s']:>12,} "
              f"{r['generated_tok_s']:>10,} {r['ttft_mean_s']:>8.2f} {max(x['ready_s'] for x in rk):>8.1f} "
              f"{max(x['weights_gib'] for x in rk):>17.2f} {min(x['kv_cache_gib'] for x in rk):>12.1f}")


def save(results: list[dict], results_dir: Path, device: str) -> None:
    """Merge into tp_bench-<device>.json: a later run of a (shape, layout, workload) replaces the earlier one."""
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"tp_bench-{device.replace(' ', '_')}.json"
    earlier = json.loads(out.read_text())["results"] if out.exists() else []
    key = lambda r: (r["shape"], r["layout"], r["workload"])  # noqa: E731
    fresh = {key(r) for r in results}
    merged = [r for r in earlier if key(r) not in fresh] + results
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "results": merged}, indent=2))
    print(f"wrote {out}", flush=True)


if __name__ == "__main__":
    main()
