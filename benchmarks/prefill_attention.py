"""Causal attention of whole prompts (the "uncached" part of a step) through each kernel PyTorch offers on this GPU:
FlashAttention 2's varlen kernel, SDPA's cuDNN backend one sequence at a time (keys and values expanded to the
query heads, or GQA passed through), cuDNN's ragged (packed) entry point, and shardgen's choice among them
(``actors.prefill_attention``). Also the wall time of the first call on each new step shape (cuDNN builds plans). One layer of a
Llama-3.1-8B shape (32 query heads, 8 KV heads, D 128, bf16). Median GPU microseconds, the host's microseconds to
launch a call, and each kernel's largest difference from FlashAttention relative to the largest output.

    python -m benchmarks.prefill_attention
Writes benchmarks/results/prefill_attention-<device>.json.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from shardgen.actors.kernels import prefill_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
STEPS = {  # the uncached sequences of typical steps: prefill-heavy (two 4,096-token prompts), mixed (1,024-token ones)
    "2 x 4096": [4096, 4096],
    "7 x 1024": [1024] * 7,
    "1 x 8192": [8192],
    "3 x 1500 + 700": [1500, 1500, 1500, 700],
    "1 x 1024": [1024],
    "1 x 1280": [1280],
    "1 x 1536": [1536],
    "4 x 1280": [1280] * 4,
    "2 x 1100 + 3 x 300": [1100, 300, 1100, 300, 300],
}


def cudnn_per_sequence(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], scale: float,
                       gqa: bool) -> torch.Tensor:
    out = torch.empty_like(q)
    start = 0
    group = HEADS // KV_HEADS
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        for n in lens:
            qs = q[start:start + n].transpose(0, 1).unsqueeze(0)
            ks = k[start:start + n].transpose(0, 1).unsqueeze(0)
            vs = v[start:start + n].transpose(0, 1).unsqueeze(0)
            if not gqa:
                ks = ks.repeat_interleave(group, dim=1)
                vs = vs.repeat_interleave(group, dim=1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            out[start:start + n] = o.squeeze(0).transpose(0, 1)
            start += n
    return out


def cudnn_ragged(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_q: int,
                 scale: float) -> torch.Tensor:
    cu = cu.to(torch.int32)
    return torch.ops.aten._cudnn_attention_forward(q, k, v, None, cu, cu, max_q, max_q, False, 0.0, True, False,
                                                   scale=scale)[0]


def enqueue_us(fn, calls: int = 20) -> float:
    """Host time a call takes to launch its work (no sync): what the engine's host pays per layer."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    spent = time.perf_counter() - start
    torch.cuda.synchronize()
    return spent / calls * 1e6


def first_call_ms(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def plan_builds(scale: float) -> list[dict]:
    """Wall time of the first call on each new step shape: does cuDNN build a plan per total token count, per
    sequence count, per longest sequence?"""
    rows = []
    cases = [("same", [4096, 4096]), ("tokens", [4096, 4000]), ("tokens", [4096, 3000]), ("same", [4096, 3000]),
             ("seqs", [4096, 2000, 1000]), ("max_q", [3000, 3000]), ("max_q bucketed", [3000, 3000])]
    for what, lens in cases:
        tokens = sum(lens)
        q = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn_like(k)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0)
        max_q = 4096 if what == "max_q bucketed" else max(lens)
        for name, fn in (("cudnn ragged", lambda: cudnn_ragged(q, k, v, cu, max_q, scale)),
                         ("flash2 varlen", lambda: prefill_attention.flash_attention(q, k, v, cu, max_q, scale))):
            row = {"lens": lens, "changed": what, "max_q": max_q, "kernel": name}
            try:
                row["first_ms"] = round(first_call_ms(fn), 2)
                row["second_ms"] = round(first_call_ms(fn), 2)
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    device = torch.cuda.get_device_name()
    print(f"{device}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    print("torch.nn.attention:", [n for n in dir(torch.nn.attention) if "flash" in n.lower() or "impl" in n.lower()])
    scale = HEAD_DIM ** -0.5
    rows = []
    for name, lens in STEPS.items():
        tokens = sum(lens)
        q = torch.randn(tokens, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        k = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        v = torch.randn(tokens, KV_HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0)
        flops = sum(4 * n * n / 2 * HEAD_DIM * HEADS for n in lens)
        runs = {
            "flash2 varlen": lambda: prefill_attention.flash_attention(q, k, v, cu, max(lens), scale),
            "cudnn expanded kv": lambda: cudnn_per_sequence(q, k, v, lens, scale, gqa=False),
            "cudnn gqa": lambda: cudnn_per_sequence(q, k, v, lens, scale, gqa=True),
            "cudnn ragged": lambda: cudnn_ragged(q, k, v, cu, max(lens), scale),
            "shardgen": lambda: prefill_attention.prefill_attention(q, k, v, cu, tuple(lens), scale),
        }
        ref = runs["flash2 varlen"]().float()
        for system, fn in runs.items():
            row = {"step": name, "kernel": system}
            try:
                row["first_ms"] = round(first_call_ms(fn), 1)
                diff = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
                us = do_bench(fn, warmup=25, rep=200, return_mode="median") * 1000
                row.update(us=round(us, 1), tflops=round(flops / us / 1e6, 1), max_rel_diff=round(diff, 5),
                           enqueue_us=round(enqueue_us(fn), 1))
            except Exception as e:  # a backend that refuses this shape: recorded, not fatal
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    builds = plan_builds(scale)
    print(f"\nPrefill attention on {device}, one layer, median us")
    print(f"{'step':>18} {'kernel':>18} {'GPU us':>9} {'TFLOP/s':>8} {'host us':>8} {'rel diff':>9}")
    for r in rows:
        print(f"{r['step']:>18} {r['kernel']:>18} {r.get('us', '-'):>9} {r.get('tflops', '-'):>8} "
              f"{r.get('enqueue_us', '-'):>8} {r.get('max_rel_diff', r.get('error', '-'))!s:>9}")
    out = Path(__file__).parent / "results" / f"prefill_attention-{device.replace(' ', '_')}.json"
    out.write_text(json.dumps({"device": device, "torch": torch.__version__,
                               "cudnn": torch.backends.cudnn.version(), "rows": rows,
                               "first_calls": builds}, indent=2))


if __name__ == "__main__":
    main()
