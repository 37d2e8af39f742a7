"""What an int4 layout's arithmetic costs in quality, on the embedded demo model (plain int4, G=128), on one GPU.

    python -m benchmarks.int4_layout_quality [--layouts int4-preshuffled,int4-humming,int4-humming-fp8act]

Every layout computes with the checkpoint's own int4 codes, scales and zero points; they differ in how the
product is formed (bf16 activations against fbgemm's or humming's dequantization, or e4m3 activations on fp8
tensor cores for ``int4-humming-fp8act``). For each: held-out perplexity through the paged cache (as
``kv_cache_quality`` measures it) and greedy completions of the 200 demo prompts (48 tokens), compared with the
first layout's. Writes ``results/int4_layout_quality-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.kv_cache_quality import cached_logits_fn
from scripts.train_demo_model import agreement, encode, greedy, perplexity, read, source_files, windows

LAYOUTS = "int4-preshuffled,int4-humming,int4-humming-fp8act"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default=LAYOUTS, help="the first is the reference of the greedy comparison")
    p.add_argument("--eval-tokens", type=int, default=262_144)
    p.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args()
    from transformers import AutoTokenizer

    from shardgen.actors.model.loader import load_model
    from shardgen.jobs.demo import demo_assets

    model_dir, prompts_file = demo_assets()
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, held = source_files()
    wins = windows(encode(tok, read(held)), a.eval_tokens)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    ids = [tok(r["prompt"])["input_ids"] for r in rows]
    layouts = a.layouts.split(",")
    results: dict = {"device": name, "python": sys.version.split()[0], "eval_tokens": wins[:, 1:].numel(),
                     "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "perplexity": {}, "greedy_vs_" + layouts[0]: {}}
    completions = {}
    for layout in layouts:
        loaded = load_model(model_dir, device=device, int4_layout=layout)
        results["perplexity"][layout] = round(perplexity(cached_logits_fn(loaded.model, device, "auto"), wins), 4)
        del loaded
        completions[layout] = greedy(model_dir, "cuda", ids, 48, int4_layout=layout)
        results["greedy_vs_" + layouts[0]][layout] = agreement(completions[layouts[0]], completions[layout])
        print(layout, results["perplexity"][layout], results["greedy_vs_" + layouts[0]][layout], flush=True)
    base = results["perplexity"][layouts[0]]
    results["perplexity_increase"] = {la: round(v / base - 1, 5) for la, v in results["perplexity"].items()}
    print(json.dumps(results, indent=1))
    a.results_dir.mkdir(parents=True, exist_ok=True)
    out = a.results_dir / f"int4_layout_quality-{name.replace(' ', '_')}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
