"""shardgen's Triton int4 GEMMs (actors/int4/tiled.py) against cuBLAS bf16 and fbgemm's preshuffled int4, at the
Llama-3.1-8B linear shapes and decode sizes M = 1 .. 256 (and two prefill sizes), one GPU, one process.

For each shape and M it times every candidate config of ``actors.kernel_choice`` and reports the best, as weight
GB/s (int4 bytes incl. scales and zero points, or bf16 bytes) and as time ratio to cuBLAS bf16.

How it times: the engine decodes under CUDA graphs, so what counts is a kernel's time on the GPU, not the ~20 us a
Python launch costs. Each measurement is one captured graph that calls the linear many times, cycling through enough
copies of the weights that none is still in L2 when it comes round again (as in a model, where 32 layers' weights
pass through the cache in turn); the median over replays is divided by the number of calls. The candidates are
compiled first by a pool of processes (Triton's on-disk cache), so that the timing process only loads them.

    python -m benchmarks.int4_decode_gemm [--ms 1,16,64,128,256,2048] [--all-configs]
Writes benchmarks/results/int4_decode_gemm-<device>.json (every config's time, so a table can be rebuilt).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import multiprocessing as mp
import os
from dataclasses import asdict

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from shardgen.actors import int4
from shardgen.actors.int4 import kernel_choice, tiled
from shardgen.actors.int4.kernel_choice import graph_time_us, weight_copies

RUN = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def compile_configs(job: tuple[int, int, int, int, list]) -> int:
    """In a pool worker: compile every config of one (M, N, K) into Triton's on-disk cache."""
    m, n, k, group_size, configs = job
    words = torch.zeros(k // 8, n, dtype=torch.int32, device="cuda")
    scale = torch.ones(k // group_size, n, dtype=torch.bfloat16, device="cuda")
    x = torch.zeros(m, k, dtype=torch.bfloat16, device="cuda")
    done = 0
    for cfg in configs:
        try:
            tiled.linear(x, words, scale, scale, group_size, cfg, None)
            done += 1
        except OutOfResources:
            pass
    return done


def precompile(ms: list[int], shapes: list[str], group_size: int, n_sm: int) -> None:
    jobs = []
    for name in shapes:
        n, k = SHAPES[name]
        for m in ms:
            configs = [c for c in kernel_choice.candidates(m, n, k, n_sm) if c.kernel != "dequant"]
            jobs += [(m, n, k, group_size, configs[i::4]) for i in range(4)]
    started = time.time()
    with mp.get_context("spawn").Pool(min(len(jobs), max(1, (os.cpu_count() or 2) - 2))) as pool:
        compiled = sum(pool.map(compile_configs, jobs, chunksize=1))
    print(f"compiled {compiled} kernels in {time.time() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,16,64,128,256,2048")
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--write-table", action="store_true",
                        help="also write the winners as actors/int4/kernel_tables/<device>.json, the table the engine uses")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    dev = torch.device("cuda")
    ms = [int(m) for m in args.ms.split(",")]
    shapes = args.shapes.split(",")
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    precompile(ms, shapes, args.group_size, n_sm)
    rows, table, started = [], {}, time.time()
    for name in shapes:
        n, k = SHAPES[name]
        int4_bytes = n * k // 2 + (k // args.group_size) * n * 2 * 2
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(weight_copies(n * k * 2, dev))]
        packed, shuffled = [], []
        for i in range(weight_copies(int4_bytes, dev)):
            plain = int4.quantize(ws[i % len(ws)], args.group_size)
            packed.append(int4.pack_tiled(plain))
            shuffled.append(int4.convert_for_hardware(torch.nn.Parameter(plain, requires_grad=False),
                                                      int4.LAYOUT_PRESHUFFLED, torch.bfloat16))
        ref_w = int4.dequantize(int4.quantize(ws[0], args.group_size), torch.float32).to(torch.bfloat16)
        scratch = torch.empty(n * k, device="cuda", dtype=torch.bfloat16)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = F.linear(x, ref_w).float()
            bf16_us = graph_time_us([lambda w=w: F.linear(x, w) for w in ws])
            try:
                fbgemm_us = graph_time_us([lambda w=w: F.linear(x, w) for w in shuffled])
            except RuntimeError as e:  # fbgemm's kernel refusing capture is a finding, not a crash
                print(f"fbgemm preshuffled at M={m}: {e}", flush=True)
                fbgemm_us = float("nan")
            configs, by_name = {}, {}
            for cfg in kernel_choice.candidates(m, n, k, n_sm):
                by_name[cfg.name()] = cfg
                def run(p: tuple = packed[0], cfg=cfg) -> torch.Tensor:
                    return tiled.linear(x, *p, args.group_size, cfg, scratch)
                try:
                    got = run()
                except OutOfResources:  # a tile too large for this GPU's shared memory or registers
                    continue
                err = ((got.float() - want).norm() / want.norm()).item()
                assert err < 1e-2, (cfg, m, n, k, err)
                configs[cfg.name()] = round(graph_time_us([lambda p=p, run=run: run(p) for p in packed]), 2)
            best = min(configs, key=configs.get)
            table.setdefault(f"{n}x{k}/g{args.group_size}", {})[str(m)] = asdict(by_name[best])
            row = {"shape": name, "N": n, "K": k, "M": m, "bf16_us": round(bf16_us, 2),
                   "fbgemm_preshuffled_us": round(fbgemm_us, 2), "best": best, "best_us": configs[best],
                   "int4_GBps": round(int4_bytes / configs[best] / 1e3, 1), "bf16_GBps": round(n * k * 2 / bf16_us / 1e3, 1),
                   "speedup_vs_bf16": round(bf16_us / configs[best], 2),
                   "speedup_vs_fbgemm": round(fbgemm_us / configs[best], 2), "configs": configs}
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ != "configs"}), flush=True)
        write(device, args.group_size, rows)  # after every shape: a run cut short keeps what it measured
        del ws, packed, shuffled, scratch
    print(f"\nint4 decode GEMMs on {device}, GPU microseconds a call under CUDA graphs ({time.time() - started:.0f} s)")
    print(f"{'shape':>8} {'M':>5} {'bf16':>8} {'fbgemm':>8} {'ours':>8} {'GB/s':>7} {'x bf16':>7} {'x fbgemm':>8}  best")
    for r in rows:
        print(f"{r['shape']:>8} {r['M']:>5} {r['bf16_us']:>8} {r['fbgemm_preshuffled_us']:>8} {r['best_us']:>8} "
              f"{r['int4_GBps']:>7} {r['speedup_vs_bf16']:>7} {r['speedup_vs_fbgemm']:>8}  {r['best']}")
    print(f"wrote {write(device, args.group_size, rows)}")
    if args.write_table:
        out = Path(kernel_choice.TABLES) / f"{device.replace(' ', '_')}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps({"device": device, "run": RUN, "source": "benchmarks/int4_decode_gemm.py",
                                   "shapes": table}, indent=1))
        print(f"wrote {out}")


def write(device: str, group_size: int, rows: list[dict]) -> Path:
    out = Path(__file__).parent / "results" / f"int4_decode_gemm-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": device, "run": RUN, "timing": "cuda-graph", "torch": torch.__version__,
                               "group_size": group_size,
                               "rows": rows}, indent=1))
    return out


if __name__ == "__main__":
    main()
