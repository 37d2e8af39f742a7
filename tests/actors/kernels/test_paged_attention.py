"""The Triton paged-attention kernel against the PyTorch attention path, run on CPU by Triton's interpreter.

The same cases run compiled on the GPU in tests/actors/kernels/test_paged_attention_cuda.py.
"""

import pytest
import torch

from benchmarks.synthetic import cache_to, make_case
from shardgen.actors.model.attention import AttentionMetadata, attention
from shardgen.actors.kernels.kv_cache import LayerCache
from tests.helpers import in_triton_interpreter

pytest.importorskip("triton")

# (new tokens per sequence, context per sequence, query heads, kv heads, head_dim, sliding window)
CASES = {
    "decode, GQA 4": ([1, 1, 1, 1], [5, 40, 17, 129], 8, 2, 32, None),
    "prefill, MHA": ([7, 30], [7, 30], 4, 4, 16, None),
    "chunked prefill continuing a cached context": ([20], [80], 6, 2, 24, None),
    "mixed decode and prefill chunks, GQA 3": ([33, 1, 5, 1], [50, 70, 5, 2], 6, 2, 32, None),
    "MQA with a sliding window": ([33, 1], [50, 70], 8, 1, 32, 10),
    "long prefill, several query tiles": ([150], [150], 2, 1, 16, None),
    "scheduler order: decode rows, a chunk over cached tokens, whole prompts": (
        [1, 1, 1, 20, 7, 33], [30, 5, 64, 80, 7, 33], 8, 2, 32, None),
    "decode over long contexts": ([1, 1], [700, 1000], 4, 2, 16, None),
    "decode with a sliding window over a long context": ([1, 1, 1], [900, 50, 7], 4, 1, 16, 300),
    "scheduler order, enough decode rows for a launch of their own": (
        [1] * 33 + [6, 9], [3 + 2 * i for i in range(33)] + [12, 9], 4, 2, 16, None),
}

DECODE_CASES = [name for name, case in CASES.items() if set(case[0]) == {1}]


def write_new_keys(k: torch.Tensor, v: torch.Tensor, cache: LayerCache, slots: torch.Tensor) -> None:
    """What the engine's store does before attention, in PyTorch (the Triton store has its own test)."""
    from shardgen.actors.kernels.fused_ops import _store_kv_torch

    _store_kv_torch(k, v, cache, slots)


def kernel_vs_reference(name: str, dtype: torch.dtype, device: str = "cpu", by_parts: bool = False,
                        splits: int | None = None, kv_cache_dtype: str = "auto") -> float:
    """Largest |kernel - reference| over the case's outputs, relative to the largest reference value. ``by_parts``:
    through ``attention_by_parts``, one launch per kind of sequence (on a CPU, or in float32, paged launches only).
    ``splits``: a decode case's keys split that many ways per sequence. ``kv_cache_dtype="fp8"``: both read the same
    fp8 cache, the reference dequantizing it in float32."""
    from shardgen.actors.model.attention import StepParts, attention_by_parts
    from shardgen.actors.kernels.prefill_attention import flash_supports
    from shardgen.actors.kernels.paged_attention import paged_attention

    q_lens, ctx_lens, hq, hkv, d, window = CASES[name]
    q, k, v, cache, meta = make_case(q_lens, ctx_lens, hq, hkv, d, dtype, device, kv_cache_dtype=kv_cache_dtype)
    scale = d ** -0.5
    before = cache_to(cache, "cpu")
    write_new_keys(k, v, cache, meta.slot_mapping)  # the kernel reads the new keys from the cache
    # An fp8 reference re-quantizes the stored keys, to the same fp8 values (CPU and GPU round some ties apart).
    k_ref, v_ref = new_keys_as_stored(cache, meta.slot_mapping) if cache.quantized else (k, v)
    ref = _torch_path_on_cpu(q, k_ref, v_ref, before, meta, scale, window)
    if by_parts:
        parts = StepParts.of(q_lens, [c - n for n, c in zip(q_lens, ctx_lens)])
        meta = AttentionMetadata(meta.cu_seqlens_q, meta.context_lens, meta.max_q_len, meta.max_context_len,
                                 meta.slot_mapping, meta.block_tables, parts)
        out = attention_by_parts(q, k, v, cache, meta, scale, window)
        if cache.quantized and parts.uncached < len(q_lens) and flash_supports(q):
            # Sequences with nothing cached went through FlashAttention on their own unquantized keys.
            exact = _torch_path_on_cpu(q, k, v, None, meta, scale, window)  # each on its own keys only
            ref[parts.uncached_row:] = exact[parts.uncached_row:]
    else:
        out = paged_attention(q, cache, meta.cu_seqlens_q, meta.context_lens, meta.block_tables,
                              meta.max_q_len, scale, window, splits=splits)
    return float((out.float().cpu() - ref.cpu()).abs().max() / ref.abs().max())


