"""The fp8 KV cache: its quantization, its size, and what it does to a model's outputs (CPU, float32)."""

import json

import pytest
import torch

from shardgen.actors.engine.build import build_engine

from shardgen.actors.kernels import kv_cache
from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.model.loader import load_model
from shardgen.actors.engine.sequence import Request, SamplingParams
from shardgen.jobs.demo import demo_assets
from tests.helpers import greedy_paged, make_engine, random_prompts


def test_quantize_keeps_each_head_to_e4m3_precision_of_its_own_range():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, 64, generator=g) * torch.tensor([1e-4, 1.0, 300.0])[None, :, None]
    x[2, 1] = 0.0  # an all-zero head stays zero
    q, scale = kv_cache.quantize(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (7, 3)
    back = q.float() * scale[..., None]
    rel = (back - x).abs() / x.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    assert rel.max() <= 16 / 448 + 1e-6  # half a step of 32 at the top of e4m3's range
    assert torch.equal(back[2, 1], torch.zeros(64))
    assert q.float().abs().amax(-1).max() == kv_cache.FP8_MAX  # the range is used to its end


def test_an_fp8_block_takes_a_half_of_bf16s_bytes_plus_its_scales():
    bf16 = kv_cache.block_bytes(32, 16, 8, 128, torch.bfloat16, "auto")
    fp8 = kv_cache.block_bytes(32, 16, 8, 128, torch.bfloat16, "fp8")
    assert bf16 == 2 * 32 * 16 * 8 * 128 * 2
    assert fp8 / bf16 == (128 + 4) / 256


def test_the_runner_fits_more_blocks_of_fp8_in_the_same_memory(model):
    _, loaded = model
    auto = make_engine(loaded).runner
    cfg = EngineConfig(block_size=4, kv_cache_memory=auto.config.kv_cache_memory, kv_cache_dtype="fp8")
    fp8 = build_engine(loaded, cfg).runner
    assert fp8.kv_caches[0].k.dtype == torch.float8_e4m3fn and fp8.kv_caches[0].quantized
    assert fp8.num_blocks == auto.num_blocks * 32 * 4 // (32 + 4)  # float32 model: 4 bytes -> 1 + a scale per head
    assert fp8.kv_cache_bytes <= auto.kv_cache_bytes


def test_an_unknown_kv_cache_dtype_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"`kv_cache_dtype` must be one of auto, fp8, got 'int8'"):
        EngineConfig(kv_cache_dtype="int8")


def test_a_gpu_without_fp8_conversions_is_refused_naming_the_fix(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match=r"compute capability 8.9 or newer .* A100.* is 8.0: use `kv_cache_dtype` auto"):
        kv_cache.check_supported("fp8", torch.device("cuda", 0))
    kv_cache.check_supported("auto", torch.device("cuda", 0))  # the model's dtype runs anywhere


def test_the_engine_generates_through_an_fp8_cache_with_preemption(model):
    """A cache small enough to preempt: recomputed sequences are written to the fp8 cache again, and the tokens are
    those of a cache with room for all."""
    _, loaded = model
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    reqs = [Request(str(i), p, params) for i, p in enumerate(random_prompts([30, 9, 50, 17, 41, 3]))]
    tight = make_engine(loaded, kv_tokens=48, max_num_seqs=6, max_model_len=128, kv_cache_dtype="fp8")  # 168 tokens
    got = tight.generate(reqs)
    assert tight.scheduler.num_preemptions > 0
    want = make_engine(loaded, max_num_seqs=6, kv_cache_dtype="fp8").generate(reqs)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(len(g.token_ids) == 24 for g in got)


def test_fp8_keys_and_values_cost_the_demo_model_little_perplexity():
    """Teacher-forced next-token loss of the trained demo model (int4, CPU layout) through the paged cache: fp8 costs
    under 1% of perplexity here, and is not free (the cache really is quantized)."""
    from transformers import AutoTokenizer

    model_dir, prompts_file = demo_assets()
    tok = AutoTokenizer.from_pretrained(model_dir)
    text = "".join(json.loads(line)["prompt"] for line in prompts_file.read_text().splitlines()[:60])
    ids = tok(text)["input_ids"][: 4 * 96]
    windows = [ids[i: i + 96] for i in range(0, len(ids), 96)]
    lm = load_model(model_dir).model

    def nll(kv_cache_dtype: str) -> float:
        logits: list[torch.Tensor] = []
        greedy_paged(lm, [w[:1] for w in windows], len(windows[0]) - 1, forced=[w[1:] for w in windows],
                     kv_cache_dtype=kv_cache_dtype, logits_out=logits)
        steps = torch.stack(logits, 1)  # (windows, 95, V): step t predicts token t + 1 from tokens <= t
        targets = torch.tensor([w[1:] for w in windows])
        return float(torch.nn.functional.cross_entropy(steps.flatten(0, 1), targets.flatten()))

    auto, fp8 = nll("auto"), nll("fp8")
    increase = torch.exp(torch.tensor(fp8 - auto)).item() - 1
    print(f"perplexity {torch.exp(torch.tensor(auto)):.3f} -> {torch.exp(torch.tensor(fp8)):.3f} (+{increase:.3%})")
    assert 0 < abs(increase) < 0.01
