"""``shardgen bench`` (or ``python -m benchmarks.bench``, same options): a model of a real shape (Llama-3.1-8B by
default, or ``--shape``: Qwen3-30B-A3B, a mixture of experts) with random weights, run side by side on one GPU by shardgen
(int4 preshuffled, int4 plain, bf16) and by Hugging Face ``generate`` (bf16, int4 through torchao), on fixed
workloads of random token ids with fixed output lengths.

The int4 model is written once as a plain int4 checkpoint (G=128, lm_head bf16) and every shardgen int4 system
loads it from disk, so load + convert are timed on the real path. Results: a table on stdout, JSON and a PNG
plot under the results directory, each naming the device.
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from benchmarks.synthetic import SHAPES, WORKLOADS, random_model, workload_prompts, write_checkpoint
from shardgen.actors.engine.build import build_engine
from shardgen.actors.engine.config import EngineConfig

DEFAULT_WORKLOADS = ("decode-heavy", "prefill-heavy", "mixed")
SYSTEMS = ("shardgen-int4", "shardgen-int4-dual", "shardgen-int4-humming", "shardgen-int4-humming-fp8act", "shardgen-int4-preshuffled",
           "shardgen-int4-plain", "shardgen-bf16", "hf-bf16", "hf-int4-preshuffled")
INT4_LAYOUTS = ("int4-humming-fp8act", "int4-humming", "int4-dual", "int4-preshuffled", "int4-plain")  # longest first
# Run only when named, for comparisons: a shardgen system (the name's prefix) with one EngineConfig field changed.
ENGINE_VARIANTS = {"shardgen-int4-no-overlap": {"overlap_decode": False},
                   "shardgen-int4-one-attention-launch": {"attention_by_parts": False},
                   "shardgen-int4-cudnn-prompts": {"cudnn_prompts": True},
                   "shardgen-int4-fp8-kv": {"kv_cache_dtype": "fp8"},
                   "shardgen-int4-no-prefix-caching": {"prefix_caching": False},
                   "shardgen-bf16-no-prefix-caching": {"prefix_caching": False},
                   "shardgen-int4-preshuffled-fp8-kv": {"kv_cache_dtype": "fp8"},
                   "shardgen-int4-humming-fp8-kv": {"kv_cache_dtype": "fp8"},
                   "shardgen-int4-humming-fp8act-fp8-kv": {"kv_cache_dtype": "fp8"},
                   "shardgen-bf16-fp8-kv": {"kv_cache_dtype": "fp8"},
                   "shardgen-int4-preshuffled-projected-admission": {"admission": "projected"},
                   "shardgen-int4-preshuffled-fp8-kv-projected-admission": {"kv_cache_dtype": "fp8",
                                                                            "admission": "projected"},
                   "shardgen-bf16-projected-admission": {"admission": "projected"}}
# Run only when named: the default int4 path with every other request sampled otherwise, for what that costs the
# step: its completion held to JSON_SCHEMA (structured outputs; the tokenizer is synthetic, of the model's vocabulary
# size; a constrained completion ends where its JSON does), or penalised (as vLLM users ask for).
JSON_SCHEMA = json.dumps({"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
                          "required": ["answer", "score"]})
HALF_SAMPLED = {"shardgen-int4-json-half": {"json_schema": JSON_SCHEMA},
                "shardgen-int4-penalties-half": {"repetition_penalty": 1.1, "presence_penalty": 0.5,
                                                 "frequency_penalty": 0.5, "ignore_eos": True}}
EXTRA_SYSTEMS = (*ENGINE_VARIANTS, *HALF_SAMPLED)
GiB = 2**30


@dataclass(frozen=True)
class BenchConfig:
    """What to run. ``scale`` shrinks every workload's prompt count (a quick check of the whole bench)."""

    workloads: tuple[str, ...] = DEFAULT_WORKLOADS
    systems: tuple[str, ...] = SYSTEMS
    scale: float = 1.0
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    gpu_memory_utilization: float = EngineConfig.gpu_memory_utilization
    hf_batch_sizes: tuple[int, ...] = (256, 128, 64, 32, 16)
    results_dir: Path = Path("benchmarks/results")
    checkpoint_dir: Path | None = None  # default: /tmp/shardgen-bench-<shape>-int4
    shape: str = "llama-8b"  # a key of benchmarks.synthetic.SHAPES
    cuda_graphs: bool = True
    kernel_cache_dir: Path | None = None  # int4 kernel timings measured for shapes the GPU's table lacks

    def __post_init__(self) -> None:
        known = SYSTEMS + EXTRA_SYSTEMS
        unknown = [w for w in self.workloads if w not in WORKLOADS] + [s for s in self.systems if s not in known]
        if unknown:
            raise ValueError(f"unknown workload or system {unknown}; workloads: {', '.join(WORKLOADS)}; "
                             f"systems: {', '.join(known)}")
        if self.shape not in SHAPES:
            raise ValueError(f"unknown --shape {self.shape!r}; shapes: {', '.join(SHAPES)}")
        if not 0 < self.scale <= 1:
            raise ValueError(f"--scale must be in (0, 1], got {self.scale}")

    @property
    def model(self) -> dict:
        return SHAPES[self.shape]

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_dir or Path(f"/tmp/shardgen-bench-{self.shape}-int4")


