"""Tensor parallelism for real on CPU: T processes joined through gloo, each loading only its slice from disk.

Tolerance: TP changes only the order of float32 sums (partial products
all-reduced), so logits agree with TP=1 to ~1e-6 of their scale; we allow 1e-5.
"""

import traceback
from pathlib import Path

import pytest
import torch

from shardgen.actors import int4
from shardgen.actors.model.distributed import destroy_tp_group, free_port, init_tp_group
from shardgen.actors.model.loader import load_model
from tests.helpers import greedy_paged, int4_checkpoint, run_ranks, shardgen_logits

IDS = torch.randint(0, 301, (2, 13), generator=torch.Generator().manual_seed(11))
PROMPTS = [[5, 17, 42, 7], [100, 3, 250, 9, 18, 77, 1]]


def parameter_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape; a mixture's grouped experts (stacked (E, N, K)) as each expert's weight would be."""
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    for name, module in model.named_modules():
        for proj, grouped in (getattr(module, "grouped", None) or {}).items():
            for e, w in enumerate(grouped.weight):
                shapes[f"{name}.experts.{e}.{proj}_proj.weight"] = tuple(w.shape)
    return shapes


def _rank_main(rank: int, world: int, port: int, path: str, out: str, int4_layout: str = "auto") -> None:
    try:
        tp = init_tp_group(rank, world, f"127.0.0.1:{port}", "cpu", timeout_s=120)
        loaded = load_model(path, tp, int4_layout=int4_layout)
        model = loaded.model
        shapes = parameter_shapes(model)
        result = {
            "logits": shardgen_logits(model, IDS),
            "greedy": greedy_paged(model, PROMPTS, new_tokens=8),
            "greedy_fp8_kv": greedy_paged(model, PROMPTS, new_tokens=8, kv_cache_dtype="fp8"),
            "shapes": shapes,
            "layout": loaded.layout,
        }
        torch.save(result, Path(out) / f"rank{rank}.pt")
        destroy_tp_group()
    except BaseException:
        (Path(out) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


def run_tp(path: Path, world: int, out: Path, int4_layout: str = "auto") -> list[dict]:
    run_ranks(_rank_main, world, out, world, free_port(), str(path), str(out), int4_layout)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


CASES = [
    ("llama", 2, {}),  # vocab 301 is odd: padded vocab shards
    ("qwen2", 2, {}),  # q/k/v bias
    ("qwen3", 2, {"tie_word_embeddings": True}),  # q/k norm, tied head over vocab shards
    ("llama", 4, {"num_key_value_heads": 4}),
    ("opt", 2, {"tie_word_embeddings": True}),  # biases everywhere, learned positions, LayerNorm, ReLU
    ("phi3", 2, {}),  # q/k/v and gate/up fused in the checkpoint: each part sliced per rank
    ("gemma3", 2, {"tie_word_embeddings": True}),  # local and global layers, (1 + w) norms, soft-capped logits
    ("qwen3_moe", 2, {}),  # each expert split like the MLP, its sum reduced once; a dense layer beside
    ("mixtral", 2, {}),
]
# (qkv, o, gate_up, down) of layer 0 in each family's module names
SHARDED = {"opt": ("self_attn.qkv_proj", "self_attn.out_proj", "fc1", "fc2"),
           "qwen3_moe": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.experts.3.gate_up_proj", "mlp.experts.3.down_proj"),
           "mixtral": ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.experts.3.gate_up_proj", "mlp.experts.3.down_proj")}
LLAMA_SHARDED = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")


@pytest.mark.slow
@pytest.mark.parametrize("family,world,overrides", CASES, ids=[f"{f}-tp{w}" for f, w, _ in CASES])
def test_tp_logits_and_greedy_tokens_equal_tp1(tmp_path, family, world, overrides):
    reference, path = int4_checkpoint(family, tmp_path, **overrides)
    single = load_model(path).model
    want_logits = shardgen_logits(single, IDS)
    want_greedy = greedy_paged(single, PROMPTS, new_tokens=8)
    want_greedy_fp8 = greedy_paged(single, PROMPTS, new_tokens=8, kv_cache_dtype="fp8")
    with torch.no_grad():
        hf_logits = reference(IDS).logits
    out = tmp_path / "out"
    out.mkdir()
    ranks = run_tp(path, world, out)
    scale = want_logits.abs().max()
    for rank, r in enumerate(ranks):
        assert r["layout"] == int4.LAYOUT_CPU
        assert ((r["logits"] - want_logits).abs().max() / scale).item() < 1e-5, f"rank {rank}"
        assert ((r["logits"] - hf_logits).abs().max() / scale).item() < 1e-4, f"rank {rank} vs transformers"
        assert r["greedy"] == want_greedy
        assert r["greedy_fp8_kv"] == want_greedy_fp8  # each rank's heads scaled as at TP=1
    # Each rank holds exactly its 1/T slice of every sharded parameter.
    full = parameter_shapes(single)
    shapes = ranks[0]["shapes"]
    qkv, o, gate_up, down = (f"model.layers.0.{m}.weight" for m in SHARDED.get(family, LLAMA_SHARDED))
    assert shapes[qkv][0] * world == full[qkv][0] and shapes[gate_up][0] * world == full[gate_up][0]
    assert shapes[o][1] * world == full[o][1] and shapes[down][1] * world == full[down][1]
    assert shapes["model.embed_tokens.weight"][0] == -(-301 // world)
