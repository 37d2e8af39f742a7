"""What an fp8 KV cache costs in quality, on the embedded demo model (plain int4, G=128).

    python -m benchmarks.kv_cache_quality                    # on a GPU (bf16, the int4 layout of --int4-layout)
    python -m benchmarks.kv_cache_quality --device cpu --eval-tokens 16384    # float32, the CPU layout

- Held-out perplexity with every key and value read back from the paged cache, as decode reads them: each window
  of 256 tokens is written to the cache and attends through it (a prefill over the cache, not over its own
  unquantized keys), once per ``--kv-cache-dtype``.
- Greedy completions of the 200 demo prompts (48 tokens) through the engine, fp8 against the model-dtype cache:
  tokens identical position by position and before the first divergence.

The held-out text is the standard library's every 20th file (``scripts/train_demo_model.py``); on the Python
the demo was trained with (3.12) it is the model's own held-out set. Writes ``results/kv_cache_quality-<device>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


import torch

from scripts.train_demo_model import agreement, encode, greedy, perplexity, read, source_files, windows

BLOCK_SIZE = 16


def cached_logits_fn(model, device: torch.device, kv_cache_dtype: str):
    """``logits_of(ids (B, L))`` with attention through a fresh paged cache of ``kv_cache_dtype``."""
    from shardgen.actors.kernels import kv_cache
    from shardgen.actors.model.attention import AttentionMetadata
    from shardgen.actors.engine.runner import StepInput

    attn = model.model.layers[0].self_attn
    dtype = model.model.embed_tokens.weight.dtype

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        b, length = ids.shape
        step = StepInput.prefill([length] * b, BLOCK_SIZE)
        caches = kv_cache.allocate(len(model.model.layers), int(step.block_tables.max()) + 1, BLOCK_SIZE,
                                   attn.num_kv_heads, attn.head_dim, dtype, kv_cache_dtype, device)
        to = lambda t: t.to(device)  # noqa: E731
        meta = AttentionMetadata(to(step.cu_seqlens_q), to(step.context_lens), length, length, to(step.slot_mapping),
                                 to(step.block_tables))  # no parts: every token attends through the cache
        with torch.inference_mode():
            hidden = model(to(ids.flatten()), to(step.positions), meta, caches)
            return model.compute_logits(hidden).view(b, length, -1)

    return logits_of


def demo_eval_set(eval_tokens: int) -> tuple[Path, torch.Tensor, list[list[int]]]:
    """The demo model's directory, its held-out windows (``eval_tokens`` at most) and the token ids of its 200
    demo prompts: what every quality benchmark on the demo model measures with."""
    from transformers import AutoTokenizer

    from shardgen.jobs.demo import demo_assets

    model_dir, prompts_file = demo_assets()
    tok = AutoTokenizer.from_pretrained(model_dir)
    _, held = source_files()
    wins = windows(encode(tok, read(held)), eval_tokens)
    rows = [json.loads(line) for line in prompts_file.read_text().splitlines()]
    return model_dir, wins, [tok(r["prompt"])["input_ids"] for r in rows]


def write_results(results: dict, results_dir: Path, stem: str) -> None:
    """Print ``results`` and write them to ``results_dir/<stem>.json``."""
    print(json.dumps(results, indent=1))
    results_dir.mkdir(parents=True, exist_ok=True)
    out = results_dir / f"{stem}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--int4-layout", default="auto")
    p.add_argument("--eval-tokens", type=int, default=262_144)
    p.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args()
    from shardgen.actors.model.loader import load_model

    model_dir, wins, ids = demo_eval_set(a.eval_tokens)
    device = torch.device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    loaded = load_model(model_dir, device=a.device, int4_layout=a.int4_layout)
    results: dict = {"device": name, "python": sys.version.split()[0], "layout": loaded.layout,
                     "dtype": str(loaded.model.model.embed_tokens.weight.dtype), "eval_tokens": wins[:, 1:].numel(),
                     "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "perplexity": {}}
    for kv in ("auto", "fp8"):
        results["perplexity"][kv] = round(perplexity(cached_logits_fn(loaded.model, device, kv), wins), 4)
        print(f"perplexity, {kv} KV cache: {results['perplexity'][kv]:.4f}", flush=True)
    ppl = results["perplexity"]
    results["fp8_increase"] = round(ppl["fp8"] / ppl["auto"] - 1, 5)
    runs = {kv: greedy(model_dir, a.device, ids, 48, int4_layout=a.int4_layout, kv_cache_dtype=kv)
            for kv in ("auto", "fp8")}
    results["greedy fp8 vs auto"] = agreement(runs["auto"], runs["fp8"])
    write_results(results, a.results_dir, f"kv_cache_quality-{name.replace(' ', '_')}")


if __name__ == "__main__":
    main()
