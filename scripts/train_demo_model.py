"""Train the embedded demo model, quantize it with ``shardgen quantize``, and measure what int4 costs.

    python -m scripts.train_demo_model --out /tmp/demo-train            # on a GPU: ~5 minutes
    python -m scripts.train_demo_model --out /tmp/t --steps 20 --device cpu --eval-tokens 4096   # a quick check

Data: the Python standard library's own ``.py`` files (every machine has them; no download), sorted by path;
every 20th file is held out for evaluation, the rest train a byte-level BPE tokenizer (``tokenizers``) and a
small Llama (8 layers, hidden 256, tied embeddings) with transformers. Deterministic given the Python version
(its stdlib is the data), the seed and the step count, which the results record.

Measured on the held-out files: perplexity of the bf16 model (transformers, and shardgen dense) and of its int4
versions at G=32, 64, 128 through shardgen on the GPU (preshuffled) and the CPU layout; greedy agreement on the
demo prompts (first lines of held-out functions) between bf16 and int4, and between the CPU and GPU layouts.
Writes ``<out>/int4-g128`` (the shipped checkpoint), ``<out>/prompts.jsonl`` and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
from pathlib import Path


import torch

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 4096, "hidden_size": 256,
    "intermediate_size": 768, "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
    "hidden_act": "silu",
}
EOS = "<|endoftext|>"
HOLDOUT_EVERY = 20
CONTEXT = 256


def source_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of the standard library, in a fixed order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size < 400_000)
    held = files[::HOLDOUT_EVERY]
    return [f for f in files if f not in set(held)], held


def read(files: list[Path]) -> list[str]:
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


def train_tokenizer(texts: list[str], out: Path):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=CONFIG["vocab_size"], min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS)
    tok.save_pretrained(out)
    return tok


def encode(tok, texts: list[str]) -> torch.Tensor:
    eos = tok.convert_tokens_to_ids(EOS)
    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t)["input_ids"] + [eos])
    return torch.tensor(ids, dtype=torch.int64)


def train(data: torch.Tensor, steps: int, minutes: float, device: str, seed: int, batch: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "architectures"}, eos_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    gen = torch.Generator().manual_seed(seed)
    start, losses, done = time.perf_counter(), [], 0
    for step in range(steps):
        at = torch.randint(0, len(data) - CONTEXT - 1, (batch,), generator=gen)
        x = torch.stack([data[i: i + CONTEXT + 1] for i in at.tolist()]).to(device)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(input_ids=x[:, :-1], labels=x[:, :-1].clone()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if step % 100 == 0 or step == steps - 1:
            losses.append((step, round(loss.item(), 4)))
            print(f"step {step} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if time.perf_counter() - start > minutes * 60:
            break
    return model, {"steps": done, "train_s": round(time.perf_counter() - start, 1), "losses": losses,
                   "tokens_seen": done * batch * CONTEXT}


def windows(data: torch.Tensor, tokens: int) -> torch.Tensor:
    n = min(tokens, len(data) - 1) // (CONTEXT + 1)
    return data[: n * (CONTEXT + 1)].view(n, CONTEXT + 1)


@torch.no_grad()
def perplexity(logits_of, wins: torch.Tensor, batch: int = 32) -> float:
    """exp(mean next-token NLL) over held-out windows; ``logits_of(ids (B, L)) -> (B, L, V)``."""
    nll, count = 0.0, 0
    for i in range(0, len(wins), batch):
        w = wins[i: i + batch]
        logits = logits_of(w[:, :-1]).float()
        nll += torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1).to(logits.device),
                                                 reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(nll / count)


def shardgen_logits_fn(model, device: torch.device):
    from shardgen.actors.model.attention import AttentionMetadata

    def logits_of(ids: torch.Tensor) -> torch.Tensor:
        b, length = ids.shape
        meta = AttentionMetadata.prefill([length] * b, device)
        positions = torch.arange(length, device=device).repeat(b)
        hidden = model(ids.flatten().to(device), positions, meta)
        return model.compute_logits(hidden).view(b, length, -1)

    return logits_of


def demo_prompts(held: list[Path], n: int = 200) -> list[dict]:
    """The first two lines of held-out functions (a def line and what follows), in file order."""
    prompts = []
    for f in held:
        lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines[:-1]):
            if line.lstrip().startswith("def ") and line.rstrip().endswith(":") and len(prompts) < n:
                indent = len(line) - len(line.lstrip())
                prompts.append("\n".join(x[indent:] for x in lines[i: i + 2]) + "\n")
    return [{"id": f"demo-{k:04d}", "prompt": p, "max_new_tokens": 48} for k, p in enumerate(prompts)]


def greedy(model_dir: Path, device: str, prompts: list[list[int]], new_tokens: int, dtype: str = "auto",
           int4_layout: str = "auto", kv_cache_dtype: str = "auto") -> list[list[int]]:
    from shardgen.actors.engine.build import build_engine
    from shardgen.actors.engine.config import EngineConfig
    from shardgen.actors.model.distributed import SINGLE
    from shardgen.actors.model.loader import load_model
    from shardgen.actors.engine.sequence import Request, SamplingParams

    cfg = EngineConfig(max_num_seqs=64, max_num_batched_tokens=4096, kv_cache_memory=2**28,
                       kv_cache_dtype=kv_cache_dtype)
    loaded = load_model(model_dir, SINGLE, device, dtype, int4_layout=int4_layout)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    done = build_engine(loaded, cfg).generate([Request(str(i), p, params) for i, p in enumerate(prompts)])
    return [c.token_ids for c in done]


def agreement(a: list[list[int]], b: list[list[int]]) -> dict:
    """Share of identical tokens position by position, and of tokens before each pair's first divergence."""
    same = sum(x == y for s, t in zip(a, b) for x, y in zip(s, t))
    prefix = sum(next((i for i, (x, y) in enumerate(zip(s, t)) if x != y), len(s)) for s, t in zip(a, b))
    total = sum(len(s) for s in a)
    return {"identical_tokens": round(same / total, 4), "before_first_divergence": round(prefix / total, 4),
            "identical_sequences": sum(s == t for s, t in zip(a, b)), "sequences": len(a)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--minutes", type=float, default=4.0, help="Stop training early after this long.")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-tokens", type=int, default=262_144)
    a = p.parse_args()
    from shardgen.actors.model.loader import load_model
    from shardgen.actors.model.quantize import quantize_checkpoint

    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    train_files, held = source_files()
    results: dict = {"python": sys.version.split()[0], "stdlib": sysconfig.get_paths()["stdlib"],
                     "train_files": len(train_files), "held_out_files": len(held), "config": CONFIG, "seed": a.seed,
                     "device": torch.cuda.get_device_name() if a.device == "cuda" else "cpu"}

    def save() -> None:  # after every phase: a run cut short keeps what it measured
        (out / "results.json").write_text(json.dumps(results, indent=2))

    t = time.perf_counter()
    tok = train_tokenizer(read(train_files), out / "bf16")
    train_ids, held_ids = encode(tok, read(train_files)), encode(tok, read(held))
    results.update(train_tokens=len(train_ids), held_out_tokens=len(held_ids), tokenizer_s=round(time.perf_counter() - t, 1))
    print(f"tokenizer: {len(train_ids):,} training tokens, {len(held_ids):,} held out", flush=True)
    model, results["training"] = train(train_ids, a.steps, a.minutes, a.device, a.seed)
    model.config.architectures = ["LlamaForCausalLM"]
    model.to(torch.bfloat16).save_pretrained(out / "bf16")
    for g in (128, 64, 32):
        quantize_checkpoint(out / "bf16", out / f"int4-g{g}", group_size=g, overwrite=True)
    prompts = demo_prompts(held)
    (out / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    save()

    wins = windows(held_ids, a.eval_tokens)
    results["eval_tokens"] = wins[:, 1:].numel()
    model.eval()
    ppl = results["perplexity"] = {}
    ppl["bf16 transformers"] = round(perplexity(lambda ids: model(input_ids=ids.to(a.device)).logits, wins), 4)
    dense = load_model(out / "bf16", device=a.device)
    base = ppl["bf16 shardgen"] = round(perplexity(shardgen_logits_fn(dense.model, torch.device(a.device)), wins), 4)
    results["int4_increase"] = {}
    for device in dict.fromkeys([a.device, "cpu"]):
        for g in (128, 64, 32):
            loaded = load_model(out / f"int4-g{g}", device=device)
            key = f"int4 G={g} {loaded.layout}"
            ppl[key] = round(perplexity(shardgen_logits_fn(loaded.model, torch.device(device)), wins), 4)
            results["int4_increase"][key] = round(ppl[key] / base - 1, 4)
            print(f"{key}: perplexity {ppl[key]:.3f} (bf16 {base:.3f})", flush=True)
            save()

    ids = [tok(r["prompt"])["input_ids"] for r in prompts]
    runs = {"bf16": greedy(out / "bf16", a.device, ids, 48)}
    runs["int4 G=128"] = greedy(out / "int4-g128", a.device, ids, 48)
    results["greedy"] = {"bf16 vs int4 G=128": agreement(runs["bf16"], runs["int4 G=128"])}
    results["samples"] = [{"prompt": prompts[i]["prompt"], "int4": tok.decode(runs["int4 G=128"][i])} for i in range(5)]
    save()
    runs["int4 G=128 cpu"] = greedy(out / "int4-g128", "cpu", ids, 48)
    results["greedy"]["int4 G=128 cpu layout vs gpu"] = agreement(runs["int4 G=128 cpu"], runs["int4 G=128"])
    save()
    print(json.dumps({k: results[k] for k in ("perplexity", "int4_increase", "greedy", "training")}, indent=1))


if __name__ == "__main__":
    main()
