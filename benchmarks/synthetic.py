"""Synthetic models and workloads, written once: the model shapes the benchmarks run (Llama-3.1 8B and 70B,
Qwen3-30B-A3B),
random plain int4 checkpoints and random in-memory models of them, the benchmark workloads of random token ids, and
random paged-attention cases. The benchmarks and the tests use these."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from shardgen.actors import int4
from shardgen.actors.kernels import kv_cache
from shardgen.actors.kernels.kv_cache import LayerCache
from shardgen.actors.model.attention import AttentionMetadata
from shardgen.actors.model.checkpoint_writer import PlannedTensor, save_checkpoint
from shardgen.actors.model.config import ModelConfig, QuantConfig
from shardgen.actors.model.distributed import SINGLE
from shardgen.actors.model.loader import LoadedModel
from shardgen.actors.model.model import CausalLM

LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
# Llama-3.1-70B's shape (issue 8: tensor parallelism on several GPUs).
LLAMA_70B = dict(LLAMA_8B, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                 num_key_value_heads=8)
# Qwen3-30B-A3B's shape (issue 21: mixtures of experts): 48 layers of 128 experts, 8 routed a token.
QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
                 "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768, "num_experts": 128,
                 "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
                 "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
                 "tie_word_embeddings": False}
SHAPES = {"llama-8b": LLAMA_8B, "llama-70b": LLAMA_70B, "qwen3-30b-a3b": QWEN3_30B_A3B}


def layer_linears(shape: dict) -> dict[str, tuple[int, int]]:
    """Every int4 linear of one decoder layer of ``shape``: its name under the layer and its (out, in) shape."""
    h = shape["hidden_size"]
    d = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = d * shape["num_attention_heads"], d * shape["num_key_value_heads"]
    linears = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, q)}
    experts = [f"mlp.experts.{e}." for e in range(shape.get("num_experts", 0))] or ["mlp."]
    i = shape["moe_intermediate_size"] if "num_experts" in shape else shape["intermediate_size"]
    for e in experts:
        linears.update({f"{e}gate_proj": (i, h), f"{e}up_proj": (i, h), f"{e}down_proj": (h, i)})
    return linears


def layer_floats(shape: dict) -> dict[str, tuple[int, ...]]:
    """One decoder layer's float tensors: norms (Qwen3's per-head q/k norms too) and a mixture's router."""
    h = shape["hidden_size"]
    floats: dict[str, tuple[int, ...]] = {"input_layernorm": (h,), "post_attention_layernorm": (h,)}
    if shape["model_type"] in ("qwen3", "qwen3_moe"):
        d = shape.get("head_dim") or h // shape["num_attention_heads"]
        floats.update({"self_attn.q_norm": (d,), "self_attn.k_norm": (d,)})
    if "num_experts" in shape:
        floats["mlp.gate"] = (shape["num_experts"], h)
    return floats


# (prompts, prompt tokens, generated tokens). throughput: TensorRT-LLM's published H200 shape (128 in / 2048 out), run
# when named, with --max-num-seqs as high as the cache holds. shared-prefix: every prompt is one system prompt of
# SHARED_PREFIX tokens and a suffix of its own (prefix caching, issue 19).
WORKLOADS = {"decode-heavy": (128, 32, 2048), "prefill-heavy": (32, 4096, 32), "mixed": (1000, 1024, 128),
             "throughput": (2048, 128, 2048), "shared-prefix": (1000, 2100, 128)}
SHARED_PREFIX = 2000


def workload_prompts(name: str, scale: float, seed: int = 0) -> tuple[list[list[int]], int]:
    n, input_len, output_len = WORKLOADS[name]
    g = torch.Generator().manual_seed(seed)
    count = max(1, round(n * scale))
    if name == "shared-prefix":
        system = torch.randint(0, 128000, (SHARED_PREFIX,), generator=g).tolist()
        suffixes = torch.randint(0, 128000, (count, input_len - SHARED_PREFIX), generator=g).tolist()
        return [system + s for s in suffixes], output_len
    return torch.randint(0, 128000, (count, input_len), generator=g).tolist(), output_len


def synthetic_tokenizer(vocab_size: int, seed: int = 0):
    """A Hugging Face fast tokenizer of ``vocab_size`` tokens for a random model: the 95 printable ASCII characters,
    then random strings of 2-8 of them (as a BPE vocabulary's merges are), then the EOS token. What a grammar's
    per-step mask costs depends on the vocabulary's size and its tokens' text, not on the weights."""
    import random
    import string

    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    chars = string.printable[:95]
    vocab = {c: i for i, c in enumerate(chars)}
    while len(vocab) < vocab_size - 1:
        vocab.setdefault("".join(rng.choices(chars, k=rng.randint(2, 8))), len(vocab))
    vocab["</s>"] = len(vocab)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="</s>")), eos_token="</s>")


