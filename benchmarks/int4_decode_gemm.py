"""shardgen's Triton int4 GEMMs (actors/int4_kernels.py) against cuBLAS bf16 and fbgemm's preshuffled int4, at the
Llama-3.1-8B linear shapes and decode sizes M = 1 .. 256 (and two prefill sizes), one GPU, one process.

For each shape and M it times every candidate config of ``actors.kernel_choice`` and reports the best, as weight
GB/s (int4 bytes incl. scales and zero points, or bf16 bytes) and as time ratio to cuBLAS bf16. Median of
``triton.testing.do_bench`` (CUDA events, L2 flushed between runs).

    python benchmarks/int4_decode_gemm.py [--ms 1,16,64,128,256,2048] [--all-configs]
Writes benchmarks/results/int4_decode_gemm-<device>.json (every config's time, so a table can be rebuilt).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from actors import int4, int4_kernels, kernel_choice  # noqa: E402

RUN = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def time_us(fn) -> float:
    return do_bench(fn, warmup=10, rep=40, return_mode="median") * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,16,64,128,256,2048")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    ms = [int(m) for m in args.ms.split(",")]
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    rows, started = [], time.time()
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        plain = int4.quantize(w, args.group_size)
        words, scale, zero = int4.pack_tiled(plain)
        ref_w = int4.dequantize(plain, torch.float32).to(torch.bfloat16)
        shuffled = int4.convert_for_hardware(torch.nn.Parameter(int4.quantize(w, args.group_size), requires_grad=False),
                                             int4.LAYOUT_PRESHUFFLED, torch.bfloat16)
        scratch = torch.empty(n * k, device="cuda", dtype=torch.bfloat16)
        int4_bytes = words.numel() * 4 + scale.numel() * 2 * 2
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x, ref_w).float()
            bf16_us = time_us(lambda: F.linear(x, w))
            fbgemm_us = time_us(lambda: F.linear(x, shuffled))
            configs = {}
            for cfg in kernel_choice.candidates(m, n, k, n_sm):
                try:
                    got = int4_kernels.linear(x, words, scale, zero, args.group_size, cfg, scratch)
                except OutOfResources:  # a tile too large for this GPU's shared memory or registers
                    continue
                err = ((got.float() - want).norm() / want.norm()).item()
                assert err < 1e-2, (cfg, m, n, k, err)
                configs[cfg.name()] = round(time_us(lambda: int4_kernels.linear(x, words, scale, zero, args.group_size,
                                                                               cfg, scratch)), 2)
            best = min(configs, key=configs.get)
            row = {"shape": name, "N": n, "K": k, "M": m, "bf16_us": round(bf16_us, 2),
                   "fbgemm_preshuffled_us": round(fbgemm_us, 2), "best": best, "best_us": configs[best],
                   "int4_GBps": round(int4_bytes / configs[best] / 1e3, 1), "bf16_GBps": round(n * k * 2 / bf16_us / 1e3, 1),
                   "speedup_vs_bf16": round(bf16_us / configs[best], 2),
                   "speedup_vs_fbgemm": round(fbgemm_us / configs[best], 2), "configs": configs}
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "configs"}), flush=True)
        write(device, args.group_size, rows)  # after every shape: a run cut short keeps what it measured
    print(f"\nint4 decode GEMMs on {device}, median microseconds ({time.time() - started:.0f} s)")
    print(f"{'shape':>8} {'M':>5} {'bf16':>8} {'fbgemm':>8} {'ours':>8} {'GB/s':>7} {'x bf16':>7} {'x fbgemm':>8}  best")
    for r in rows:
        print(f"{r['shape']:>8} {r['M']:>5} {r['bf16_us']:>8} {r['fbgemm_preshuffled_us']:>8} {r['best_us']:>8} "
              f"{r['int4_GBps']:>7} {r['speedup_vs_bf16']:>7} {r['speedup_vs_fbgemm']:>8}  {r['best']}")
    print(f"wrote {write(device, args.group_size, rows)}")


def write(device: str, group_size: int, rows: list[dict]) -> Path:
    out = Path(__file__).parent / "results" / f"int4_decode_gemm-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": device, "run": RUN, "torch": torch.__version__, "group_size": group_size,
                               "rows": rows}, indent=1))
    return out


if __name__ == "__main__":
    main()
