"""config.json of each family read as transformers reads it (hf_config.py), and what is refused, naming the key."""

import json
import math

import pytest
import torch

from shardgen.actors.model.config import ModelConfig, QuantConfig
from shardgen.actors.model.layers import rope_inv_freq
from tests.helpers import LLAMA_CONFIG, llama_config


def test_transformers4_and_transformers5_rope_keys_give_the_same_config():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192}
    v4 = llama_config(rope_theta=500000.0, rope_scaling=llama3)
    v5 = llama_config(rope_parameters={**llama3, "rope_theta": 500000.0})
    assert v4.rope == v5.rope and v4.rope.rope_type == "llama3" and v4.rope.theta == 500000.0


def test_llama3_inverse_frequencies_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    hf = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_parameters=rope)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    got = rope_inv_freq(128, llama_config(rope_parameters=rope).rope)
    assert torch.equal(got, want)


def test_architecture_outside_the_supported_list_names_the_supported_ones():
    with pytest.raises(ValueError, match="not supported.*LlamaForCausalLM.*Qwen3ForCausalLM"):
        llama_config(architectures=["GPT2LMHeadModel"])


def test_missing_key_is_named():
    raw = dict(LLAMA_CONFIG)
    del raw["intermediate_size"]
    with pytest.raises(ValueError, match="'intermediate_size' is missing"):
        ModelConfig.from_dict(raw)


def test_unsupported_rope_type_is_refused():
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        llama_config(rope_scaling={"rope_type": "yarn", "factor": 4.0})


def test_quantization_config_round_trips_transformers_layout():
    c = llama_config(quantization_config=QuantConfig(64).to_hf_dict())
    assert c.quant == QuantConfig(64)


def test_transformers_own_torchao_config_is_understood():
    from torchao.quantization import Int4WeightOnlyConfig
    from transformers import TorchAoConfig

    qc = TorchAoConfig(Int4WeightOnlyConfig(group_size=128, int4_packing_format="plain")).to_dict()
    assert llama_config(quantization_config=qc).quant == QuantConfig(128)


@pytest.mark.parametrize(
    "qc,match",
    [
        ({"quant_method": "gptq"}, "quant_method is 'gptq'"),
        ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Float8WeightOnlyConfig"}}}, "not Int4WeightOnlyConfig"),
        ({"quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig",
                                                                 "_data": {"int4_packing_format": "preshuffled"}}}}, "'plain'"),
    ],
)
def test_non_plain_int4_quantization_is_refused(qc, match):
    with pytest.raises(ValueError, match=match):
        llama_config(quantization_config=qc)


def test_qwen2_has_qkv_bias_and_qwen3_has_qk_norm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA_CONFIG, "architectures": ["Qwen2ForCausalLM"]}))
    assert ModelConfig.from_dir(tmp_path).attention_bias
    assert llama_config(architectures=["Qwen3ForCausalLM"], head_dim=128).qk_norm


def test_opt_125m_config_reads_with_transformers_defaults_and_its_tp_rule_names_the_valid_degrees():
    from transformers import OPTConfig

    raw = {**OPTConfig(hidden_size=768, num_attention_heads=12, ffn_dim=3072, num_hidden_layers=12,
                       word_embed_proj_dim=768).to_dict(), "architectures": ["OPTForCausalLM"],
           "quantization_config": QuantConfig(128).to_hf_dict()}
    c = ModelConfig.from_dict(raw)
    assert (c.family, c.intermediate_size, c.num_kv_heads, c.head_dim, c.tie_word_embeddings) == ("opt", 3072, 12, 64, True)
    assert c.opt.layer_norm_before and c.opt.final_layer_norm and c.opt.word_embed_proj_dim is None
    assert c.checkpoint_prefix == "model.decoder." and c.embed_dim == 768
    # out_proj's K of 768 splits into 192 columns at tp 4: not a multiple of G = 128
    with pytest.raises(ValueError, match=r"out_proj: .*Valid `tp` for this model: \[1, 2, 3, 6\]"):
        c.check_tp(4)
    narrow = ModelConfig.from_dict({**raw, "hidden_size": 1024, "num_attention_heads": 16, "ffn_dim": 4096,
                                    "word_embed_proj_dim": 512, "do_layer_norm_before": False})
    assert narrow.embed_dim == 512 and not narrow.opt.final_layer_norm


@pytest.mark.parametrize("key,value,match", [("activation_function", "gelu", "activation_function 'gelu'"),
                                             ("enable_bias", False, "enable_bias and layer_norm_elementwise_affine")])
