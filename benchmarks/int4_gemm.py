"""int4 GEMMs at the shapes of a Llama-3.1-8B layer, side by side on one GPU: bf16 F.linear (cuBLAS) against every
int4 layout shardgen converts a plain slice to (fbgemm's preshuffled and plain, humming's W4A16 and W4A8), all
through shardgen's own quantize + convert + ``int4.linear`` path.

Each time is one call's GPU time under a CUDA graph that cycles through enough copies of the weight that none is in
L2 when it comes round (``graph_time_us``), as a decode step sees it. ``err`` is the relative error
against x @ W with W the dequantized plain weight in float32 (what the checkpoint means), for random x; ``err_one_sign``
for |x| (inputs of one sign, as after a ReLU: where a per-group offset of the weights adds up). ``humming-kernel``
times humming's W4A16 GEMM alone, without the zero-point correction ``int4-humming`` adds (humming.py).

    python -m benchmarks.int4_gemm [--ms 1,16,64,128,256,512,1024,2048] [--layouts ...]
Writes benchmarks/results/int4_gemm-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from shardgen.actors import int4
from shardgen.actors.int4.humming import available as humming_available

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
MS = (1, 16, 64, 128, 256, 512, 1024, 2048)


def graph_time_us(calls: list[Callable[[], object]], total_calls: int = 48, replays: int = 7) -> float:
    """GPU time of one call, from a CUDA graph of ``total_calls`` calls cycling through ``calls`` (median of
    ``replays``). Callers pass calls on enough copies of the weights that none is in L2 when it comes round."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    reps = max(1, total_calls // len(calls))
    with torch.cuda.graph(graph):
        for _ in range(reps):
            for call in calls:
                call()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / (reps * len(calls)))
    del graph
    return sorted(times)[len(times) // 2]


def weight_copies(nbytes: int, device: torch.device) -> int:
    """How many copies of a weight of ``nbytes`` a timing cycles through so that each is out of L2 when reused."""
    l2 = torch.cuda.get_device_properties(device).L2_cache_size
    return max(1, min(16, math.ceil(3 * l2 / nbytes)))


def converted(w: torch.Tensor, layout: str, copies: int) -> list[torch.nn.Parameter]:
    """``copies`` parameters of ``w`` quantized (G=128) and converted to ``layout``."""
    out = []
    for _ in range(copies):
        module = torch.nn.Module()
        module.weight = torch.nn.Parameter(int4.quantize(w, 128), requires_grad=False)
        int4.convert_module_weights(module, layout, torch.bfloat16)
        out.append(module.weight)
    return out


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(f"{((got.float() - want).norm() / want.norm()).item():.2e}")


def _humming_kernel(x: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """humming's W4A16 GEMM alone: int4.linear without the zero-point correction."""
    from humming.forward import humming_forward

    meta = p.humming
    return humming_forward(meta.config, inputs=x, weight=p.data, weight_scale=meta.scale, zero_point=meta.zero_point,
                           locks=meta.runtime.locks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ms", default=",".join(map(str, MS)))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--layouts", default=None, help="comma-separated int4 layouts (default: every one the GPU runs)")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    cuda = torch.device("cuda")
    layouts = args.layouts.split(",") if args.layouts else [int4.LAYOUT_PRESHUFFLED, int4.LAYOUT_PLAIN] + (
        list(int4.HUMMING_LAYOUTS) if humming_available(cuda) else [])
    ms = [int(m) for m in args.ms.split(",")]
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        torch.manual_seed(0)
        w = (torch.randn(n, k, device=cuda) * 0.02).to(torch.bfloat16)
        reference = int4.dequantize(int4.quantize(w, 128), torch.float32)
        dense = [w.clone() for _ in range(weight_copies(n * k * 2, cuda))]
        weights = {layout: converted(w, layout, weight_copies(n * k // 2, cuda)) for layout in layouts}
        for m in ms:
            x = torch.randn(m, k, device=cuda, dtype=torch.bfloat16)
            want = x.float() @ reference.T
            bf16_us = graph_time_us([lambda d=d: F.linear(x, d) for d in dense])
            row = {"shape": name, "N": n, "K": k, "M": m, "bf16_us": round(bf16_us, 1)}
            for layout, params in weights.items():
                us = graph_time_us([lambda p=p: int4.linear(x, p) for p in params])
                row[layout] = {"us": round(us, 1), "x_bf16": round(bf16_us / us, 2),
                               "err": _err(int4.linear(x, params[0]), want),
                               "err_one_sign": _err(int4.linear(x.abs(), params[0]), x.abs().float() @ reference.T)}
            if int4.LAYOUT_HUMMING in weights:
                us = graph_time_us([lambda p=p: _humming_kernel(x, p) for p in weights[int4.LAYOUT_HUMMING]])
                row["humming-kernel"] = {"us": round(us, 1), "x_bf16": round(bf16_us / us, 2),
                                         "err": _err(_humming_kernel(x, weights[int4.LAYOUT_HUMMING][0]), want)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    columns = layouts + (["humming-kernel"] if int4.LAYOUT_HUMMING in layouts else [])
    print(f"\nint4 GEMMs on {device}: speed-up over cuBLAS bf16 (relative error), L2-cold, under CUDA graphs")
    print(f"{'shape':>8} {'M':>5} {'bf16 us':>8} " + " ".join(f"{column:>22}" for column in columns))
    for r in rows:
        cells = [f"{r[la]['x_bf16']:>5.2f}x ({r[la]['err']:.1e})" for la in columns]
        print(f"{r['shape']:>8} {r['M']:>5} {r['bf16_us']:>8} " + " ".join(f"{c:>22}" for c in cells))
    out = Path(__file__).parent / "results" / f"int4_gemm-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": device, "layouts": layouts, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
