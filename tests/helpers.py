"""Tiny models built in the tests (random weights, no download) and their references."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shardgen.actors import int4
from shardgen.actors.kernels import kv_cache
from shardgen.actors.model.attention import AttentionMetadata
from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.checkpoint_writer import PlannedTensor, save_checkpoint
from shardgen.actors.model.config import QuantConfig
from shardgen.actors.model.quantize import quantize_checkpoint

ROOT = Path(__file__).resolve().parents[1]  # the repository

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}

TINY = dict(vocab_size=301, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            initializer_range=0.2, tie_word_embeddings=False)


# config.json of a small Llama (8 heads, 2 KV heads), for the config tests
LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "vocab_size": 1000, "hidden_size": 512, "intermediate_size": 1024,
                "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 2}


def llama_config(**overrides: object):
    """``ModelConfig`` of ``LLAMA_CONFIG`` with ``overrides`` of its keys."""
    from shardgen.actors.model.config import ModelConfig

    return ModelConfig.from_dict({**LLAMA_CONFIG, **overrides})


def hf_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides: object):
    """A randomly initialised transformers model of ``family`` (llama, mistral, qwen2, qwen3, phi3, gemma3, qwen3_moe, mixtral,
    opt)."""
    import transformers as tf

    classes = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE}),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": None}),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
        "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 64}),
        "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {"pad_token_id": 0, "eos_token_id": 2, "sliding_window": None}),
        "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {
            "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 6, "final_logit_softcapping": 30.0,
            "layer_types": ["sliding_attention", "full_attention"],
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, {
            "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
            "norm_topk_prob": True, "mlp_only_layers": [1]}),  # layer 1 dense: both kinds of MLP
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, {"num_local_experts": 4, "num_experts_per_tok": 2,
                                                               "sliding_window": None}),
        "opt": (tf.OPTConfig, tf.OPTForCausalLM, {"ffn_dim": TINY["intermediate_size"], "init_std": 0.2,
                                                  "word_embed_proj_dim": TINY["hidden_size"]}),
    }
    config_cls, model_cls, extra = classes[family]
    torch.manual_seed(seed)
    config = config_cls(**{**TINY, **extra, **overrides})
    model = model_cls(config).eval()
    if family in ("opt", "gemma3"):  # transformers starts biases and Gemma's norms at 0, LayerNorms at 1: random,
        for name, p in model.named_parameters():  # so a misread one shows
            if name.endswith(".bias") or "norm" in name:
                p.data += 0.1 * torch.randn_like(p)
    # Parameters only: transformers keeps rotary inv_freq in float32 whatever the weights' dtype.
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def save_hf(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    return directory


def int4_checkpoint(family: str, tmp: Path, group_size: int = 32, dtype: torch.dtype = torch.float32,
                    quantize_lm_head: bool = False, **overrides: object):
    """(transformers model whose weights are the dequantized int4 ones, path of the shardgen int4 checkpoint)."""
    model = hf_model(family, dtype, **overrides)
    src = save_hf(model, tmp / f"{family}-float")
    dst = tmp / f"{family}-int4"
    quantize_checkpoint(src, dst, group_size=group_size, quantize_lm_head=quantize_lm_head)
    return dequantized_reference(model, dst), dst


def dequantized_reference(model, ckpt_dir: Path):
    """Load the dequantized int4 weights of ``ckpt_dir`` into a transformers ``model`` (float32)."""
    config = json.loads((ckpt_dir / "config.json").read_text())
    if model.config.tie_word_embeddings and not config.get("tie_word_embeddings", True):
        # The checkpoint stores its own (int4) head: untie, or loading it overwrites the embeddings.
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    state = model.state_dict()
    with Checkpoint(ckpt_dir) as ckpt:
        for name in ckpt.names():
            w = int4.dequantize(ckpt.read(name)) if ckpt.entry(name).is_int4 else ckpt.read(name)
            expert = re.match(r"(.*)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$", name)
            if expert is None:
                state[name.replace(".block_sparse_moe.", ".mlp.")] = w
                continue
            # transformers 5 holds the experts stacked: gate_up_proj (E, 2I, H) = [gate; up], down_proj (E, H, I)
            layer, e, proj = expert.group(1), int(expert.group(2)), expert.group(3)
            stacked = state[f"{layer}.mlp.experts.{'down_proj' if proj in ('down_proj', 'w2') else 'gate_up_proj'}"]
            half = stacked.shape[1] // 2
            rows = {"gate_proj": slice(0, half), "w1": slice(0, half), "up_proj": slice(half, None),
                    "w3": slice(half, None)}.get(proj, slice(None))
            stacked[e, rows] = w
    model = model.float()
    model.load_state_dict(state)
    return model


def hf_greedy(model, prompt: list[int], new_tokens: int, ignore_eos: bool = True) -> list[int]:
    """transformers' own greedy ``generate`` (the reference no shardgen code computes)."""
    ids = torch.tensor([prompt], device=model.device)
    kwargs = {"min_new_tokens": new_tokens, "eos_token_id": None} if ignore_eos else {}
    with torch.no_grad():
        # An explicit mask: token 0 inside a prompt must not be taken for padding.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=model.config.vocab_size - 1, **kwargs)
    return out[0, len(prompt):].tolist()