def test_opt_variants_shardgen_does_not_run_are_refused_naming_the_key(key, value, match):
    raw = {"architectures": ["OPTForCausalLM"], "vocab_size": 1000, "hidden_size": 256, "ffn_dim": 512,
           "num_hidden_layers": 2, "num_attention_heads": 4, key: value}
    with pytest.raises(ValueError, match=match):
        ModelConfig.from_dict(raw)


def test_phi3_longrope_and_partial_rotary_read_as_transformers_does_and_wrong_lengths_are_refused():
    phi = {**LLAMA_CONFIG, "architectures": ["Phi3ForCausalLM"], "num_key_value_heads": 8, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096}
    su = llama_config(**phi, rope_scaling={"type": "su", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32})
    assert su.family == "phi3" and su.rope.rope_type == "longrope" and su.rope.factor == 32.0
    assert su.rope.attention_factor == pytest.approx((1 + math.log(32) / math.log(4096)) ** 0.5)
    with pytest.raises(ValueError, match="need rotary_dim / 2 = 32 values each; they have 3 and 32"):
        llama_config(**phi, rope_scaling={"type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 32})
    mini = llama_config(**phi, partial_rotary_factor=0.75,  # Phi-4-mini: 48 of 64 features rotate, 24 frequencies
                        rope_scaling={"type": "longrope", "short_factor": [1.0] * 24, "long_factor": [2.0] * 24})
    assert mini.rope.rotary_dim(mini.head_dim) == 48
    with pytest.raises(ValueError, match="partial_rotary_factor 1.5 is not in"):
        llama_config(**phi, partial_rotary_factor=1.5)


def test_gemma3_config_as_google_publishes_it_reads_like_transformers_5s():
    published = {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144, "hidden_size": 1152,
                 "intermediate_size": 6912, "num_hidden_layers": 26, "num_attention_heads": 4, "num_key_value_heads": 1,
                 "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 512, "sliding_window_pattern": 6,
                 "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
                 "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "hidden_activation": "gelu_pytorch_tanh"}
    c = ModelConfig.from_dict(published)
    assert c.family == "gemma3" and c.hidden_act == "gelu_pytorch_tanh" and c.tie_word_embeddings
    assert c.gemma.sliding == tuple((i + 1) % 6 != 0 for i in range(26)) and c.gemma.sliding_window == 512
    assert (c.rope.theta, c.rope.rope_type, c.rope.factor) == (1e6, "linear", 8.0)
    assert (c.gemma.local_rope.theta, c.gemma.local_rope.rope_type) == (1e4, "default")
    from transformers import Gemma3TextConfig

    v5 = {**Gemma3TextConfig(**{k: v for k, v in published.items() if k != "architectures"}).to_dict(),
          "architectures": ["Gemma3ForCausalLM"]}
    assert ModelConfig.from_dict(v5).gemma == c.gemma and ModelConfig.from_dict(v5).rope == c.rope
    with pytest.raises(ValueError, match="attn_logit_softcapping is set"):
        ModelConfig.from_dict({**published, "attn_logit_softcapping": 50.0})
    with pytest.raises(ValueError, match="architecture.*Gemma3ForConditionalGeneration.*not supported"):
        ModelConfig.from_dict({**published, "architectures": ["Gemma3ForConditionalGeneration"]})


QWEN3_30B_A3B = {"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 151936, "hidden_size": 2048,
                 "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
                 "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128,
                 "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                 "quantization_config": QuantConfig(128).to_hf_dict()}


def test_qwen3_moe_config_reads_its_experts_and_its_tp_rule_counts_each_experts_down_slice():
    c = ModelConfig.from_dict(QWEN3_30B_A3B)
    assert (c.moe.num_experts, c.moe.top_k, c.moe.intermediate_size, c.moe.norm_topk_prob) == (128, 8, 768, True)
    assert all(c.moe.sparse) and c.qk_norm
    # an expert's down_proj has K = 768: 384 columns at tp 2, 192 at tp 4 (not whole groups of 128)
    with pytest.raises(ValueError, match=r"experts' down_proj: .*Valid `tp` for this model: \[1, 2\]"):
        c.check_tp(4)
    mixed = ModelConfig.from_dict({**QWEN3_30B_A3B, "decoder_sparse_step": 2, "mlp_only_layers": [1]})
    assert mixed.moe.sparse[:4] == (False, False, False, True)
    mixtral = ModelConfig.from_dict({**LLAMA_CONFIG, "architectures": ["MixtralForCausalLM"], "num_local_experts": 8,
                                     "num_experts_per_tok": 2})
    assert (mixtral.moe.block, mixtral.moe.gate_up, mixtral.moe.down, mixtral.moe.norm_topk_prob) == (
        "block_sparse_moe", ("w1", "w3"), "w2", True)
