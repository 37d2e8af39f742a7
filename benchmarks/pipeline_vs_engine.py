"""Does the Ray Data pipeline keep the engine busy? The mixed workload (1024-token prompts, 128 new tokens) on the
8B-shaped int4 checkpoint of ``shardgen bench``, on one GPU:

1. the engine alone on the tokenized prompts (no Ray);
2. ``shardgen run`` (Ray Data: read Parquet, tokenize, generate, detokenize, write) on 1000 and on 2000 prompts.

The pipeline's steady rate is the marginal one, (tokens(2000) - tokens(1000)) / (wall(2000) - wall(1000)), which
cancels the fixed start-up (Ray, actors, model load); the end-to-end rate of the 1000-prompt run is printed too.

    python benchmarks/pipeline_vs_engine.py
"""

from __future__ import annotations

import json
import random
import string
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from actors.config import EngineConfig  # noqa: E402
from actors.sequence import SamplingParams  # noqa: E402
from jobs.bench import write_checkpoint  # noqa: E402
from jobs.demo import build_byte_tokenizer  # noqa: E402

ENGINE = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192)
PARAMS = SamplingParams(max_new_tokens=128, ignore_eos=True)


def prompts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choices(string.ascii_lowercase, k=1024)) for _ in range(n)]  # byte tokenizer: 1024 tokens


def engine_rate(model: Path, texts: list[str]) -> dict:
    from actors.distributed import SINGLE
    from actors.engine import Engine
    from actors.loader import load_model
    from actors.runner import ModelRunner
    from actors.sequence import Request
    from actors.tokenizer import load_tokenizer

    tok = load_tokenizer(str(model))
    loaded = load_model(model, device="cuda")
    runner = ModelRunner(loaded, SINGLE, torch.device("cuda"), ENGINE, 8192)
    engine = Engine(runner, ENGINE, 8192, set())
    engine.generate([Request("warm", [1] * 9000, SamplingParams(max_new_tokens=4, ignore_eos=True))])
    requests = [Request(str(i), tok(t)["input_ids"], PARAMS) for i, t in enumerate(texts)]
    start = time.perf_counter()
    done = engine.generate(requests)
    wall = time.perf_counter() - start
    tokens = sum(len(r.prompt_token_ids) for r in requests) + sum(len(c.token_ids) for c in done)
    del engine, runner, loaded
    torch.cuda.empty_cache()
    return {"wall_s": round(wall, 2), "tokens": tokens, "total_tok_s": round(tokens / wall)}


def pipeline_run(model: Path, texts: list[str], work: Path, name: str) -> dict:
    from pipeline.options import RunOptions
    from pipeline.run import run

    inp = work / f"{name}.parquet"
    pq.write_table(pa.table({"id": [f"{name}-{i}" for i in range(len(texts))], "prompt": texts}), inp)
    began = time.time()
    s = run(RunOptions(model=model, input=inp, output=work / f"out-{name}", device="cuda", batch_size=128,
                       overwrite=True, sampling=PARAMS, engine=ENGINE))
    assert s.rows == len(texts) and s.errors == 0, (s.rows, s.errors)
    tokens = s.prompt_tokens + s.generated_tokens
    # When output landed (part files' modification times): the first file marks the end of start-up.
    landed = sorted(f.stat().st_mtime - began for f in (work / f"out-{name}").glob("*.parquet"))
    row = {"rows": s.rows, "wall_s": round(s.wall_s, 2), "tokens": tokens, "total_tok_s": round(tokens / s.wall_s),
           "layout": s.layout, "first_file_s": round(landed[0], 1), "last_file_s": round(landed[-1], 1),
           "files": len(landed)}
    ready = rank0_ready(began)
    if ready:  # when the replica's worker was created and ready, from the start of the run
        row.update(worker_created_s=round(ready["created_at"] - began, 1), worker_ready_s=round(ready["ready_at"] - began, 1),
                   worker=ready)
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
    device = torch.cuda.get_device_name()
    model = write_checkpoint(Path("/tmp/shardgen-bench-llama8b-int4"))
    if not (model / "tokenizer.json").exists():
        build_byte_tokenizer(model)
    texts = prompts(2000, seed=0)
    engine = engine_rate(model, texts[:1000])
    print("engine", json.dumps(engine), flush=True)
    with tempfile.TemporaryDirectory() as work:
        p1 = pipeline_run(model, texts[:1000], Path(work), "p1000")
        print("pipeline 1000", json.dumps(p1), flush=True)
        p2 = pipeline_run(model, texts, Path(work), "p2000")
        print("pipeline 2000", json.dumps(p2), flush=True)
    marginal = (p2["tokens"] - p1["tokens"]) / (p2["wall_s"] - p1["wall_s"])
    row = {"device": device, "engine": engine, "pipeline_1000": p1, "pipeline_2000": p2,
           "pipeline_marginal_tok_s": round(marginal), "marginal_over_engine": round(marginal / engine["total_tok_s"], 3),
           "end_to_end_over_engine": round(p1["total_tok_s"] / engine["total_tok_s"], 3)}
    print(json.dumps(row))
    out = Path(__file__).parent / "results" / f"pipeline_vs_engine-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps(row, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
