"""Launch shapes of the paged-attention kernel at Llama-3.1-8B shapes on the GPU: decode (128 sequences, contexts
of 1-2100 tokens) and prefill (2 x 4096 new tokens), each timed per layer with ``triton.testing.do_bench``.

    python -m benchmarks.attention_configs [--kv-cache-dtype fp8] [--phases decode]

Prints a table (effective KV bandwidth for decode, TFLOP/s for prefill) and writes
benchmarks/results/attention_configs-<device>.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton

from shardgen.actors.kernels import paged_attention as pa
from benchmarks.synthetic import make_case


def time_us(q_lens: list[int], ctx: list[int], launch: dict, key: str, kv_cache_dtype: str = "auto") -> float:
    q, k, v, cache, meta = make_case(q_lens, ctx, 32, 8, 128, torch.bfloat16, "cuda", kv_cache_dtype=kv_cache_dtype)
    saved = dict(getattr(pa, key))
    getattr(pa, key).update(launch)
    try:
        fn = lambda: pa.paged_attention(q, cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables,  # noqa: E731
                                        max(q_lens), 128 ** -0.5)
        return triton.testing.do_bench(fn, warmup=10, rep=50) * 1000
    finally:
        getattr(pa, key).update(saved)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    p.add_argument("--phases", default="decode,prefill")
    a = p.parse_args()
    device = torch.cuda.get_device_name()
    ctx = torch.randint(1, 2100, (128,), generator=torch.Generator().manual_seed(3)).tolist()
    kv_bytes = sum(ctx) * 8 * 2 * (128 * (1 if a.kv_cache_dtype == "fp8" else 2) + (4 if a.kv_cache_dtype == "fp8" else 0))
    rows = []
    phases = a.phases.split(",")
    decode = itertools.product((32, 64, 128, 256), (2, 4, 8), (2, 3, 4)) if "decode" in phases else ()
    for tile, warps, stages in decode:
        launch = {"rows": 16, "key_tile": tile, "num_warps": warps, "num_stages": stages}
        try:
            us = time_us([1] * 128, ctx, launch, "DECODE", a.kv_cache_dtype)
        except Exception as e:  # out of shared memory or registers for this shape
            print(f"decode {launch}: {type(e).__name__}")
            continue
        rows.append({"phase": "decode", **launch, "us": round(us, 1), "GB/s": round(kv_bytes / us / 1e3)})
        print(rows[-1], flush=True)
    flops = 2 * 4 * 32 * 128 * 4096 * 4096 / 2  # 2 sequences, QK and PV, causal half
    prefill = itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)) if "prefill" in phases else ()
    for rows_, tile, warps, stages in prefill:
        launch = {"rows": rows_, "key_tile": tile, "num_warps": warps, "num_stages": stages}
        try:
            us = time_us([4096, 4096], [4096, 4096], launch, "PREFILL", a.kv_cache_dtype)
        except Exception as e:
            print(f"prefill {launch}: {type(e).__name__}")
            continue
        rows.append({"phase": "prefill", **launch, "us": round(us, 1), "TFLOP/s": round(flops / us / 1e6)})
        print(rows[-1], flush=True)
    for phase in phases:
        best = min((r for r in rows if r["phase"] == phase), key=lambda r: r["us"])
        now = next((r for r in rows if r["phase"] == phase and all(r[k] == v for k, v in
                    (pa.DECODE if phase == "decode" else pa.PREFILL).items())), None)
        print(f"{phase}: best {best}; current {now}")
    suffix = "-fp8-kv" if a.kv_cache_dtype == "fp8" else ""
    out = Path(__file__).parent / "results" / f"attention_configs-{device.replace(' ', '_')}{suffix}.json"
    out.write_text(json.dumps({"device": device, "triton": triton.__version__, "kv_cache_dtype": a.kv_cache_dtype,
                               "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
