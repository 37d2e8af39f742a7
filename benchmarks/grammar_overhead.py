"""The host cost of structured outputs per decode step: xgrammar against llguidance (both on PyPI), on one tokenizer.

For each constraint (a JSON schema, a regex, a list of choices) and library: the time to compile it, and per step
the time to fill one row's token bitmask and to advance the matcher by a token, over walks that sample a random
allowed token at each step until the language is complete (``--walks`` of them). The masks are filled on the host
by both libraries; applying them on the device is one kernel for a whole step, the same for both.

    python -m benchmarks.grammar_overhead [--tokenizer DIR] [--walks 20]
Writes benchmarks/results/grammar_overhead-<tokenizer>.json. Needs xgrammar (a shardgen dependency) and llguidance.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "tags", "address"],
          "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0},
                         "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 4},
                         "address": {"type": "object", "required": ["city"], "additionalProperties": False,
                                     "properties": {"city": {"type": "string", "maxLength": 16}}}}}
CONSTRAINTS = {"json_schema": json.dumps(SCHEMA), "regex": r"[A-Z][a-z]{2,12} [0-9]{1,4}(\.[0-9]{2})?",
               "choice": json.dumps(["positive", "negative", "neutral"])}


def allowed(bitmask: torch.Tensor, vocab: int) -> list[int]:
    bits = bitmask.view(torch.int32).flatten()
    return [i for i in range(vocab) if (int(bits[i // 32]) >> (i % 32)) & 1]


def walk_xgrammar(tokenizer, vocab: int, kind: str, text: str, walks: int, rng: random.Random) -> dict:
    import xgrammar as xgr

    from shardgen.actors.engine.grammar import Grammars

    grammars = Grammars(tokenizer, vocab)
    start = time.perf_counter()
    compiled = grammars.compile(kind, text)
    compile_s = time.perf_counter() - start
    stop = set(grammars.info.stop_token_ids)
    fills, accepts = [], []
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    for _ in range(walks):
        matcher = xgr.GrammarMatcher(compiled)
        for _ in range(256):
            t0 = time.perf_counter()
            matcher.fill_next_token_bitmask(bitmask, 0)
            fills.append(time.perf_counter() - t0)
            choices = allowed(bitmask, vocab)
            token = rng.choice([c for c in choices if c not in stop] or choices)
            t0 = time.perf_counter()
            matcher.accept_token(token)
            accepts.append(time.perf_counter() - t0)
            if token in stop or matcher.is_terminated():
                break
    return {"compile_ms": compile_s * 1e3, "fill_us": statistics.median(fills) * 1e6,
            "fill_p99_us": sorted(fills)[int(0.99 * (len(fills) - 1))] * 1e6,
            "accept_us": statistics.median(accepts) * 1e6, "steps": len(fills)}


def walk_llguidance(tokenizer, vocab: int, kind: str, text: str, walks: int, rng: random.Random) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab)
    start = time.perf_counter()
    if kind == "json_schema":
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults={"whitespace_flexible": False})
    elif kind == "regex":
        grammar = llguidance.LLMatcher.grammar_from_regex(text)
    else:
        grammar = llguidance.LLMatcher.grammar_from_regex("|".join(
            "".join(f"\\{c}" if not c.isalnum() else c for c in s) for s in json.loads(text)))
    llguidance.LLMatcher(lltok, grammar)  # compiled lazily: the first matcher pays
    compile_s = time.perf_counter() - start
    fills, accepts = [], []
    bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)
    for _ in range(walks):
        matcher = llguidance.LLMatcher(lltok, grammar)
        for _ in range(256):
            t0 = time.perf_counter()
            llguidance.torch.fill_next_token_bitmask(matcher, bitmask, 0)
            fills.append(time.perf_counter() - t0)
            choices = allowed(bitmask, vocab)
            token = rng.choice([c for c in choices if c != lltok.eos_token] or choices)
            t0 = time.perf_counter()
            matcher.consume_token(token)
            accepts.append(time.perf_counter() - t0)
            if matcher.is_stopped() or token == lltok.eos_token:
                break
    return {"compile_ms": compile_s * 1e3, "fill_us": statistics.median(fills) * 1e6,
            "fill_p99_us": sorted(fills)[int(0.99 * (len(fills) - 1))] * 1e6,
            "accept_us": statistics.median(accepts) * 1e6, "steps": len(fills)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default=None, help="a tokenizer directory (default: the demo model's)")
    parser.add_argument("--walks", type=int, default=20)
    args = parser.parse_args()
    from shardgen.actors.model.tokenizer import load_tokenizer
    from shardgen.jobs.demo import demo_assets

    path = args.tokenizer or str(demo_assets()[0])
    tokenizer = load_tokenizer(path)
    vocab = len(tokenizer)
    rows = []
    for kind, text in CONSTRAINTS.items():
        for name, walk in (("xgrammar", walk_xgrammar), ("llguidance", walk_llguidance)):
            row = {"constraint": kind, "library": name, **walk(tokenizer, vocab, kind, text, args.walks,
                                                               random.Random(0))}
            rows.append(row)
            print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    print(f"\nper-step host cost on {Path(path).name}'s tokenizer ({vocab} tokens), one row:")
    print(f"{'constraint':>12} {'library':>11} {'compile ms':>11} {'fill us':>8} {'p99 us':>8} {'accept us':>10}")
    for r in rows:
        print(f"{r['constraint']:>12} {r['library']:>11} {r['compile_ms']:>11.2f} {r['fill_us']:>8.1f} "
              f"{r['fill_p99_us']:>8.1f} {r['accept_us']:>10.1f}")
    out = Path(__file__).parent / "results" / f"grammar_overhead-{Path(path).name}.json"
    out.write_text(json.dumps({"tokenizer": path, "vocab": vocab, "walks": args.walks, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