@dataclass
class Result:
    system: str
    workload: str
    prompts: int
    input_len: int
    output_len: int
    wall_s: float
    total_tok_s: float
    generated_tok_s: float
    ttft_mean_s: float
    ttft_p50_s: float
    peak_gpu_gib: float
    weights_gib: float
    load_s: float  # model ready on the GPU: read + convert (shardgen int4) or build (random bf16)
    notes: dict = field(default_factory=dict)


def warm_up(engine, max_num_batched_tokens: int) -> None:
    """Compile every kernel variant (decode, prefill, a chunked prefill, cuDNN's plan for a long first chunk) here,
    not inside a timed run. The prompts are random tokens: prompts that shared a prefix would take it from the prefix
    cache, and the long-context prefill kernels would first run inside the first timed workload (it cost the first
    system of a bench process 30% on prefill-heavy, benchmarks/README.md)."""
    from shardgen.actors.engine.sequence import Request, SamplingParams

    warm = SamplingParams(max_new_tokens=8, ignore_eos=True)
    g = torch.Generator().manual_seed(0)
    lengths = (64, 64, 1000, 4096, 4096, max_num_batched_tokens + 100)
    engine.generate([Request(f"w{i}", torch.randint(0, 32000, (n,), generator=g).tolist(), warm)
                     for i, n in enumerate(lengths)])


def gemm_by_rows(layout: str) -> dict[str, str]:
    """Which GEMM (and activation type) a step of how many rows runs in ``layout``: what ``auto`` chose per M bucket."""
    from shardgen.actors import int4

    names = {"int4-humming": "humming W4A16, bf16 activations", "int4-humming-fp8act": "humming W4A8, e4m3 activations",
             "int4-preshuffled": "fbgemm preshuffled W4A16, bf16 activations",
             "int4-plain": "fbgemm rowwise W4A16, bf16 activations", int4.LAYOUT_DENSE: "cuBLAS bf16"}
    if layout == int4.LAYOUT_DUAL:
        m = int4.DUAL_HUMMING_MAX_M
        return {f"1-{m}": names["int4-humming"], f">{m}": names["int4-preshuffled"]}
    return {"all": names.get(layout, layout)}