def prefix_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of tokens before each pair's first divergence (after it the contexts differ, so nothing compares)."""
    same = sum(next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), len(x)) for x, y in zip(a, b))
    return same / sum(len(x) for x in a)


def shardgen_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Logits of a shardgen CausalLM for a (B, L) batch of equal-length prompts, no cache: (B, L, V)."""
    b, length = ids.shape
    meta = AttentionMetadata.prefill([length] * b, ids.device)
    positions = torch.arange(length, device=ids.device).repeat(b)
    with torch.no_grad():
        hidden = model(ids.flatten(), positions, meta)
        return model.compute_logits(hidden).view(b, length, -1)


def greedy_paged(model, prompts: list[list[int]], new_tokens: int, block_size: int = 4,
                 forced: list[list[int]] | None = None, kv_cache_dtype: str = "auto",
                 logits_out: list[torch.Tensor] | None = None) -> list[list[int]]:
    """Greedy decoding through a paged KV cache: one prefill of all prompts, then batched decode steps.

    Returns each step's argmax. With ``forced``, those tokens are fed instead of the argmax
    (teacher forcing), so every step is compared on the same context. ``logits_out`` collects each step's
    logits (B, V).
    """
    attn = model.model.layers[0].self_attn
    b = len(prompts)
    max_len = max(len(p) for p in prompts) + new_tokens
    blocks_per_seq = -(-max_len // block_size)
    weight = model.model.embed_tokens.weight
    dev = weight.device
    caches = kv_cache.allocate(len(model.model.layers), b * blocks_per_seq, block_size, attn.num_kv_heads,
                               attn.head_dim, weight.dtype, kv_cache_dtype, dev)
    # Hand out blocks in reverse so block order differs from sequence order.
    tables = torch.arange(b * blocks_per_seq).flip(0).view(b, blocks_per_seq)
    seqs = [list(p) for p in prompts]

    def step(chunks: list[list[int]]) -> list[int]:
        ids, pos, slots = [], [], []
        for s, chunk in enumerate(chunks):
            start = len(seqs[s]) - len(chunk)
            for i, tok in enumerate(chunk):
                p = start + i
                ids.append(tok)
                pos.append(p)
                slots.append(int(tables[s, p // block_size]) * block_size + p % block_size)
        q_lens = [len(c) for c in chunks]
        cu = torch.tensor([0] + q_lens).cumsum(0).to(dev)
        ctx = torch.tensor([len(s) for s in seqs])
        meta = AttentionMetadata(cu, ctx.to(dev), max(q_lens), int(ctx.max()), torch.tensor(slots, device=dev), tables.to(dev))
        with torch.no_grad():
            hidden = model(torch.tensor(ids, device=dev), torch.tensor(pos, device=dev), meta, caches)
            logits = model.compute_logits(hidden[cu[1:] - 1])
        if logits_out is not None:
            logits_out.append(logits)
        return logits.argmax(-1).tolist()

    predicted = [[t] for t in step([list(p) for p in prompts])]
    for i in range(1, new_tokens):
        fed = [forced[s][i - 1] if forced else predicted[s][-1] for s in range(b)]
        for s, t in enumerate(fed):
            seqs[s].append(t)
        for s, t in enumerate(step([[t] for t in fed])):
            predicted[s].append(t)
    return predicted


def synthetic_int4_checkpoint(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int,
                              heads: int, kv_heads: int, group_size: int = 128) -> int:
    """A Llama-shaped plain int4 checkpoint of random bytes (fast to make at any size). Returns its bytes."""
    directory.mkdir(parents=True, exist_ok=True)
    head_dim = hidden // heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "rms_norm_eps": 1e-5, "max_position_embeddings": 4096,
        "torch_dtype": "bfloat16", "quantization_config": QuantConfig(group_size).to_hf_dict(),
    }
    (directory / "config.json").write_text(json.dumps(config))

    def rand_int4(n: int, k: int):
        g = torch.Generator().manual_seed(n * 31 + k)
        return lambda: int4.Int4Tensor(
            torch.randint(-128, 128, (n, k // 2), dtype=torch.int8, generator=g),
            torch.rand(k // group_size, n, generator=g).to(torch.bfloat16) * 0.01,
            torch.zeros(k // group_size, n, dtype=torch.bfloat16), [1, group_size], torch.Size([n, k]))

    def dense(*shape: int):
        return lambda: torch.randn(*shape).to(torch.bfloat16)

    plan = [PlannedTensor("model.embed_tokens.weight", (vocab, hidden), torch.bfloat16, None, dense(vocab, hidden))]
    linears = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
               "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
               "mlp.gate_proj": (intermediate, hidden), "mlp.up_proj": (intermediate, hidden),
               "mlp.down_proj": (hidden, intermediate)}
    for i in range(layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            plan.append(PlannedTensor(f"model.layers.{i}.{norm}.weight", (hidden,), torch.bfloat16, None, dense(hidden)))
        for name, (n, k) in linears.items():
            plan.append(PlannedTensor(f"model.layers.{i}.{name}.weight", (n, k), torch.bfloat16, group_size, rand_int4(n, k)))
    plan.append(PlannedTensor("model.norm.weight", (hidden,), torch.bfloat16, None, dense(hidden)))
    plan.append(PlannedTensor("lm_head.weight", (vocab, hidden), torch.bfloat16, None, dense(vocab, hidden)))
    save_checkpoint(directory, plan, max_shard_bytes=2**28)
    return sum(t.nbytes() for t in plan)


def run_ranks(target, world: int, out: Path, *args: object, timeout: float = 300) -> None:
    """``target(rank, *args)`` in ``world`` spawned processes (a TP group's ranks, joined through gloo); fails with
    the first rank's traceback, which each rank writes to ``out/rank<r>.err``."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=(r, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        if p.is_alive():  # a hung rank (a collective its peer never joined): the test fails, not the whole run
            p.kill()
    errors = [f.read_text() for f in sorted(out.glob("*.err"))]
    assert not errors, errors[0]
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]


