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

FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
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
    assert loaded.layout == int4.LAYOUT_CPU and loaded.int4_weights == 2 * 4  # qkv, o, gate_up, down per layer
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
