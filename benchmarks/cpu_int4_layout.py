"""Which layout should int4 weights take on a CPU rank? Measures, side by side in one run:

- dequantized float32 weights + ``F.linear`` (MKL/oneDNN sgemm)       [shardgen's CPU layout]
- dequantized bfloat16 weights + ``F.linear``
- torch's packed CPU int4 matmul (``_weight_int4pack_mm_for_cpu``, tinygemm-style
  scales and zeros, which is exactly the plain format's ``q * scale + zero``)

Prints a table and writes benchmarks/results/cpu_int4_layout.json.
    python -m benchmarks.cpu_int4_layout [--n 4096 --k 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from shardgen.actors import int4


def bench(fn, repeat: int = 20) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def packed_cpu(t: int4.Int4Tensor):
    """Repack a plain Int4Tensor for torch's CPU int4 kernel: uint4 values (q + 8), scales_and_zeros (K/G, N, 2)."""
    n, k = t.shape
    q_u4 = (int4.unpack(t.qdata).to(torch.int32) + 8)
    w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q_u4, 1)
    sz = torch.stack([t.scale.to(torch.bfloat16), t.zero_point.to(torch.bfloat16)], dim=-1).contiguous()
    return w, sz, int4.group_size_of(t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args()
    torch.manual_seed(0)
    w = torch.randn(args.n, args.k, dtype=torch.bfloat16)
    t = int4.quantize(w, args.group_size)
    w32 = int4.dequantize(t, torch.float32)
    w16 = int4.dequantize(t, torch.bfloat16)
    packed, sz, g = packed_cpu(t)
    rows = []
    for m in (1, 8, 64, 512):
        x32 = torch.randn(m, args.k)
        x16 = x32.to(torch.bfloat16)
        ref = F.linear(x32.double(), w32.double())
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, g, sz)
        rel = ((got.double() - ref).norm() / ref.norm()).item()
        rows.append({
            "M": m,
            "dequant_fp32_us": bench(lambda: F.linear(x32, w32)),
            "dequant_bf16_us": bench(lambda: F.linear(x16, w16)),
            "int4pack_bf16_us": bench(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x16, packed, g, sz)),
            "int4pack_rel_err": rel,
        })
    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    print(f"CPU int4 layouts, N x K = {args.n} x {args.k}, G = {args.group_size} ({device}); median microseconds")
    print(f"{'M':>5} {'fp32 dequant':>14} {'bf16 dequant':>14} {'int4pack bf16':>14} {'int4pack rel err':>17}")
    for r in rows:
        print(f"{r['M']:>5} {r['dequant_fp32_us']:>14.0f} {r['dequant_bf16_us']:>14.0f} {r['int4pack_bf16_us']:>14.0f} {r['int4pack_rel_err']:>17.2e}")
    out = Path(__file__).parent / "results" / "cpu_int4_layout.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"device": device, "n": args.n, "k": args.k, "group_size": args.group_size, "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
