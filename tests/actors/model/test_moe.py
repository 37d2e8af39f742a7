"""A mixture's experts: grouped into one GEMM a projection after loading, they compute what the experts run one by
one compute (the model's logits against transformers: test_model.py; TP: test_tensor_parallel.py)."""

import pytest
import torch

from shardgen.actors import int4
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.distributed import SINGLE
from shardgen.actors.model.loader import load_model
from shardgen.actors.model.moe import SparseMoE
from tests.helpers import int4_checkpoint


def random_block(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str = "cpu") -> SparseMoE:
    """A float SparseMoE of ``config``, its experts separate, with random weights (the same for the same config)."""
    block = SparseMoE(config, "model.layers.0.mlp", {}, SINGLE, dtype, device)
    g = torch.Generator(device=device).manual_seed(0)
    for p in block.parameters():
        p.data.normal_(0, 0.2, generator=g)
    return block


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_grouped_experts_compute_what_the_experts_one_by_one_compute(family, tmp_path):
    config = load_model(int4_checkpoint(family, tmp_path)[1]).config
    block = random_block(config)
    # Enough tokens that some experts get none and some get many; a single token too.
    for tokens in (1, 3, 40):
        x = torch.randn(tokens, block.gate.weight.shape[1], generator=torch.Generator().manual_seed(tokens))
        with torch.no_grad():
            want = block(x)
        grouped = random_block(config)
        assert int4.convert_module_weights(grouped, int4.LAYOUT_DENSE, torch.float32) == 0  # float: none converted
        assert grouped.grouped is not None and not hasattr(grouped, "experts")
        with torch.no_grad():
            got = grouped(x)
        assert ((got - want).abs().max() / want.abs().max()).item() < 1e-6, tokens


def test_a_loaded_int4_mixture_runs_its_experts_grouped_on_the_cpu(tmp_path):
    loaded = load_model(int4_checkpoint("mixtral", tmp_path)[1])
    blocks = [m for m in loaded.model.modules() if isinstance(m, SparseMoE)]
    assert blocks and all(b.grouped is not None for b in blocks)
    experts = loaded.config.moe.num_experts
    # Every expert's two int4 weights (gate and up merged, down) count as converted: dequantized into the stack.
    assert loaded.int4_weights >= len(blocks) * experts * 2
    assert blocks[0].grouped["gate_up"].weight.shape[0] == experts


def test_each_layers_experts_are_freed_once_grouped_before_the_next_layer_is_grouped(tmp_path, monkeypatch):
    """Grouping stacks a layer's experts into a copy: the separate weights must go before the next layer's copy is
    made, or the whole model is held twice at the end (a bf16 Qwen3-30B-A3B did not fit an H100 so)."""
    import weakref

    from shardgen.actors.int4 import experts

    config = load_model(int4_checkpoint("qwen3_moe", tmp_path)[1]).config
    layers = torch.nn.ModuleList([random_block(config), random_block(config), random_block(config)])
    alive = [[weakref.ref(e.down_proj.weight) for e in block.experts] for block in layers]
    real, calls = experts.group_experts, []

    def checked(weights, *args, **kwargs):  # no gc.collect() here: what grouping itself frees
        layer = len(calls) // 2  # two projections a layer
        assert all(r() is None for earlier in alive[:layer] for r in earlier), f"layer {layer}: earlier experts alive"
        calls.append(layer)
        return real(weights, *args, **kwargs)

    monkeypatch.setattr(experts, "group_experts", checked)
    int4.convert_module_weights(layers, int4.LAYOUT_DENSE, torch.float32)
    assert calls == [0, 0, 1, 1, 2, 2]
