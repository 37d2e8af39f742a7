"""shardgen's int4 model against Hugging Face transformers on the same (dequantized int4) weights, float32, TP=1.

Tolerance: both sides run the same float32 operations up to summation order
(SDPA kernels, matmul blocking), so logits agree to ~1e-5 of their scale; we
allow 1e-4 relative to the largest logit. A single wrong int4 nibble, scale or
slice moves logits by far more (test_comparison_detects_one_corrupted_int4_group).
"""

import pytest
import torch

from shardgen.actors import int4
from shardgen.actors.model.loader import load_model
from tests.helpers import (
    greedy_paged,
    hf_greedy,
    hf_model,
    int4_checkpoint,
    save_hf,
    shardgen_logits,
)

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3", "qwen3_moe", "mixtral", "opt"]
RTOL = 1e-4


def _max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("models")
    return {f: int4_checkpoint(f, tmp) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_on_dequantized_weights(checkpoints, family):
    reference, path = checkpoints[family]
    loaded = load_model(path)
    # qkv, o, gate_up, down per layer (OPT: qkv, out, fc1, fc2); an MoE layer has gate_up and down per expert
    moe = loaded.config.moe
    mlps = [2 * moe.num_experts if moe and moe.sparse[i] else 2 for i in range(2)]
    assert loaded.layout == int4.LAYOUT_CPU and loaded.int4_weights == 2 * 2 + sum(mlps)
    ids = torch.randint(0, 301, (3, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = reference(ids).logits
    got = shardgen_logits(loaded.model, ids)
    assert _max_rel_diff(got, want) < RTOL
    assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_tokens_through_the_paged_kv_cache_match_transformers_generate(checkpoints, family):
    reference, path = checkpoints[family]
    model = load_model(path).model
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 301, (n,), generator=gen).tolist() for n in (5, 11, 8)]
    got = greedy_paged(model, prompts, new_tokens=12)
    for prompt, tokens in zip(prompts, got):
        assert tokens == hf_greedy(reference, prompt, 12)


def test_comparison_detects_one_corrupted_int4_group(checkpoints, tmp_path):
    reference, path = checkpoints["llama"]
    loaded = load_model(path)
    # Corrupt one group's scale of one layer: the test above must be able to see it.
    w = loaded.model.model.layers[1].mlp.down_proj.weight
    w.data[:, :32] *= 1.5
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = reference(ids).logits
    assert _max_rel_diff(shardgen_logits(loaded.model, ids), want) > 100 * RTOL


def test_tied_embeddings_share_one_weight(tmp_path):
    reference, path = int4_checkpoint("qwen3", tmp_path, tie_word_embeddings=True)
    loaded = load_model(path)
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = torch.randint(0, 301, (2, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = reference(ids).logits
    assert _max_rel_diff(shardgen_logits(loaded.model, ids), want) < RTOL


def test_quantized_lm_head_unties_and_matches(tmp_path):
    reference, path = int4_checkpoint("llama", tmp_path, quantize_lm_head=True, tie_word_embeddings=True, vocab_size=320)
    loaded = load_model(path)
    assert loaded.int4_weights == 2 * 4 + 1
    assert loaded.model.lm_head.weight is not loaded.model.model.embed_tokens.weight
    ids = torch.randint(0, 320, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = reference(ids).logits
    assert _max_rel_diff(shardgen_logits(loaded.model, ids), want) < RTOL


def test_unquantized_checkpoint_loads_dense(tmp_path):
    model = hf_model("llama")
    path = save_hf(model, tmp_path / "float")
    loaded = load_model(path)
    assert loaded.layout == "dense" and loaded.int4_weights == 0
    ids = torch.randint(0, 301, (2, 9), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = model(ids).logits
    assert _max_rel_diff(shardgen_logits(loaded.model, ids), want) < RTOL


def test_sliding_window_masks_old_keys_like_transformers(tmp_path):
    model = hf_model("mistral", sliding_window=4, attn_implementation="eager")
    path = save_hf(model, tmp_path / "mistral-window")
    loaded = load_model(path)
    ids = torch.randint(0, 301, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        want = model(ids).logits
    assert _max_rel_diff(shardgen_logits(loaded.model, ids), want) < RTOL


def test_opt_with_norms_after_the_residual_and_narrow_projected_embeddings_matches_transformers(tmp_path):
    """OPT-350m's variant: do_layer_norm_before false (no final norm), word_embed_proj_dim below hidden_size (the
    project_in/project_out linears, kept dense by quantize), tied embeddings."""
    reference, path = int4_checkpoint("opt", tmp_path, do_layer_norm_before=False, word_embed_proj_dim=64,
                                      tie_word_embeddings=True)
    loaded = load_model(path)
    assert loaded.model.model.final_layer_norm is None and loaded.model.model.project_in is not None
    assert loaded.model.lm_head.weight is loaded.model.model.embed_tokens.weight
    ids = torch.randint(0, 301, (2, 13), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        want = reference(ids).logits
    assert _max_rel_diff(shardgen_logits(loaded.model, ids), want) < RTOL
    prompt = ids[0, :6].tolist()
    assert greedy_paged(loaded.model, [prompt], new_tokens=10)[0] == hf_greedy(reference, prompt, 10)


def test_phi4_mini_partial_rotary_matches_transformers(tmp_path):
    """Phi-4-mini rotates 3/4 of each head (partial_rotary_factor 0.75) with LongRoPE; the rest passes through."""
    g = torch.Generator().manual_seed(10)
    factors = lambda: (1 + 3 * torch.rand(12, generator=g)).tolist()  # noqa: E731 (24 of 32 features: 12 frequencies)
    rope = {"rope_type": "longrope", "short_factor": factors(), "long_factor": factors(), "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75}
    reference, path = int4_checkpoint("phi3", tmp_path, rope_scaling=rope, original_max_position_embeddings=64,
                                      partial_rotary_factor=0.75, tie_word_embeddings=True)
    model = load_model(path).model
    assert model.model.layers[0].self_attn.rotary.rotary_dim == 24
    ids = torch.randint(0, 301, (2, 30), generator=g)
    with torch.no_grad():
        want = reference(ids).logits
    assert _max_rel_diff(shardgen_logits(model, ids), want) < RTOL
    prompt = ids[0, :9].tolist()
    assert greedy_paged(model, [prompt], new_tokens=8)[0] == hf_greedy(reference, prompt, 8)


def test_phi3_reads_fused_projections_and_longrope_picks_its_frequencies_by_max_model_len(tmp_path):
    """Phi-3 stores qkv_proj and gate_up_proj fused (int4 here, sliced per part on load); LongRoPE's short factors
    match transformers on a prompt within original_max_position_embeddings, and its long factors (chosen when the
    engine's max_model_len is beyond it) on a prompt past it, where transformers takes them too."""
    g = torch.Generator().manual_seed(9)
    factors = lambda: (1 + 3 * torch.rand(16, generator=g)).tolist()  # noqa: E731 (head_dim 32: 16 frequencies)
    rope = {"rope_type": "longrope", "short_factor": factors(), "long_factor": factors(), "rope_theta": 10000.0}
    reference, path = int4_checkpoint("phi3", tmp_path, rope_scaling=rope, original_max_position_embeddings=64)
    from shardgen.actors.model.checkpoint import Checkpoint

    with Checkpoint(path) as ckpt:
        assert ckpt.entry("model.layers.0.self_attn.qkv_proj.weight").is_int4
        assert ckpt.entry("model.layers.0.mlp.gate_up_proj.weight").is_int4
    model = load_model(path).model
    assert model.config.rope.attention_factor == pytest.approx((1 + torch.log(torch.tensor(4.0)).item()
                                                                / torch.log(torch.tensor(64.0)).item()) ** 0.5)
    for max_model_len, length in ((64, 40), (256, 90)):
        model.set_max_model_len(max_model_len)
        ids = torch.randint(0, 301, (2, length), generator=g)
        with torch.no_grad():
            want = reference(ids).logits
        assert _max_rel_diff(shardgen_logits(model, ids), want) < RTOL, max_model_len
    prompt = ids[0, :70].tolist()  # long factors throughout: transformers' choice for a sequence past 64
    assert greedy_paged(model, [prompt], new_tokens=8)[0] == hf_greedy(reference, prompt, 8)


def test_moe_experts_are_int4_one_tensor_each_and_the_router_stays_float(tmp_path):
    from shardgen.actors.model.checkpoint import Checkpoint
    from shardgen.actors.model.loader import int4_groups
    from shardgen.actors.model.model import CausalLM

    _, path = int4_checkpoint("mixtral", tmp_path)
    with Checkpoint(path) as ckpt:
        assert all(ckpt.entry(f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight").is_int4
                   for e in range(4) for w in ("w1", "w2", "w3"))
        assert not ckpt.entry("model.layers.0.block_sparse_moe.gate.weight").is_int4
        groups = int4_groups(ckpt)
    loaded = load_model(path)
    with pytest.raises(ValueError, match=r"block_sparse_moe.gate \(the router\) is int4"):
        CausalLM(loaded.config, int4_groups={**groups, "model.layers.0.block_sparse_moe.gate": 32})


def test_a_loaded_model_is_freed_by_reference_counting_alone(tmp_path):
    """A parameter holds its module's weight_loader weakly: no module-parameter cycle, so a dropped model (or a
    mixture's experts dropped once grouped) gives its memory back at once, not at the cycle collector's next run."""
    import gc
    import weakref

    loaded = load_model(int4_checkpoint("llama", tmp_path)[1])
    refs = [weakref.ref(p) for p in loaded.model.parameters()] + [weakref.ref(m) for m in loaded.model.modules()]
    gc.disable()
    try:
        del loaded
        assert sum(r() is not None for r in refs) == 0
    finally:
        gc.enable()