def run_shardgen(system: str, config: BenchConfig) -> list[Result]:
    from shardgen.actors.model.loader import load_model
    from shardgen.actors.engine.sequence import Request, SamplingParams

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    if system.startswith("shardgen-bf16"):
        loaded = random_model(config.model, "bf16")
    else:
        # shardgen-int4 is the default path (int4_layout auto); the others force a layout, for comparisons.
        layout = next((name for name in INT4_LAYOUTS if name in system), "auto")
        loaded = load_model(config.checkpoint, device="cuda", int4_layout=layout,
                            kernel_cache_dir=config.kernel_cache_dir)
    weights = torch.cuda.memory_allocated()
    engine_cfg = EngineConfig(max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                              gpu_memory_utilization=config.gpu_memory_utilization, cuda_graphs=config.cuda_graphs,
                              **ENGINE_VARIANTS.get(system, {}))
    tokenizer = None
    if "json_schema" in HALF_SAMPLED.get(system, {}):
        from benchmarks.synthetic import synthetic_tokenizer

        tokenizer = synthetic_tokenizer(config.model["vocab_size"])
    engine = build_engine(loaded, engine_cfg, tokenizer=tokenizer)
    runner = engine.runner
    ready_s = time.perf_counter() - start
    notes = {"layout": loaded.layout, "read_s": round(loaded.load_s, 2), "convert_s": round(loaded.convert_s, 2),
             "kv_cache_gib": round(runner.kv_cache_bytes / GiB, 2), "kv_cache_dtype": engine_cfg.kv_cache_dtype,
             "activation_peak_gib": round(runner.activation_peak / GiB, 2), "cuda_graphs": runner.graphs is not None,
             "gemm_by_rows": gemm_by_rows(loaded.layout)}
    print(f"{system}: ready in {ready_s:.1f} s ({loaded.layout}, read {loaded.load_s:.1f} s, convert "
          f"{loaded.convert_s:.1f} s, KV cache {runner.kv_cache_bytes / GiB:.1f} GiB, CUDA graphs "
          f"{runner.graphs is not None})", flush=True)
    warm_up(engine, config.max_num_batched_tokens)
    print(f"{system}: warmed up in {time.perf_counter() - start - ready_s:.1f} s", flush=True)
    results = []
    for workload in config.workloads:
        prompts, output_len = workload_prompts(workload, config.scale)
        params = SamplingParams(max_new_tokens=output_len, ignore_eos=True)
        half = system in HALF_SAMPLED
        other = SamplingParams(max_new_tokens=output_len, **HALF_SAMPLED.get(system, {}))
        requests = [Request(str(i), p, other if half and i % 2 == 0 else params) for i, p in enumerate(prompts)]
        steps0, ahead0, cached0 = engine.stats.steps, engine.stats.steps_ahead, engine.scheduler.num_cached_tokens
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = engine.generate(requests)
        wall = time.perf_counter() - t0
        generated = sum(len(c.token_ids) for c in done)
        assert tokenizer is not None or generated == len(prompts) * output_len, "fixed-length outputs expected"
        shape = {}
        if half:
            lengths = [len(c.token_ids) for c in done if int(c.request_id) % 2 == 0]
            shape = {"other_rows": len(lengths), "other_mean_tokens": round(sum(lengths) / len(lengths), 1),
                     "errors": sum(c.finish_reason == "error" for c in done)}
        ttft = sorted(c.time_to_first_token_s for c in done)
        results.append(_result(system, workload, prompts, output_len, wall, generated, ttft, weights, ready_s,
                               dict(notes, steps=engine.stats.steps - steps0, steps_ahead=engine.stats.steps_ahead - ahead0,
                                    preemptions=engine.scheduler.num_preemptions,
                                    cached_prompt_tokens=engine.scheduler.num_cached_tokens - cached0,
                                    prefix_caching=engine_cfg.prefix_caching,
                                    ms_per_step=round(wall * 1000 / max(engine.stats.steps - steps0, 1), 2), **shape)))
        print(json.dumps(asdict(results[-1])), flush=True)
    del engine, runner, loaded
    _free()
    return results


