"""Where an engine step's GPU time goes at Llama-3.1-8B shapes on one GPU (random weights made on the GPU, no Ray):

1. attention of three kinds of step, in one paged-kernel launch and by parts (``attention_by_parts``: decode rows,
   chunks over cached tokens, sequences with nothing cached through FlashAttention); decode attention with each
   sequence's keys in one program and split across several (``decode_splits``);
2. kernel by kernel, a prefill step of 2 x 4096 new tokens and a decode step of 128 sequences at ~1,060 tokens of
   context, for each layout;
3. the engine running half the prefill-heavy and a quarter of the mixed workload: wall time against the time the
   GPU was busy (kernels and copies), so what the host costs is visible.

    python -m benchmarks.step_profile --layouts int4-preshuffled,bf16

Prints tables and writes benchmarks/results/step_profile-<device>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import triton
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from shardgen.actors.engine.build import build_engine

from shardgen.actors.model.attention import AttentionMetadata, StepParts, attention
from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.runner import ModelRunner, StepInput
from shardgen.actors.engine.sequence import Request, SamplingParams
from benchmarks.synthetic import random_model
from benchmarks.bench import warm_up
from benchmarks.synthetic import LLAMA_8B
from benchmarks.synthetic import make_case


def decode_step(seqs: int, context: int, block_size: int, num_blocks: int) -> StepInput:
    """One new token for each of ``seqs`` sequences with ``context`` tokens, in scattered cache blocks."""
    width = -(-context // block_size)
    g = torch.Generator().manual_seed(0)
    tables = torch.randint(0, num_blocks, (seqs, width), generator=g, dtype=torch.int32)
    pos = torch.full((seqs,), context - 1, dtype=torch.int64)
    slots = tables[:, -1].long() * block_size + (context - 1) % block_size
    return StepInput(torch.randint(0, 128000, (seqs,), generator=g), pos,
                     torch.arange(seqs + 1, dtype=torch.int32), torch.full((seqs,), context, dtype=torch.int32),
                     slots, tables, 1, context, torch.arange(seqs))


def kernel_table(runner: ModelRunner, step: StepInput, top: int) -> list[dict]:
    for _ in range(2):
        runner._forward(step)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner._forward(step)
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:90], "calls": e.count, "ms": round(e.device_time_total / 1000, 3)}
            for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"kernel": "TOTAL", "calls": sum(r["calls"] for r in rows), "ms": round(total, 3)}] + rows[:top]


# (new tokens, context) per sequence, in the scheduler's order
ATTENTION_STEPS = {
    "prefill-heavy: 2 whole 4096-token prompts": ([4096, 4096], [4096, 4096]),
    "prefill-heavy: 3 decode rows, a prompt's last 2 tokens, a prompt, a first chunk": (
        [1, 1, 1, 2, 4096, 4091], [4100, 4099, 4098, 4096, 4096, 4091]),
    "mixed: 248 decode rows, a chunk, 7 whole 1024-token prompts": (
        [1] * 248 + [856] + [1024] * 7, [1024 + (37 * i) % 128 for i in range(248)] + [1024] + [1024] * 7),
}


def attention_by_kind() -> list[dict]:
    """Attention of one layer (32 query / 8 KV heads, D 128, bf16) of each step, one launch vs by parts."""
    rows = []
    for name, (q_lens, ctx) in ATTENTION_STEPS.items():
        q, k, v, cache, meta = make_case(q_lens, ctx, 32, 8, 128, torch.bfloat16, "cuda")
        parts = StepParts.of(q_lens, [c - n for n, c in zip(q_lens, ctx)])
        split = AttentionMetadata(meta.cu_seqlens_q, meta.context_lens, meta.max_q_len, meta.max_context_len,
                                  meta.slot_mapping, meta.block_tables, parts)
        one = attention(q, k, v, meta, 128 ** -0.5, cache)
        row = {"step": name}
        for how, m in (("one launch", meta), ("by parts", split)):
            out = attention(q, k, v, m, 128 ** -0.5, cache)
            row[f"{how} us"] = round(triton.testing.do_bench(lambda m=m: attention(q, k, v, m, 128 ** -0.5, cache),
                                                             warmup=10, rep=100) * 1000, 1)
        row["max_rel_diff"] = float((out.float() - one.float()).abs().max() / one.float().abs().max())
        rows.append(row)
    return rows


def decode_key_splits() -> list[dict]:
    """Decode attention of one layer with each sequence's keys walked by one program vs split (decode_splits)."""
    from shardgen.actors.kernels.paged_attention import decode_splits, paged_attention

    rows = []
    # sequences, context, query heads, KV heads: 8B shapes, and a 70B rank at T=4 (64 / 4 and 8 / 4 heads)
    for seqs, ctx, hq, hkv in ((32, 4100, 32, 8), (128, 1060, 32, 8), (256, 600, 32, 8), (8, 4100, 32, 8),
                               (32, 4100, 16, 2)):
        q, k, v, cache, meta = make_case([1] * seqs, [ctx] * seqs, hq, hkv, 128, torch.bfloat16, "cuda")
        auto = decode_splits(seqs, hkv, q.device)
        row = {"decode": f"{seqs} seqs x {ctx} tokens, {hq}/{hkv} heads", "splits": auto}
        for n in sorted({1, auto, 4}):
            us = triton.testing.do_bench(lambda n=n: paged_attention(
                q, cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, 1, 128 ** -0.5, splits=n),
                warmup=10, rep=100) * 1000
            row[f"{n} split(s) us"] = round(us, 1)
            row[f"{n} split(s) GB/s"] = round(seqs * ctx * hkv * 128 * 2 * 2 / us / 1e3)
        rows.append(row)
    return rows


