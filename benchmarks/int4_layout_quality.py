"""What an int4 layout's arithmetic costs in quality, on the embedded demo model (plain int4, G=128), on one GPU.

    python -m benchmarks.int4_layout_quality [--layouts int4-preshuffled,int4-humming,int4-humming-fp8act]
    python -m benchmarks.int4_layout_quality --emulate-cpu --eval-tokens 65536    # no GPU: W4A8's arithmetic in float32

Every layout computes with the checkpoint's own int4 codes, scales and zero points; they differ in how the
product is formed (bf16 activations against fbgemm's or humming's dequantization, or e4m3 activations on fp8
tensor cores for ``int4-humming-fp8act``). For each: held-out perplexity through the paged cache (as
``kv_cache_quality`` measures it) and greedy completions of the 200 demo prompts (48 tokens), compared with the
first layout's. Writes ``results/int4_layout_quality-<device>.json``.

``--emulate-cpu`` measures what W4A8's arithmetic alone costs, on the CPU in float32: every int4 linear computes
``x_e4m3 @ (q * s)^T + (group sums of x, in bf16) @ Z`` with x rounded to e4m3 with one scale a token (max |x| / 448),
which is the split ``int4-humming-fp8act`` runs, against the exact dequantized product (``cpu-dequantized``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.kv_cache_quality import cached_logits_fn, demo_eval_set, write_results
from scripts.train_demo_model import agreement, greedy, perplexity

LAYOUTS = "int4-preshuffled,int4-humming,int4-humming-fp8act"


def emulate_w4a8(model: torch.nn.Module) -> int:
    """Make every int4 linear of ``model`` (plain ``Int4Tensor`` weights, not converted) compute W4A8's split in
    float32; the other weights are made plain float32. Returns how many linears were changed."""
    from shardgen.actors import int4
    from shardgen.actors.model.layers import LinearBase

    count = 0
    for module in model.modules():
        if not (isinstance(module, LinearBase) and int4.is_int4(module.weight.data)):
            continue
        t = module.weight.data
        g = int4.group_size_of(t)
        codes = int4.unpack(t.qdata).float().view(t.shape[0], -1, g) * t.scale.t().float().unsqueeze(-1)
        qs, zeros = codes.reshape(t.shape), t.zero_point.float()  # (N, K), (K/G, N)

        def w4a8(x: torch.Tensor, bias: torch.Tensor | None, qs=qs, zeros=zeros, g=g) -> torch.Tensor:
            x2 = x.reshape(-1, x.shape[-1]).float()
            scale = x2.abs().amax(-1, keepdim=True).clamp(min=1e-12) / 448
            xq = (x2 / scale).to(torch.float8_e4m3fn).float() * scale
            sums = x2.view(x2.shape[0], -1, g).sum(-1).to(torch.bfloat16).float()
            y = xq @ qs.T + sums @ zeros
            return (y if bias is None else y + bias).reshape(*x.shape[:-1], -1)

        module._linear = w4a8
        count += 1
    for module in model.modules():  # embeddings, norms, a bf16 head: dequantize nothing else, cast to float32
        for name, p in list(module.named_parameters(recurse=False)):
            if not int4.is_int4(p.data):
                p.data = p.data.float()
    return count


def emulate_on_cpu(eval_tokens: int, results_dir: Path) -> None:
    """Perplexity and greedy agreement of the W4A8 split against the exact dequantized model, on the CPU."""
    from shardgen.actors.engine.build import build_engine
    from shardgen.actors.engine.config import EngineConfig
    from shardgen.actors.engine.sequence import Request, SamplingParams
    from shardgen.actors.model.checkpoint import Checkpoint
    from shardgen.actors.model.config import ModelConfig
    from shardgen.actors.model.loader import LoadedModel, int4_groups, load_model
    from shardgen.actors.model.model import CausalLM
    from scripts.train_demo_model import shardgen_logits_fn

    model_dir, wins, ids = demo_eval_set(eval_tokens)
    cpu = torch.device("cpu")
    exact = load_model(model_dir, device=cpu)
    config = ModelConfig.from_dir(model_dir)
    with Checkpoint(model_dir) as ckpt:
        model = CausalLM(config, dtype=torch.float32, device=cpu, int4_groups=int4_groups(ckpt))
        model.load_weights(ckpt)
    changed = emulate_w4a8(model)
    emulated = LoadedModel(model.eval(), config, "emulated-w4a8", changed, 0.0, 0.0)
    params = SamplingParams(max_new_tokens=48, ignore_eos=True)
    results: dict = {"device": "cpu (float32, W4A8 emulated)", "eval_tokens": wins[:, 1:].numel(),
                     "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "perplexity": {}}
    completions = {}
    with torch.inference_mode():
        for name, loaded in (("w4a16 (dequantized)", exact), ("w4a8 split", emulated)):
            results["perplexity"][name] = round(perplexity(shardgen_logits_fn(loaded.model, cpu), wins), 4)
            engine = build_engine(loaded, EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096,
                                                       kv_cache_memory=2**28))
            done = engine.generate([Request(str(i), p, params) for i, p in enumerate(ids)])
            completions[name] = [c.token_ids for c in sorted(done, key=lambda c: int(c.request_id))]
            print(name, results["perplexity"][name], flush=True)
    ppl = list(results["perplexity"].values())
    results["perplexity_increase"] = round(ppl[1] / ppl[0] - 1, 5)
    results["greedy w4a8 vs w4a16"] = agreement(*completions.values())
    write_results(results, results_dir, "int4_layout_quality-cpu-emulated")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layouts", default=LAYOUTS, help="the first is the reference of the greedy comparison")
    p.add_argument("--eval-tokens", type=int, default=262_144)
    p.add_argument("--results-dir", type=Path, default=Path(__file__).resolve().parent / "results")
    p.add_argument("--emulate-cpu", action="store_true", help="no GPU: W4A8's arithmetic emulated in float32")
    a = p.parse_args()
    if a.emulate_cpu:
        return emulate_on_cpu(a.eval_tokens, a.results_dir)
    from shardgen.actors.model.loader import load_model

    model_dir, wins, ids = demo_eval_set(a.eval_tokens)
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    layouts = a.layouts.split(",")
    results: dict = {"device": name, "python": sys.version.split()[0], "eval_tokens": wins[:, 1:].numel(),
                     "run": time.strftime("%Y-%m-%dT%H:%M:%S"), "perplexity": {}, "greedy_vs_" + layouts[0]: {}}
    completions = {}
    for layout in layouts:
        loaded = load_model(model_dir, device=device, int4_layout=layout)
        results["perplexity"][layout] = round(perplexity(cached_logits_fn(loaded.model, device, "auto"), wins), 4)
        del loaded
        completions[layout] = greedy(model_dir, "cuda", ids, 48, int4_layout=layout)
        results["greedy_vs_" + layouts[0]][layout] = agreement(completions[layouts[0]], completions[layout])
        print(layout, results["perplexity"][layout], results["greedy_vs_" + layouts[0]][layout], flush=True)
    base = results["perplexity"][layouts[0]]
    results["perplexity_increase"] = {la: round(v / base - 1, 5) for la, v in results["perplexity"].items()}
    write_results(results, a.results_dir, f"int4_layout_quality-{name.replace(' ', '_')}")


if __name__ == "__main__":
    main()