def new_keys_as_stored(cache: LayerCache, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The new keys and values dequantized from an fp8 cache, in float32."""
    rows = lambda t: t.view(-1, *t.shape[2:])[slots].float()  # noqa: E731
    return rows(cache.k) * rows(cache.k_scale)[..., None], rows(cache.v) * rows(cache.v_scale)[..., None]


def _torch_path_on_cpu(q, k, v, cache, meta, scale, window) -> torch.Tensor:
    cpu = lambda x: x.float().cpu().clone()  # noqa: E731
    m = AttentionMetadata(meta.cu_seqlens_q.cpu(), meta.context_lens.cpu(), meta.max_q_len, meta.max_context_len,
                          meta.slot_mapping.cpu(), meta.block_tables.cpu())
    cache = cache_to(cache, "cpu", float32=True) if cache is not None else None  # a copy: attention stores into it
    return attention(cpu(q), cpu(k), cpu(v), m, scale, cache, window)


def _interpret(dtype: str) -> dict[str, float]:
    """Run every case in a child process with TRITON_INTERPRET=1 (read when Triton's kernels are defined)."""
    code = ("import json, torch; from tests.actors.kernels.test_paged_attention import CASES, DECODE_CASES, kernel_vs_reference; "
            f"e = {{n + by: kernel_vs_reference(n, torch.{dtype}, by_parts=bool(by)) "
            f"for n in CASES for by in ('', ' (by parts)')}}; "
            f"e.update({{n + ' (4 splits)': kernel_vs_reference(n, torch.{dtype}, splits=4) for n in DECODE_CASES}}); "
            f"e.update({{n + ' (fp8 cache)': kernel_vs_reference(n, torch.{dtype}, kv_cache_dtype='fp8') for n in CASES}}); "
            f"e.update({{n + ' (fp8 cache, 4 splits)': kernel_vs_reference(n, torch.{dtype}, splits=4, kv_cache_dtype='fp8') "
            f"for n in DECODE_CASES}}); "
            f"print(json.dumps(e))")
    return in_triton_interpreter(code, timeout=600)


@pytest.fixture(scope="module")
def float32_errors() -> dict[str, float]:
    return _interpret("float32")


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_the_pytorch_path_in_float32(float32_errors, name):
    assert float32_errors[name] < 1e-5, float32_errors


@pytest.mark.parametrize("name", DECODE_CASES)
def test_decode_with_keys_split_across_programs_matches_the_pytorch_path(float32_errors, name):
    assert float32_errors[name + " (4 splits)"] < 1e-5, float32_errors


@pytest.mark.parametrize("name", list(CASES))
def test_one_launch_per_kind_of_sequence_matches_the_pytorch_path(float32_errors, name):
    assert float32_errors[name + " (by parts)"] < 1e-5, float32_errors


@pytest.mark.parametrize("name", list(CASES))
def test_kernel_reads_an_fp8_cache_as_the_pytorch_path_dequantizes_it(float32_errors, name):
    assert float32_errors[name + " (fp8 cache)"] < 1e-5, float32_errors


@pytest.mark.parametrize("name", DECODE_CASES)
def test_split_decode_reads_an_fp8_cache_as_the_pytorch_path_dequantizes_it(float32_errors, name):
    assert float32_errors[name + " (fp8 cache, 4 splits)"] < 1e-5, float32_errors


def test_a_step_splits_into_decode_rows_chunks_and_uncached_sequences():
    from shardgen.actors.model.attention import StepParts

    # q_lens, cached tokens -> (decode, uncached, uncached_row, middle_max_q, uncached_lens)
    assert StepParts.of([1, 1, 20, 7, 9], [30, 5, 60, 0, 0]) == StepParts(2, 3, 22, 20, (7, 9))
    assert StepParts.of([1, 1], [3, 4]) == StepParts(2, 2, 2, 0, ())  # decode only
    assert StepParts.of([4096, 4096], [0, 0]) == StepParts(0, 0, 0, 0, (4096, 4096))  # whole prompts only
    assert StepParts.of([1, 5], [0, 0]) == StepParts(1, 1, 1, 0, (5,))  # a one-token prompt leads: a decode row
    # not in scheduler order: everything between the decode rows and the uncached tail is the middle part
    assert StepParts.of([3, 1, 8], [0, 9, 0]) == StepParts(0, 2, 4, 3, (8,))
    assert StepParts.of([1, 1, 20, 7, 9], [30, 5, 60, 0, 0]).uncached_max_q == 9


def test_kernel_matches_the_pytorch_path_in_float16():
    errors = _interpret("float16")
    # float16 inputs, float32 accumulation; the reference computes in float32 from the same inputs.
    assert max(errors.values()) < 2e-3, errors


def test_reference_notices_a_wrong_block_table():
    """The comparison is sensitive: a table entry pointing at another sequence's block changes the output."""
    q, k, v, cache, meta = make_case([1, 1], [40, 40], 4, 2, 16, torch.float32)
    right = attention(q, k, v, meta, 0.25, cache_to(cache, "cpu"))
    swapped = meta.block_tables.clone()
    swapped[0, 0] = swapped[1, 0]
    wrong_meta = AttentionMetadata(meta.cu_seqlens_q, meta.context_lens, 1, 40, meta.slot_mapping, swapped)
    wrong = attention(q, k, v, wrong_meta, 0.25, cache_to(cache, "cpu"))
    assert (right - wrong).abs().max() > 1e-2
