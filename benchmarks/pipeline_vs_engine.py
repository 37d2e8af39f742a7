"""Does the Ray Data pipeline keep the engine busy? The mixed workload (1024-token prompts, 128 new tokens) on the
8B-shaped int4 checkpoint of ``shardgen bench``, on one GPU:

1. the engine alone on the tokenized prompts (no Ray), timed from a loaded, warm engine;
2. ``shardgen run`` (Ray Data: read Parquet, tokenize, generate, detokenize, write) on 1000 prompts in batches of
   each of ``--batch-sizes`` rows, and on 2000 prompts in batches of the first (unless ``--no-marginal``); each run
   starts its own Ray (shut down after).

For each run: the end-to-end rate (tokens / the run's wall time, start-up included), and the rate from the moment
the replica was ready (tokens / (last output file - rank 0 ready)), which, like the engine's, leaves out start-up
and model load but keeps everything the pipeline adds while generating (Ray Data's batches, tokenizing,
detokenizing, Parquet). The marginal rate, (tokens(2000) - tokens(1000)) / (wall(2000) - wall(1000)) at the first
batch size, cancels the start-up both runs pay.

    python -m benchmarks.pipeline_vs_engine --batch-sizes auto,64
"""

from __future__ import annotations

import argparse
import json
import random
import string
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from shardgen.actors.engine.build import build_engine

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.sequence import SamplingParams
from benchmarks.synthetic import write_checkpoint
from shardgen.jobs.demo import build_byte_tokenizer

ENGINE = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192)
PARAMS = SamplingParams(max_new_tokens=128, ignore_eos=True)


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=1024)) for _ in range(n)]  # byte tokenizer: 1024 tokens


def engine_rate(model: Path, texts: list[str]) -> dict:
    from shardgen.actors.model.loader import load_model
    from shardgen.actors.engine.sequence import Request
    from shardgen.actors.model.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model))
    loaded = load_model(model, device="cuda")
    engine = build_engine(loaded, ENGINE)
    engine.generate([Request("warm", [1] * 9000, SamplingParams(max_new_tokens=4, ignore_eos=True))])
    requests = [Request(str(i), tok(t)["input_ids"], PARAMS) for i, t in enumerate(texts)]
    start = time.perf_counter()
    done = engine.generate(requests)
    wall = time.perf_counter() - start
    tokens = sum(len(r.prompt_token_ids) for r in requests) + sum(len(c.token_ids) for c in done)
    del engine, loaded
    torch.cuda.empty_cache()
    return {"wall_s": round(wall, 2), "tokens": tokens, "total_tok_s": round(tokens / wall)}


def pipeline_run(model: Path, texts: list[str], work: Path, name: str, batch_size: int | None) -> dict:
    import ray

    from shardgen.pipeline.options import RunOptions
    from shardgen.pipeline.run import run

    inp = work / f"{name}.parquet"
    pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(len(texts))], "prompt": texts}), inp)
    began = time.time()
    s = run(RunOptions(model=model, input=inp, output=work / f"out-{name}", device="cuda", batch_size=batch_size,
                       overwrite=True, sampling=PARAMS, engine=ENGINE))
    assert s.rows == len(texts) and s.errors == 0, (s.rows, s.errors)
    tokens = s.prompt_tokens + s.generated_tokens
    # When output landed (part files' modification times): the first file marks the end of start-up.
    landed = sorted(f.stat().st_mtime - began for f in (work / f"out-{name}").glob("*.parquet"))
    row = {"rows": s.rows, "batch_size": batch_size or "auto", "wall_s": round(s.wall_s, 2), "tokens": tokens,
           "total_tok_s": round(tokens / s.wall_s), "layout": s.layout, "first_file_s": round(landed[0], 1),
           "last_file_s": round(landed[-1], 1), "files": len(landed)}
    ready = rank0_ready(began)
    if ready:  # when the replica's worker was created and ready, from the start of the run
        row.update(worker_created_s=round(ready["created_at"] - began, 1), worker_ready_s=round(ready["ready_at"] - began, 1),
                   from_ready_tok_s=round(tokens / (landed[-1] - (ready["ready_at"] - began))), worker=ready)
    ray.shutdown()  # the next run pays its own start-up, so the marginal rate cancels it
    return row


def rank0_ready(began: float) -> dict | None:
    """The timings rank 0 printed to its Ray worker log when it became ready (actors/worker.py), for this run."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    found = []
    for f in logs.glob("worker-*.out"):
        for line in f.read_text(errors="replace").splitlines():
            if "shardgen rank 0 ready: " in line:
                t = json.loads(line.split("shardgen rank 0 ready: ", 1)[1])
                if t["ready_at"] >= began:
                    found.append(t)
    return min(found, key=lambda t: t["ready_at"]) if found else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-sizes", default="auto,64",
                   help="--batch-size of each 1000-prompt run ('auto': the CLI's default, left to shardgen)")
    p.add_argument("--no-marginal", action="store_true", help="skip the 2000-prompt run")
    args = p.parse_args()
    sizes = [None if b == "auto" else int(b) for b in args.batch_sizes.split(",")]
    device = torch.cuda.get_device_name()
    model = write_checkpoint(Path("/tmp/shardgen-bench-llama8b-int4"))
    if not (model / "tokenizer.json").exists():
        build_byte_tokenizer(model)
    texts = prompts(2000, seed=0)
    engine = engine_rate(model, texts[:1000])
    print("engine", json.dumps(engine), flush=True)
    runs = {}
    with tempfile.TemporaryDirectory() as work:
        plan = [(f"p1000-b{b or 'auto'}", 1000, b) for b in sizes] + ([] if args.no_marginal else [("p2000", 2000, sizes[0])])
        for name, n, batch in plan:
            runs[name] = pipeline_run(model, texts[:n], Path(work), name, batch)
            print(name, json.dumps(runs[name]), flush=True)
    rate = engine["total_tok_s"]
    row = {"device": device, "engine": engine, "runs": runs}
    print(f"\nmixed workload on {device}: engine alone {rate:,} tok/s (loaded, warm)")
    print(f"{'run':>12} {'batch':>6} {'wall s':>7} {'ready at s':>10} {'end to end':>11} {'x engine':>9} "
          f"{'from ready':>11} {'x engine':>9}")
    for name, r in runs.items():
        r["end_to_end_over_engine"] = round(r["total_tok_s"] / rate, 3)
        r["from_ready_over_engine"] = round(r.get("from_ready_tok_s", 0) / rate, 3)
        print(f"{name:>12} {r['batch_size']:>6} {r['wall_s']:>7} {r.get('worker_ready_s', '-'):>10} "
              f"{r['total_tok_s']:>11,} {r['end_to_end_over_engine']:>9} {r.get('from_ready_tok_s', 0):>11,} "
              f"{r['from_ready_over_engine']:>9}")
    if not args.no_marginal:
        p1, p2 = runs[f"p1000-b{sizes[0] or 'auto'}"], runs["p2000"]
        marginal = (p2["tokens"] - p1["tokens"]) / (p2["wall_s"] - p1["wall_s"])
        row.update(pipeline_marginal_tok_s=round(marginal), marginal_over_engine=round(marginal / rate, 3))
        print(f"marginal (p2000 - p1000): {round(marginal):,} tok/s = {row['marginal_over_engine']}x the engine")
    out = Path(__file__).parent / "results" / f"pipeline_vs_engine-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
