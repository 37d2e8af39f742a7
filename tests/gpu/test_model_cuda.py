"""The whole int4 model on the GPU (bf16, preshuffled and plain layouts) against transformers on the dequantized weights.

Tolerance: bf16 activations through 2 layers give ~1e-2 relative logit error;
3e-2 passes that and fails any wrong slice or layout (errors of order 1).
Greedy tokens may diverge where two logits are within bf16 rounding, so the
agreement rate is reported and must stay high rather than be exactly 1.
"""

import pytest
import torch

from actors import int4
from actors.loader import load_model
from tests.helpers import greedy_paged, int4_checkpoint, shardgen_logits

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
try:
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401
except ImportError:
    pytest.skip("needs fbgemm-gpu-genai (pip install shardgen[gpu])", allow_module_level=True)

SM90 = torch.cuda.get_device_capability() >= (9, 0)
SHAPE = dict(vocab_size=2048, hidden_size=512, intermediate_size=1536, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)


@pytest.fixture(scope="module", params=["llama", "qwen2", "qwen3"])
def checkpoint(request, tmp_path_factory):
    overrides = dict(SHAPE, head_dim=128) if request.param == "qwen3" else SHAPE
    return int4_checkpoint(request.param, tmp_path_factory.mktemp(request.param), group_size=128,
                           dtype=torch.bfloat16, **overrides)


@pytest.mark.parametrize("preshuffle", [True, False])
def test_model_on_the_gpu_matches_transformers_on_dequantized_weights(checkpoint, preshuffle):
    reference, path = checkpoint
    loaded = load_model(path, device="cuda", preshuffle=preshuffle)
    expected = int4.LAYOUT_PRESHUFFLED if (preshuffle and SM90) else int4.LAYOUT_PLAIN
    assert loaded.layout == expected
    ids = torch.randint(0, 2048, (4, 33), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
    got = shardgen_logits(loaded.model, ids.cuda()).float().cpu()
    err = ((got - want).norm() / want.norm()).item()
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
    print(f"{path.name} layout={loaded.layout} logits rel err {err:.2e}, top-1 agreement {top1:.3f}, "
          f"load {loaded.load_s:.2f}s convert {loaded.convert_s:.3f}s")
    assert err < 3e-2 and top1 > 0.95


def test_greedy_through_the_paged_cache_on_the_gpu_agrees_with_transformers(checkpoint):
    reference, path = checkpoint
    model = load_model(path, device="cuda").model
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 2048, (n,), generator=gen).tolist() for n in (7, 20, 13, 31)]
    got = greedy_paged(model, prompts, new_tokens=16)
    same = total = 0
    for prompt, tokens in zip(prompts, got):
        with torch.no_grad():
            out = reference.generate(torch.tensor([prompt]), max_new_tokens=16, min_new_tokens=16,
                                     do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        # Count matching tokens up to the first divergence (after it, the contexts differ).
        n = next((i for i, (a, b) in enumerate(zip(tokens, out)) if a != b), len(out))
        same, total = same + n, total + len(out)
    print(f"{path.name}: greedy tokens identical before first divergence {same}/{total}")
    assert same / total > 0.5
