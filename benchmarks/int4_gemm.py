"""int4 GEMM kernels at the shapes of a Llama-3.1-8B layer, side by side on one GPU: bf16 F.linear (cuBLAS),
plain Int4Tensor (fbgemm bf16i4bf16_rowwise), Int4PreshuffledTensor (fbgemm bf16i4bf16_shuffled), all through
shardgen's own quantize + convert path. Median microseconds (CUDA events, triton.testing.do_bench).

    python -m benchmarks.int4_gemm
Writes benchmarks/results/int4_gemm-<device>.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from shardgen.actors import int4

SHAPES = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)]  # qkv, o, gate_up, down, lm_head


def main() -> None:
    device = torch.cuda.get_device_name()
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        plain = int4.convert_for_hardware(torch.nn.Parameter(int4.quantize(w, 128), requires_grad=False), int4.LAYOUT_PLAIN, torch.bfloat16)
        shuffled = int4.convert_for_hardware(torch.nn.Parameter(int4.quantize(w, 128), requires_grad=False), int4.LAYOUT_PRESHUFFLED, torch.bfloat16)
        for m in (1, 128, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            row = {"N": n, "K": k, "M": m}
            for name, weight in (("bf16", w), ("plain", plain), ("preshuffled", shuffled)):
                row[name] = round(do_bench(lambda: F.linear(x, weight), warmup=25, rep=100, return_mode="median") * 1000, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nint4 GEMMs on {device}, median microseconds")
    print(f"{'N x K':>14} {'M':>5} {'bf16':>8} {'plain':>8} {'preshuffled':>12}")
    for r in rows:
        print(f"{r['N']:>7} x {r['K']:<5} {r['M']:>5} {r['bf16']:>8} {r['plain']:>8} {r['preshuffled']:>12}")
    out = Path(__file__).parent / "results" / f"int4_gemm-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
