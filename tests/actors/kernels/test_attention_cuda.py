"""GPU attention by parts (``attention_by_parts``): decode rows and chunks over cached tokens through the paged
kernel, sequences with nothing cached through FlashAttention's varlen kernel (and cuDNN's for long prompts on
Hopper), each against the PyTorch attention path (float32 on CPU); the cache is still written for the decode steps that follow.

bf16 inputs: errors of a few 1e-3 of the largest output are rounding; a wrong mask, window, head mapping or part
boundary gives errors of order 1.
"""

import pytest
import torch

from shardgen.actors.model.attention import AttentionMetadata, StepParts, attention
from shardgen.actors.kernels.prefill_attention import cudnn_supports, flash_supports, prefill_attention, plan_launches
from tests.actors.kernels.test_paged_attention import CASES, _torch_path_on_cpu, kernel_vs_reference, make_case

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")

STEP_CASES = {  # new tokens, context, query heads, KV heads, head dim, sliding window
    "whole prompts, GQA, mixed lengths": ([1, 7, 300, 1029], [1, 7, 300, 1029], 32, 8, 128, None),
    "two 4096-token prompts": ([4096, 4096], [4096, 4096], 32, 8, 128, None),
    "whole prompts, MHA, head dim 64": ([17, 64, 129], [17, 64, 129], 8, 8, 64, None),
    "whole prompts, sliding window": ([5, 200, 700], [5, 200, 700], 16, 4, 128, 50),
    "decode rows, a chunk, whole prompts": ([1] * 40 + [300, 500, 77], list(range(20, 2020, 50)) + [900, 500, 77],
                                           32, 8, 128, None),
    "decode rows, a chunk, whole prompts, sliding window": ([1, 1, 64, 90, 3], [70, 9, 128, 90, 3], 16, 4, 128, 32),
    # cuDNN on Hopper: 1,500 runs over 1,536 rows of the step, 2,048 exactly, the last (1,300) over zero padding
    "long prompts, a short one between": ([1500, 40, 2048, 1300], [1500, 40, 2048, 1300], 32, 8, 128, None),
    "decode rows, a chunk, a long prompt, a short one": ([1] * 40 + [300, 1500, 77],
                                                         list(range(20, 2020, 50)) + [900, 1500, 77], 32, 8, 128, None),
    "long prompts, 16/4 heads (a TP=2 rank)": ([1300, 2100], [1300, 2100], 16, 4, 128, None),
    "long prompts, MHA, head dim 64": ([1400, 30, 1281], [1400, 30, 1281], 8, 8, 64, None),
}


def by_parts(meta: AttentionMetadata, q_lens: list[int], ctx: list[int]) -> AttentionMetadata:
    parts = StepParts.of(q_lens, [c - n for n, c in zip(q_lens, ctx)])
    return AttentionMetadata(meta.cu_seqlens_q, meta.context_lens, meta.max_q_len, meta.max_context_len,
                             meta.slot_mapping, meta.block_tables, parts)


@pytest.mark.parametrize("name", list(STEP_CASES))
def test_a_step_attended_by_parts_matches_the_pytorch_path(name):
    q_lens, ctx, hq, hkv, d, window = STEP_CASES[name]
    q, k, v, cache, meta = make_case(q_lens, ctx, hq, hkv, d, torch.bfloat16, "cuda")
    assert flash_supports(q), "this torch build has no FlashAttention varlen kernel for bf16 on this GPU"
    ref = _torch_path_on_cpu(q, k, v, cache, meta, d ** -0.5, window)
    out = attention(q, k, v, by_parts(meta, q_lens, ctx), d ** -0.5, cache, window)
    err = float((out.float().cpu() - ref).abs().max() / ref.abs().max())
    print(f"{name}: max error {err:.2e} of the largest output")
    assert err < 2e-2
    # The decode steps that follow read these sequences' keys and values from the cache.
    assert torch.equal(cache.k.view(-1, hkv, d)[meta.slot_mapping], k)
    assert torch.equal(cache.v.view(-1, hkv, d)[meta.slot_mapping], v)


@pytest.mark.parametrize("name", list(CASES))
def test_the_interpreter_cases_by_parts_compiled(name):
    assert kernel_vs_reference(name, torch.bfloat16, "cuda", by_parts=True) < 2e-2
    assert kernel_vs_reference(name, torch.float32, "cuda", by_parts=True) < 1e-4  # paged launches only


def test_float32_takes_the_paged_kernel_for_whole_prompts_too():
    lens = [3, 90]
    q, k, v, cache, meta = make_case(lens, lens, 8, 2, 64, torch.float32, "cuda")
    assert not flash_supports(q)
    ref = _torch_path_on_cpu(q, k, v, cache, meta, 0.125, None)
    out = attention(q, k, v, by_parts(meta, lens, lens), 0.125, cache)
    assert float((out.cpu() - ref).abs().max() / ref.abs().max()) < 1e-4


def test_long_prompts_from_one_fused_qkv_output_match_the_pytorch_path():
    # As in the model: q, k and v are strided views of one projection output, q from row 0 of the uncached part.
    lens, hq, hkv, d = [1300, 9, 2500], 32, 8, 128
    torch.manual_seed(0)
    qkv = torch.randn(sum(lens), (hq + 2 * hkv) * d, device="cuda", dtype=torch.bfloat16)
    q, k, v = (t.unflatten(-1, (-1, d)) for t in qkv.split([hq * d, hkv * d, hkv * d], dim=-1))
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper: long prompts must take cuDNN, not fall back silently
        assert cudnn_supports(q, None), "this torch's cuDNN backend refused grouped-query attention"
        assert [launch.kernel for launch in plan_launches(lens, True)] == ["cudnn", "flash", "cudnn"]
    meta = AttentionMetadata.prefill(lens, "cuda")
    out = prefill_attention(q, k, v, meta.cu_seqlens_q, tuple(lens), d ** -0.5)
    ref = attention(q.float().cpu(), k.float().cpu(), v.float().cpu(), AttentionMetadata.prefill(lens), d ** -0.5)
    err = float((out.float().cpu() - ref).abs().max() / ref.abs().max())
    print(f"fused q/k/v views, {lens}: max error {err:.2e} of the largest output")
    assert err < 2e-2
