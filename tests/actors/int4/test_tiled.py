"""shardgen's Triton int4 kernels on the tiled layout, run on CPU by Triton's interpreter, in float32 (the
interpreter truncates where the GPU rounds to bf16); tests/actors/int4/test_tiled_cuda.py runs them compiled."""

import pytest
import torch

from shardgen.actors import int4
from tests.helpers import in_triton_interpreter


@pytest.mark.parametrize("shape,group_size", [((40, 256), 64), ((64, 512), 128), ((8, 1024), 256)])
def test_pack_tiled_keeps_every_nibble_scale_and_zero_point(shape, group_size):
    torch.manual_seed(0)
    plain = int4.quantize(torch.randn(shape), group_size)
    words, scale, zero = int4.pack_tiled(plain)
    assert words.dtype == torch.int32 and words.shape == (shape[1] // 8, shape[0]) and words.is_contiguous()
    assert torch.equal(int4.unpack_tiled(words), int4.unpack(plain.qdata))
    assert torch.equal(scale, plain.scale) and torch.equal(zero, plain.zero_point)


def test_pack_tiled_refuses_k_that_is_not_a_multiple_of_64():
    plain = int4.quantize(torch.randn(8, 96), 32)
    with pytest.raises(ValueError, match="multiple of 64"):
        int4.pack_tiled(plain)


def kernels_vs_reference() -> dict[str, float]:
    """Relative error of every kernel (gemv, dot, dequantize + matmul; with and without split-K) against the
    dequantized weight, float32 activations."""
    from shardgen.actors.int4 import tiled as K

    errors = {}
    for (n, k), g in (((40, 256), 64), ((72, 512), 128)):
        torch.manual_seed(n)
        plain = int4.quantize(torch.randn(n, k) * 0.02, g)
        words, scale, zero = int4.pack_tiled(plain)
        ref_w = int4.dequantize(plain, torch.float32)
        d = K.dequantize_into(words, scale, zero, g, torch.empty(k, n))
        errors[f"dequantize {n}x{k}"] = float((d - ref_w.t()).abs().max())
        for m in (1, 3, 20):
            x = torch.randn(m, k)
            want = x @ ref_w.t()
            for cfg in (K.KernelConfig("gemv", block_n=32, block_k=128, chunk=64, split_k=2),
                        K.KernelConfig("gemv", block_n=16, block_k=256, chunk=128),
                        K.KernelConfig("dot", block_m=16, block_n=32, block_k=128, split_k=2),
                        K.KernelConfig("dot", block_m=16, block_n=64, block_k=256),
                        K.KernelConfig("dotk", block_m=16, block_n=32, block_k=64, split_k=2),
                        K.KernelConfig("dotk", block_m=16, block_n=64, block_k=256),
                        K.KernelConfig("dott", block_m=16, block_n=32, block_k=64, split_k=2),
                        K.KernelConfig("dott", block_m=16, block_n=64, block_k=256), K.KernelConfig("dequant")):
                if cfg.fits(m, n, k):
                    got = K.linear(x, words, scale, zero, g, cfg, torch.empty(n * k))
                    errors[f"{cfg.name()} {n}x{k} M={m}"] = float((got - want).norm() / want.norm())
    return errors


def test_int4_kernels_match_the_dequantized_weight_in_triton_interpreter():
    pytest.importorskip("triton")
    errors = in_triton_interpreter("import json; from tests.actors.int4.test_tiled import kernels_vs_reference; "
                                   "print(json.dumps(kernels_vs_reference()))")
    print(errors)
    assert len(errors) == 2 * (1 + 9 + 9 + 7), errors  # per shape: dequantize, 9 configs at M=1 and 3, gemv not at M=20
    assert max(errors.values()) < 1e-5, errors


def tiled_model_vs_reference(tmp: str) -> dict:
    """A tiny Llama with int4 G=64 in the tiled layout, at TP=1 and TP=2, against transformers on the dequantized
    weights. Rows per linear: 26 (logits), 11 and 2 (two prompts, then their decode steps), 7 and 1 (one prompt):
    with kernel_choice.INTERPRETER_CONFIGS that is dequant, dotk, dot, dot and gemv."""
    from pathlib import Path

    from shardgen.actors.model.loader import load_model
    from tests.actors.model.test_tensor_parallel import IDS, PROMPTS, run_tp
    from tests.helpers import greedy_paged, hf_greedy, int4_checkpoint, shardgen_logits

    reference, path = int4_checkpoint("llama", Path(tmp), group_size=64)
    loaded = load_model(path, int4_layout=int4.LAYOUT_TILED)
    with torch.no_grad():
        want = reference(IDS).logits
    scale = want.abs().max()
    got = shardgen_logits(loaded.model, IDS)
    out = Path(tmp) / "tp2"
    out.mkdir()
    ranks = run_tp(path, 2, out, int4.LAYOUT_TILED)
    return {"layout": loaded.layout, "tp2_layouts": [r["layout"] for r in ranks],
            "rel_logits": float((got - want).abs().max() / scale),
            "argmax_equal": bool(torch.equal(got.argmax(-1), want.argmax(-1))),
            "greedy_equal": greedy_paged(loaded.model, PROMPTS, new_tokens=6)
            == [hf_greedy(reference, p, 6) for p in PROMPTS]
            and greedy_paged(loaded.model, PROMPTS[1:], new_tokens=6) == [hf_greedy(reference, PROMPTS[1], 6)],
            "tp2_rel_logits": max(float((r["logits"] - want).abs().max() / scale) for r in ranks),
            "tp2_greedy_equal": all(r["greedy"][0][:6] == hf_greedy(reference, PROMPTS[0], 6) for r in ranks)}


@pytest.mark.slow
def test_model_in_the_tiled_layout_matches_transformers_at_tp1_and_tp2_in_triton_interpreter(tmp_path):
    pytest.importorskip("triton")
    result = in_triton_interpreter("import json, sys; from tests.actors.int4.test_tiled import tiled_model_vs_reference; "
                                   "print(json.dumps(tiled_model_vs_reference(sys.argv[1])))", str(tmp_path))
    print(result)
    assert result["layout"] == int4.LAYOUT_TILED and result["tp2_layouts"] == [int4.LAYOUT_TILED] * 2
    assert result["rel_logits"] < 1e-4 and result["tp2_rel_logits"] < 1e-4, result
    assert result["argmax_equal"] and result["greedy_equal"] and result["tp2_greedy_equal"], result


def test_tiled_layout_is_refused_on_the_cpu_without_triton_interpreter():
    with pytest.raises(ValueError, match="runs on CUDA GPUs"):
        int4.hardware_layout("cpu", int4.LAYOUT_PRESHUFFLED)
    if not int4_kernels_interpreting():
        with pytest.raises(ValueError, match="runs on CUDA GPUs"):
            int4.hardware_layout("cpu", int4.LAYOUT_TILED)
    assert int4.hardware_layout("cpu") == int4.LAYOUT_CPU
    with pytest.raises(ValueError, match="is not one of"):
        int4.hardware_layout("cpu", "int4-fast")


def int4_kernels_interpreting() -> bool:
    from shardgen.actors.int4 import tiled

    return tiled.interpreting()
