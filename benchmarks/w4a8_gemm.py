"""fp8 activations x int4 weights (actors/int4/w4a8.py) against cuBLAS bf16 and fbgemm's int4 kernels, at the
Llama-3.1-8B linear shapes, one GPU, one process: time per call and how exactly each reproduces the int4 weights.

Systems per (shape, M):
- ``bf16``: cuBLAS on the bf16 weight;
- ``fbgemm_bf16i4``: fbgemm's preshuffled W4A16 (``bf16i4bf16_shuffled``, shardgen's default int4 path);
- ``fbgemm_f8i4``: fbgemm's preshuffled W4A8 (``f8i4bf16_shuffled``) on weights re-quantized by torchao's
  ``Int4PreshuffledTensor.from_hp(activation_dtype=fp8)``, kernel alone (x quantized beforehand), and
  ``fbgemm_quantize_fp8_row``, the activation quantization it needs;
- ``w4a8``: shardgen's W4A8 GEMM on the checkpoint's own int4 weights, best of ``w4a8.candidates``, kernel alone,
  and ``w4a8_quantize``, shardgen's per-token quantization (which the engine fuses where it can).

Error: relative Frobenius error of the output against x (bf16) times the dequantized int4 weight, in float32.
Timing as benchmarks/int4_decode_gemm.py: GPU time per call in a CUDA graph cycling through weight copies that do
not fit in L2 together.

    python -m benchmarks.w4a8_gemm [--ms 1,16,64,128,256,2048] [--shapes gate_up,down,qkv,o]
Writes benchmarks/results/w4a8_gemm-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.runtime.errors import OutOfResources

from shardgen.actors import int4
from shardgen.actors.int4 import w4a8
from shardgen.actors.int4.kernel_choice import graph_time_us, weight_copies

RUN = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def compile_configs(job: tuple[int, int, int, int, list]) -> int:
    """In a pool worker: compile every config of one (M, N, K) into Triton's on-disk cache."""
    m, n, k, group_size, configs = job
    x = w4a8.quantize_rows(torch.randn(m, k, dtype=torch.bfloat16, device="cuda"))
    weight = torch.zeros(n, k // 2, dtype=torch.uint8, device="cuda")
    scale = torch.ones(k // group_size, n, dtype=torch.bfloat16, device="cuda")
    done = 0
    for cfg in configs:
        try:
            w4a8.linear(x, weight, scale, scale, group_size, cfg)
            done += 1
        except OutOfResources:
            pass
    return done


def precompile(ms: list[int], shapes: list[str], group_size: int, n_sm: int) -> None:
    jobs = []
    for name in shapes:
        n, k = SHAPES[name]
        for m in ms:
            configs = w4a8.candidates(m, n, k, n_sm)
            jobs += [(m, n, k, group_size, configs[i::4]) for i in range(4)]
    started = time.time()
    with mp.get_context("spawn").Pool(min(len(jobs), max(1, (os.cpu_count() or 2) - 2))) as pool:
        compiled = sum(pool.map(compile_configs, jobs, chunksize=1))
    print(f"compiled {compiled} kernels in {time.time() - started:.0f} s", flush=True)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return round(((got.float() - want).norm() / want.norm()).item(), 5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ms", default="1,16,64,128,256,2048")
    parser.add_argument("--shapes", default="gate_up,down,qkv,o")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--results-dir", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    from torchao.quantization import Int4PreshuffledTensor
    from fbgemm_gpu.experimental.gen_ai.quantize import quantize_fp8_row

    device = torch.cuda.get_device_name()
    dev = torch.device("cuda")
    ms = [int(m) for m in args.ms.split(",")]
    shapes = args.shapes.split(",")
    g = args.group_size
    n_sm = torch.cuda.get_device_properties(0).multi_processor_count
    precompile(ms, shapes, g, n_sm)
    rows, started = [], time.time()
    for name in shapes:
        n, k = SHAPES[name]
        int4_bytes = n * k // 2 + (k // g) * n * 2 * 2
        torch.manual_seed(0)
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(weight_copies(n * k * 2, dev))]
        plains = [int4.quantize(ws[i % len(ws)], g) for i in range(weight_copies(int4_bytes, dev))]
        ref_w = int4.dequantize(plains[0], torch.float32)
        ours = [int4.pack_fp8act(p) for p in plains]
        w4a16 = [int4.convert_for_hardware(torch.nn.Parameter(int4.contiguous(p), requires_grad=False),
                                           int4.LAYOUT_PRESHUFFLED, torch.bfloat16) for p in plains]
        f8 = [Int4PreshuffledTensor.from_hp(int4.dequantize(p, torch.bfloat16), [1, g],
                                            activation_dtype=torch.float8_e4m3fn) for p in plains]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ ref_w.t()
            row = {"shape": name, "N": n, "K": k, "M": m}
            row["bf16_us"] = round(graph_time_us([lambda w=w: F.linear(x, w) for w in ws]), 2)
            row["fbgemm_bf16i4_us"] = round(graph_time_us([lambda w=w: F.linear(x, w) for w in w4a16]), 2)
            row["fbgemm_bf16i4_err"] = rel_err(F.linear(x, w4a16[0]), want)
            xq, xs = quantize_fp8_row(x)
            row["fbgemm_quantize_fp8_row_us"] = round(graph_time_us([lambda: quantize_fp8_row(x)]), 2)
            row["fbgemm_f8i4_us"] = round(graph_time_us([
                lambda w=w: torch.ops.fbgemm.f8i4bf16_shuffled(xq, w.qdata, xs, w.row_scale, w.group_scale)
                for w in f8]), 2)
            row["fbgemm_f8i4_err"] = rel_err(F.linear(x, f8[0]), want)
            xi = w4a8.quantize_rows(x)
            row["w4a8_quantize_us"] = round(graph_time_us([lambda: w4a8.quantize_rows(x)]), 2)
            configs, by_name = {}, {}
            for cfg in w4a8.candidates(m, n, k, n_sm):
                try:
                    got = w4a8.linear(xi, *ours[0], g, cfg)
                except OutOfResources:
                    continue
                by_name[cfg.name()] = cfg
                err = rel_err(got, want)
                assert err < 0.1, (cfg, m, n, k, err)
                configs[cfg.name()] = round(graph_time_us([lambda o=o, cfg=cfg: w4a8.linear(xi, *o, g, cfg)
                                                           for o in ours]), 2)
            best = min(configs, key=configs.get)
            row["w4a8_err"] = rel_err(w4a8.linear(xi, *ours[0], g, by_name[best]), want)
            # the part of the error that is x's own rounding to fp8: the same fp8 x through the exact weight
            row["w4a8_err_of_x_alone"] = rel_err(xi.dequantize().float() @ ref_w.t(), want)
            row.update(w4a8_best=best, w4a8_best_config=asdict(by_name[best]), w4a8_us=configs[best],
                       w4a8_vs_bf16=round(row["bf16_us"] / configs[best], 2),
                       w4a8_with_quantize_vs_bf16=round(row["bf16_us"] / (configs[best] + row["w4a8_quantize_us"]), 2),
                       fbgemm_f8i4_vs_bf16=round(row["bf16_us"] / row["fbgemm_f8i4_us"], 2),
                       fbgemm_bf16i4_vs_bf16=round(row["bf16_us"] / row["fbgemm_bf16i4_us"], 2),
                       w4a8_int4_GBps=round(int4_bytes / configs[best] / 1e3, 1), configs=configs)
            rows.append(row)
            print(json.dumps({k_: v for k_, v in row.items() if k_ not in ("configs", "w4a8_best_config")}), flush=True)
        write(args.results_dir, device, g, rows)  # after every shape: a run cut short keeps what it measured
        del ws, plains, ours, w4a16, f8
    print(f"\nW4A8 GEMMs on {device}, GPU microseconds a call under CUDA graphs ({time.time() - started:.0f} s)")
    print(f"{'shape':>8} {'M':>5} {'bf16':>8} {'bf16i4':>8} {'f8i4':>8} {'w4a8':>8} {'+quant':>7} {'x bf16':>7} "
          f"{'err f8i4':>9} {'err w4a8':>9}  best")
    for r in rows:
        print(f"{r['shape']:>8} {r['M']:>5} {r['bf16_us']:>8} {r['fbgemm_bf16i4_us']:>8} {r['fbgemm_f8i4_us']:>8} "
              f"{r['w4a8_us']:>8} {r['w4a8_quantize_us']:>7} {r['w4a8_vs_bf16']:>7} {r['fbgemm_f8i4_err']:>9} "
              f"{r['w4a8_err']:>9}  {r['w4a8_best']}")
    print(f"wrote {write(args.results_dir, device, g, rows)}")


def write(results_dir: Path, device: str, group_size: int, rows: list[dict]) -> Path:
    out = results_dir / f"w4a8_gemm-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": device, "run": RUN, "timing": "cuda-graph", "torch": torch.__version__,
                               "group_size": group_size, "rows": rows}, indent=1))
    return out


if __name__ == "__main__":
    main()