def run_hf(system: str, config: BenchConfig) -> list[Result]:
    from transformers import AutoConfig, AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    raw = {k: v for k, v in config.model.items() if k not in ("architectures", "model_type")}
    hf_cfg = AutoConfig.for_model(config.model["model_type"], **raw)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    notes = {"attn_implementation": model.config._attn_implementation}
    if system == "hf-int4-preshuffled":
        from torchao.quantization import Int4WeightOnlyConfig, quantize_

        quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format="preshuffled"),
                  filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn)
    torch.cuda.synchronize()
    ready_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated()

    class FirstToken(LogitsProcessor):
        """Records when generate reaches its first sampling step (the prompt's forward is done)."""

        def __init__(self) -> None:
            self.at: float | None = None

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if self.at is None:
                torch.cuda.synchronize()
                self.at = time.perf_counter()
            return scores

    def generate(batch: list[list[int]], new: int) -> float | None:
        ids = torch.tensor(batch, device="cuda")
        first = FirstToken()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                             do_sample=False, pad_token_id=0, logits_processor=LogitsProcessorList([first]))
        assert out.shape[1] == ids.shape[1] + new
        return first.at

    results = []
    with torch.inference_mode():
        generate([[1] * 16] * 2, 4)  # warm-up
        for workload in config.workloads:
            prompts, output_len = workload_prompts(workload, config.scale)
            for batch in _hf_batch_candidates(generate, prompts, output_len, config.hf_batch_sizes, config.model):
                try:
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    ttft = []
                    for i in range(0, len(prompts), batch):
                        chunk = prompts[i: i + batch]
                        ttft.extend([generate(chunk, output_len) - t0] * len(chunk))
                    torch.cuda.synchronize()
                    break
                except torch.cuda.OutOfMemoryError:
                    print(f"{system} {workload}: out of memory at batch {batch}, trying smaller", flush=True)
                    _free()
            else:
                raise RuntimeError(f"Hugging Face generate ran out of memory at every batch size {config.hf_batch_sizes}")
            wall = time.perf_counter() - t0
            results.append(_result(system, workload, prompts, output_len, wall, len(prompts) * output_len, sorted(ttft),
                                   weights, ready_s, dict(notes, batch_size=batch)))
            print(json.dumps(asdict(results[-1])), flush=True)
    model = None  # noqa: F841 (frees the weights before the next system)
    _free()
    return results


def _hf_batch_candidates(generate, prompts: list[list[int]], output_len: int, sizes: tuple[int, ...],
                         shape: dict) -> list[int]:
    """Batch sizes to try, largest first, from the first whose prompt pass fits with room left for its whole
    KV cache (measured peak of a 2-token generate + the cache's growth to the full output)."""
    head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
    per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * head_dim * 2  # K and V, bf16
    total = torch.cuda.get_device_properties(0).total_memory
    for i, size in enumerate(sizes):
        size = min(size, len(prompts))
        try:
            torch.cuda.reset_peak_memory_stats()
            generate(prompts[:size], 2)
        except torch.cuda.OutOfMemoryError:
            _free()
            continue
        if torch.cuda.max_memory_allocated() + size * output_len * per_token < 0.95 * total:
            return [min(s, len(prompts)) for s in sizes[i:]]
        _free()
    return [sizes[-1]]