def write_checkpoint(out: Path, group_size: int = 128, shape: dict = LLAMA_8B) -> Path:
    """A plain int4 checkpoint of ``shape`` (the 8B one by default), random weights made and quantized on the GPU
    one tensor at a time; lm_head, embeddings, norms and routers stay bf16. Reused if ``out`` already holds one."""
    if (out / "config.json").exists():
        return out
    cfg = dict(shape, quantization_config=QuantConfig(group_size).to_hf_dict())
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02

    plan = [PlannedTensor("model.embed_tokens.weight", (v, h), torch.bfloat16, None, lambda: randn((v, h)))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        for name, size in layer_floats(cfg).items():
            make = (lambda size=size: torch.ones(size, dtype=torch.bfloat16)) if len(size) == 1 else \
                (lambda size=size: randn(size))
            plan.append(PlannedTensor(f"{p}.{name}.weight", size, torch.bfloat16, None, make))
        for name, shape in layer_linears(cfg).items():
            plan.append(PlannedTensor(f"{p}.{name}.weight", shape, torch.bfloat16, group_size,
                                      lambda shape=shape: int4.quantize(randn(shape), group_size)))
    plan.append(PlannedTensor("model.norm.weight", (h,), torch.bfloat16, None, lambda: torch.ones(h, dtype=torch.bfloat16)))
    plan.append(PlannedTensor("lm_head.weight", (v, h), torch.bfloat16, None, lambda: randn((v, h))))
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_checkpoint(tmp, plan)
    tmp.rename(out)
    return out


def random_model(raw: dict, layout: str, group_size: int = 128) -> LoadedModel:
    """The model with random weights made on the GPU: int4 layers quantized there, then converted (or bf16)."""
    quantized = layout != "bf16"
    cfg = ModelConfig.from_dict({**raw, **({"quantization_config": QuantConfig(group_size).to_hf_dict()} if quantized else {})})
    linears = layer_linears(raw)
    groups = {f"model.layers.{i}.{m}": group_size for i in range(cfg.num_layers) for m in linears} if quantized else {}
    start = time.perf_counter()
    model = CausalLM(cfg, SINGLE, torch.bfloat16, "cuda", groups)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name, p in model.named_parameters():
        if int4.is_int4(p.data):
            w = torch.randn(p.shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
            int4.copy_rows(p.data, int4.quantize(w, group_size), 0)
        elif name.endswith("norm.weight"):
            p.data.fill_(1.0)
        else:
            p.data.normal_(0, 0.02, generator=gen)
    loaded = time.perf_counter()
    layout = layout if quantized else int4.LAYOUT_DENSE
    count = int4.convert_module_weights(model, layout, torch.bfloat16)  # a dense model's experts are grouped too
    torch.cuda.synchronize()
    return LoadedModel(model.eval(), cfg, layout, count, loaded - start, time.perf_counter() - loaded)


def make_case(q_lens: list[int], ctx_lens: list[int], hq: int, hkv: int, d: int, dtype: torch.dtype,
              device: str = "cpu", block_size: int = 16, seed: int = 0, kv_cache_dtype: str = "auto"):
    """Random q/k/v, a cache whose blocks are shuffled (in ``dtype``, or fp8 with scales), and the batch's metadata."""
    g = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-c // block_size) for c in ctx_lens) + 3
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables = []
    for c in ctx_lens:
        tables.append([order.pop() for _ in range(-(-c // block_size))])
    width = max(len(t) for t in tables) + 2  # padded, as the runner's tables are
    block_tables = torch.zeros(len(q_lens), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t)
    slots = [t[p // block_size] * block_size + p % block_size
             for q, c, t in zip(q_lens, ctx_lens, tables) for p in range(c - q, c)]
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(q_lens).cumsum(0)
    t = sum(q_lens)
    r = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    q, k, v = r(t, hq, d), r(t, hkv, d), r(t, hkv, d)
    shape = (num_blocks, block_size, hkv, d)
    if kv_cache_dtype == "fp8":  # values of varied magnitude per token, as real keys have
        rows = lambda: r(num_blocks * block_size, hkv, d) * torch.rand(num_blocks * block_size, hkv, 1, generator=g) * 8  # noqa: E731
        (kc, ks), (vc, vs) = kv_cache.quantize(rows()), kv_cache.quantize(rows())
        cache = LayerCache(kc.view(shape), vc.view(shape), ks.view(shape[:-1]), vs.view(shape[:-1]))
    else:
        cache = LayerCache(r(*shape), r(*shape))
    meta = AttentionMetadata(cu, torch.tensor(ctx_lens, dtype=torch.int32), max(q_lens), max(ctx_lens),
                             torch.tensor(slots), block_tables)
    move = lambda x: x.to(device)  # noqa: E731
    meta = AttentionMetadata(move(meta.cu_seqlens_q), move(meta.context_lens), meta.max_q_len, meta.max_context_len,
                             move(meta.slot_mapping), move(meta.block_tables))
    return move(q), move(k), move(v), cache_to(cache, device), meta


def cache_to(cache: LayerCache, device: str, float32: bool = False) -> LayerCache:
    """A copy of the cache on ``device``; ``float32``: an unquantized cache widened (the reference's precision)."""
    if cache.quantized:
        return LayerCache(*(t.to(device).clone() for t in (cache.k, cache.v, cache.k_scale, cache.v_scale)))
    widen = (lambda t: t.float()) if float32 else (lambda t: t)  # noqa: E731
    return LayerCache(widen(cache.k).to(device).clone(), widen(cache.v).to(device).clone())