def busy_us(prof) -> float:
    """Time the GPU ran anything (the union of kernel and copy intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA)
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def engine_busy(loaded, layout: str, cudnn_prompts: bool) -> list[dict]:
    config = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192, cudnn_prompts=cudnn_prompts)
    engine = build_engine(loaded, config)
    warm_up(engine, config.max_num_batched_tokens)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, (prompts, input_len, output_len) in {"prefill-heavy / 2": (16, 4096, 32), "mixed / 4": (250, 1024, 128)}.items():
        params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
        requests = [Request(str(i), torch.randint(0, 128000, (input_len,), generator=gen).tolist(), params)
                    for i in range(prompts)]
        steps0 = engine.stats.steps
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            engine.generate(requests)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        busy = busy_us(prof) / 1e6
        rows.append({"layout": layout, "workload": name, "wall_s": round(wall, 3), "gpu_busy_s": round(busy, 3),
                     "gpu_idle_pct": round(100 * (1 - busy / wall), 1), "steps": engine.stats.steps - steps0,
                     "total_tok_s": round(prompts * (input_len + output_len) / wall)})
    del engine
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layouts", default="int4-preshuffled,bf16")
    p.add_argument("--top", type=int, default=14)
    p.add_argument("--attention-only", action="store_true", help="only part 1")
    p.add_argument("--flash-prompts", action="store_true", help="parts 2-3 with long prompts through FlashAttention")
    args = p.parse_args()
    device = torch.cuda.get_device_name()
    result: dict = {"device": device, "attention": attention_by_kind(), "decode_splits": decode_key_splits(),
                    "steps": {}, "engine": []}
    print(f"attention of one layer, one launch vs by parts, {device}")
    for r in result["attention"] + result["decode_splits"]:
        print("  ", r)
    for layout in [] if args.attention_only else args.layouts.split(","):
        loaded = random_model(LLAMA_8B, layout)
        config = EngineConfig(max_num_seqs=256, max_num_batched_tokens=8192, cuda_graphs=False,
                              kv_cache_memory=24 * 2**30, cudnn_prompts=not args.flash_prompts)
        runner = build_engine(loaded, config).runner
        steps = {"prefill 2 x 4096": StepInput.prefill([4096, 4096], config.block_size),
                 "decode 128 x 1060": decode_step(128, 1060, config.block_size, runner.num_blocks)}
        for name, step in steps.items():
            table = kernel_table(runner, step, args.top)
            result["steps"][f"{layout} {name}"] = table
            print(f"\n{layout}, {name}: GPU time by kernel ({device})")
            for r in table:
                print(f"  {r['ms']:>9.3f} ms {r['calls']:>5}  {r['kernel']}")
        del runner
        torch.cuda.empty_cache()
        for row in engine_busy(loaded, layout, not args.flash_prompts):
            result["engine"].append(row)
            print(json.dumps(row), flush=True)
        del loaded
        torch.cuda.empty_cache()
    suffix = "-flash-prompts" if args.flash_prompts else ""
    out = Path(__file__).parent / "results" / f"step_profile-{device.replace(' ', '_')}{suffix}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
