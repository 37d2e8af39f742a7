"""Where does an engine step's time go on the GPU? A Llama-3.1-8B-shaped model with random weights made on the
GPU (int4 G=128 preshuffled, plain, or bf16), one replica, no Ray: engine throughput and a per-step breakdown
(prepare on the host, forward, sampling).

    python -m benchmarks.engine_profile --layouts int4-preshuffled,bf16 --prompts 128 --input-len 32 --output-len 256

Prints a table and writes benchmarks/results/engine_profile-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shardgen.actors.engine.build import build_engine

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.runner import ModelRunner
from shardgen.actors.engine.sequence import Request, SamplingParams
from benchmarks.synthetic import LLAMA_8B, random_model


class TimedRunner(ModelRunner):
    """ModelRunner that records host-side prepare time and device forward time per step."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reset_timers()

    def reset_timers(self) -> None:
        self.prepare_s, self.forward_s, self.steps = 0.0, 0.0, 0

    def prepare(self, batch):
        t = time.perf_counter()
        out = super().prepare(batch)
        self.prepare_s += time.perf_counter() - t
        return out

    def execute(self, step):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = super().execute(step)
        torch.cuda.synchronize()
        self.forward_s += time.perf_counter() - t
        self.steps += 1
        return out


def run(layout: str, args: argparse.Namespace) -> dict:
    loaded = random_model(LLAMA_8B, layout)
    weights_gb = torch.cuda.memory_allocated() / 1e9
    config = EngineConfig(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          cuda_graphs=not args.enforce_eager)
    engine = build_engine(loaded, config, runner_class=TimedRunner)
    runner = engine.runner
    gen = torch.Generator().manual_seed(1)
    params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
    requests = [Request(str(i), torch.randint(0, 128000, (args.input_len,), generator=gen).tolist(), params)
                for i in range(args.prompts)]
    engine.generate(requests[:4])  # warm-up
    runner.reset_timers()
    torch.cuda.synchronize()
    start = time.perf_counter()
    done = engine.generate(requests)
    wall = time.perf_counter() - start
    generated = sum(len(c.token_ids) for c in done)
    prompt = args.prompts * args.input_len
    row = {
        "layout": layout, "weights_gb": round(weights_gb, 2), "load_s": round(loaded.load_s, 1),
        "convert_s": round(loaded.convert_s, 2), "kv_blocks": runner.num_blocks, "wall_s": round(wall, 2),
        "total_tok_s": round((prompt + generated) / wall), "generated_tok_s": round(generated / wall),
        "steps": runner.steps, "ms_per_step": round(1000 * wall / max(runner.steps, 1), 2),
        "forward_ms_per_step": round(1000 * runner.forward_s / max(runner.steps, 1), 2),
        "prepare_ms_per_step": round(1000 * runner.prepare_s / max(runner.steps, 1), 2),
        "other_ms_per_step": round(1000 * (wall - runner.forward_s - runner.prepare_s) / max(runner.steps, 1), 2),
    }
    del engine, runner, loaded
    torch.cuda.empty_cache()
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", default="int4-preshuffled,int4-plain,bf16")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-seqs", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--enforce-eager", action="store_true")
    args = p.parse_args()
    device = torch.cuda.get_device_name()
    rows = []
    for layout in args.layouts.split(","):
        row = run(layout, args)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nengine, one replica, {device}: {args.prompts} prompts x {args.input_len} in / {args.output_len} out")
    print(f"{'layout':>18} {'total tok/s':>12} {'gen tok/s':>10} {'wall s':>8} {'steps':>6} {'ms/step':>8} "
          f"{'forward':>8} {'prepare':>8} {'other':>8}")
    for r in rows:
        print(f"{r['layout']:>18} {r['total_tok_s']:>12} {r['generated_tok_s']:>10} {r['wall_s']:>8} {r['steps']:>6} "
              f"{r['ms_per_step']:>8} {r['forward_ms_per_step']:>8} {r['prepare_ms_per_step']:>8} {r['other_ms_per_step']:>8}")
    out = Path(__file__).parent / "results" / f"engine_profile-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": device, "args": vars(args), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
