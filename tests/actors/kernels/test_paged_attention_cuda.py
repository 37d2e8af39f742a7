"""The Triton paged-attention kernel compiled for the GPU, against the PyTorch attention path (float32 on CPU).

Same cases as the interpreter test (tests/actors/kernels/test_paged_attention.py), plus an 8B-shaped decode batch.
bf16 inputs with float32 accumulation: errors of a few 1e-3 of the largest output are rounding; a wrong
block, mask or head mapping gives errors of order 1.
"""

import pytest
import torch

from tests.actors.kernels.test_paged_attention import (
    CASES,
    _torch_path_on_cpu,
    cache_to,
    kernel_vs_reference,
    make_case,
    new_keys_as_stored,
    write_new_keys,
)

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytest.importorskip("triton")


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_kernel_matches_the_pytorch_path_in_bfloat16(name):
    err = kernel_vs_reference(name, torch.bfloat16, "cuda")
    print(f"{name}: max error {err:.2e} of the largest output")
    assert err < 2e-2


@pytest.mark.parametrize("name", list(CASES))
def test_compiled_kernel_matches_the_pytorch_path_in_float32(name):
    assert kernel_vs_reference(name, torch.float32, "cuda") < 1e-4


needs_fp8 = pytest.mark.skipif(torch.cuda.get_device_capability() < (8, 9), reason="fp8 needs compute capability 8.9+")


@needs_fp8
@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("by_parts", [False, True])
def test_compiled_kernel_reads_an_fp8_cache_as_the_pytorch_path_dequantizes_it(name, by_parts):
    err = kernel_vs_reference(name, torch.bfloat16, "cuda", by_parts=by_parts, kv_cache_dtype="fp8")
    print(f"{name}: max error {err:.2e} of the largest output")
    assert err < 2e-2


@pytest.mark.parametrize("kv_cache_dtype", ["auto", pytest.param("fp8", marks=needs_fp8)])
def test_llama8b_shaped_decode_batch(kv_cache_dtype):
    from shardgen.actors.kernels.paged_attention import paged_attention

    ctx = torch.randint(1, 2100, (128,), generator=torch.Generator().manual_seed(3)).tolist()
    q, k, v, cache, meta = make_case([1] * 128, ctx, 32, 8, 128, torch.bfloat16, "cuda", kv_cache_dtype=kv_cache_dtype)
    before = cache_to(cache, "cpu")
    write_new_keys(k, v, cache, meta.slot_mapping)
    ref = _torch_path_on_cpu(q, *(new_keys_as_stored(cache, meta.slot_mapping) if cache.quantized else (k, v)),
                             before, meta, 128 ** -0.5, None)
    out = paged_attention(q, cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, 1, 128 ** -0.5)
    err = ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        paged_attention(q, cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, 1, 128 ** -0.5)
    stop.record()
    torch.cuda.synchronize()
    us = start.elapsed_time(stop) / 20 * 1000
    kv_bytes = sum(ctx) * 8 * 2 * (128 * cache.k.element_size() + (4 if cache.quantized else 0))
    print(f"8B decode, 128 seqs, {sum(ctx)} cached tokens, {kv_cache_dtype} cache: max error {err:.2e}; {us:.0f} us "
          f"per layer, {kv_bytes / us / 1e3:.0f} GB/s of KV read")
    assert err < 2e-2



def test_few_long_decode_sequences_split_their_keys_across_programs():
    """32 sequences x 2 KV heads (a 70B rank at T=4) are fewer programs than the GPU has SMs: their keys are split
    (decode_splits) and the partial softmaxes combined; the result must not change."""
    from shardgen.actors.kernels.paged_attention import decode_splits, paged_attention

    ctx = torch.randint(3000, 4200, (32,), generator=torch.Generator().manual_seed(5)).tolist()
    q, k, v, cache, meta = make_case([1] * 32, ctx, 16, 2, 128, torch.bfloat16, "cuda")
    ref = _torch_path_on_cpu(q, k, v, cache, meta, 128 ** -0.5, None)
    write_new_keys(k, v, cache, meta.slot_mapping)
    splits = decode_splits(32, 2, q.device)
    assert splits > 1
    for n in (1, splits):
        out = paged_attention(q, cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables, 1, 128 ** -0.5,
                              splits=n)
        err = ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()
        print(f"32 x ~3,600-token decode, {n} split(s): max error {err:.2e}")
        assert err < 2e-2