def model_with_tokenizer(family: str, tmp: Path, **overrides: object):
    """(dequantized transformers reference, int4 checkpoint dir with the byte-level demo tokenizer)."""
    from shardgen.jobs.demo import build_byte_tokenizer

    reference, path = int4_checkpoint(family, tmp, vocab_size=264, eos_token_id=256, bos_token_id=257, **overrides)
    build_byte_tokenizer(path)
    return reference, path


def make_engine(loaded, kv_tokens: int = 4096, block_size: int = 4, eos: set[int] = frozenset(), detokenize=None,
                tokenizer=None, **config):
    """A CPU engine over the ``model`` fixture's tiny Llama (tests/actors/conftest.py), its cache sized in tokens."""
    from shardgen.actors.engine.build import build_engine
    from shardgen.actors.engine.config import EngineConfig

    bytes_per_block = 2 * 2 * block_size * 2 * 32 * 4  # k+v, 2 layers, block, 2 kv heads, head_dim 32, float32
    cfg = EngineConfig(block_size=block_size, kv_cache_memory=kv_tokens // block_size * bytes_per_block, **config)
    return build_engine(loaded, cfg, eos_token_ids=eos, detokenize=detokenize, tokenizer=tokenizer)


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Prompts of random token ids (within the tiny models' vocabulary) of the given lengths."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 301, (n,), generator=g).tolist() for n in lengths]


def require_gpu_kernels() -> None:
    """Skip the calling test module unless a CUDA GPU and fbgemm-gpu-genai are present."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU", allow_module_level=True)
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401
    except ImportError:
        pytest.skip("needs fbgemm-gpu-genai (pip install shardgen[gpu])", allow_module_level=True)


def in_triton_interpreter(code: str, *args: str, timeout: int = 900) -> object:
    """Run ``code`` (Python whose last line of output is one JSON value) in a child process under Triton's CPU
    interpreter, and return that value. TRITON_INTERPRET is read when kernels are defined, so it cannot be switched
    on inside the test process."""
    done = subprocess.run([sys.executable, "-c", code, *args], env={**os.environ, "TRITON_INTERPRET": "1"},
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def output_block(n: int, reason: str = "length", layout: str = "int4-dual", samples: int = 1):
    """``n`` input rows' finished output block as the generate and detokenize stages hand it to the writer: each row
    has ``samples`` sample rows (sample_index 0..samples-1) of 3 prompt and 2 completion tokens, or one error row
    (``reason`` "error"); plus a column the writer does not keep."""
    import pyarrow as pa

    from shardgen.pipeline.columns import TOP_LOGPROBS

    error = reason == "error"
    index = [None if error else k for i in range(n) for k in range(1 if error else samples)]
    m = len(index)
    return pa.table({
        "id": [str(i) for i in range(n) for _ in range(1 if error else samples)],
        "sample_index": pa.array(index, pa.int32()), "prompt": ["p"] * m, "completion": ["c"] * m,
        "completion_token_ids": pa.array([[1, 2]] * m, pa.list_(pa.int64())), "prompt_tokens": [3] * m,
        "completion_tokens": [0 if error else 2] * m, "finish_reason": [reason] * m,
        "error": pa.array(["prompt: empty" if error else None] * m, pa.string()),
        "logprobs": pa.array([None] * m, pa.list_(pa.float32())), "top_logprobs": pa.array([None] * m, TOP_LOGPROBS),
        "prompt_logprobs": pa.array([None] * m, pa.list_(pa.float32())), "layout": [layout] * m, "params": [None] * m,
    })