def _result(system: str, workload: str, prompts: list[list[int]], output_len: int, wall: float, generated: int,
            ttft: list[float], weights: int, ready_s: float, notes: dict) -> Result:
    total = sum(len(p) for p in prompts) + generated
    return Result(system, workload, len(prompts), len(prompts[0]), output_len, round(wall, 2), round(total / wall),
                  round(generated / wall), round(sum(ttft) / len(ttft), 3), round(ttft[len(ttft) // 2], 3),
                  round(torch.cuda.max_memory_allocated() / GiB, 2), round(weights / GiB, 2), round(ready_s, 2), notes)


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def print_table(results: list[Result], device: str, shape: str) -> None:
    print(f"\nshardgen bench on {device} ({shape} shape, random weights, int4 G=128, lm_head bf16)")
    print(f"{'workload':>14} {'system':>26} {'total tok/s':>12} {'gen tok/s':>10} {'TTFT mean s':>12} "
          f"{'peak GiB':>9} {'ready s':>8} {'wall s':>8}")
    for r in sorted(results, key=lambda r: (r.workload, r.system)):
        print(f"{r.workload:>14} {r.system:>26} {r.total_tok_s:>12,.0f} {r.generated_tok_s:>10,.0f} "
              f"{r.ttft_mean_s:>12.3f} {r.peak_gpu_gib:>9.1f} {r.load_s:>8.1f} {r.wall_s:>8.1f}")


def plot(results: list[Result], device: str, path: Path, shape: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    workloads = sorted({r.workload for r in results})
    systems = [s for s in SYSTEMS + EXTRA_SYSTEMS if any(r.system == s for r in results)]
    fig, axes = plt.subplots(1, len(workloads), figsize=(5.5 * len(workloads), 5), squeeze=False)
    palette = ["#1f77b4", "#6baed6", "#9ecae1", "#e6550d", "#fd8d3c", "#08306b", "#3182bd", "#2171b5", "#4292c6"]
    colors = {s: palette[i % len(palette)] for i, s in enumerate(SYSTEMS + EXTRA_SYSTEMS)}
    for ax, w in zip(axes[0], workloads):
        ran = [s for s in systems if any(r.workload == w and r.system == s for r in results)]
        values = [next(r.total_tok_s for r in results if r.workload == w and r.system == s) for s in ran]
        bars = ax.bar(range(len(ran)), values, color=[colors[s] for s in ran])
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks(range(len(ran)), [s.replace("-", "\n") for s in ran], fontsize=7)
        ax.set_title(f"{w} ({'x'.join(map(str, WORKLOADS[w]))})")
        ax.set_ylabel("total tokens/s")
    fig.suptitle(f"shardgen vs Hugging Face generate, {shape} shape, {device}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def save_results(results: list[Result], config: BenchConfig, device: str) -> None:
    """Merge into results_dir/bench-<device>.json (bench-<shape>-<device>.json for shapes other than the 8B; a later
    run of a system and workload replaces the earlier one) and redraw the plot."""
    config.results_dir.mkdir(parents=True, exist_ok=True)
    slug = ("" if config.shape == "llama-8b" else f"{config.shape}-") + device.replace(" ", "_")
    out = config.results_dir / f"bench-{slug}.json"
    earlier = json.loads(out.read_text())["results"] if out.exists() else []
    keep = [r for r in earlier if (r["system"], r["workload"]) not in {(x.system, x.workload) for x in results}]
    merged = keep + [asdict(r) for r in results]
    out.write_text(json.dumps({"device": device, "torch": torch.__version__, "config": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()}, "results": merged}, indent=2))
    png = plot([Result(**r) for r in merged], device, config.results_dir / f"bench-{slug}.png", config.shape)
    print(f"wrote {out}" + (f" and {png}" if png else " (no matplotlib: no plot)"), flush=True)


def run_bench(config: BenchConfig) -> list[Result]:
    """Run every chosen system on every chosen workload; write JSON (merged with earlier runs on this device) and a plot."""
    device = torch.cuda.get_device_name()
    if any(s.startswith("shardgen-int4") for s in config.systems):
        t = time.perf_counter()
        write_checkpoint(config.checkpoint, shape=config.model)
        print(f"checkpoint {config.checkpoint} ready in {time.perf_counter() - t:.1f} s", flush=True)
    results: list[Result] = []
    run = time.strftime("%Y-%m-%dT%H:%M:%S")  # results of one invocation share it: their ratios are side by side
    for system in config.systems:
        for r in (run_shardgen if system.startswith("shardgen") else run_hf)(system, config):
            r.notes["run"] = run
            results.append(r)
        save_results(results, config, device)  # after every system: a run cut short keeps what it measured
    print_table(results, device, config.shape)
    return results


if __name__ == "__main__":
    import sys

    from shardgen.jobs.cli import app

    app(["bench", *sys.argv[1:]])
