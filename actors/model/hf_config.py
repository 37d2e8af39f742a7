"""config.json as Hugging Face writes it, read into ``ModelConfig``: the keys and defaults of each family.

Read as plain JSON (no transformers import) so the CLI starts fast; a bad file gets a message that names the file
and the key to fix.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from shardgen.actors.model.config import GemmaConfig, ModelConfig, MoeConfig, OptConfig, QuantConfig, RopeConfig

# Hugging Face architecture name -> shardgen's family (what differs is in ModelConfig's flags).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "OPTForCausalLM": "opt",
    "Phi3ForCausalLM": "phi3",  # Phi-3 and Phi-4 (q/k/v and gate/up fused in the checkpoint)
    "Gemma3ForCausalLM": "gemma3",  # text only
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "longrope")


def parse_config(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """``ModelConfig`` of a parsed config.json; ``source`` names the file in every message."""
    archs = raw.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise ValueError(
            f"{source}: architecture {archs or raw.get('model_type')!r} is not supported; "
            f"shardgen runs {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    family = SUPPORTED_ARCHITECTURES[arch]

    def need(key: str) -> Any:
        if key not in raw:
            raise ValueError(f"{source}: key {key!r} is missing; a {arch} config needs it")
        return raw[key]

    if family == "opt":
        return _opt_config(raw, source, need)
    if family == "gemma3":
        return _gemma3_config(raw, source, need)
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"{source}: hidden_act {act!r} is not supported; shardgen's MLP is SwiGLU (silu)")
    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    rope_params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    partial = float(rope_params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)))
    if not 0 < partial <= 1:
        raise ValueError(f"{source}: partial_rotary_factor {partial} is not in (0, 1]")
    kv_heads = int(raw.get("num_key_value_heads") or heads)
    head_dim = int(raw.get("head_dim") or hidden // heads)
    sliding = raw.get("sliding_window")
    if family == "qwen2" and not raw.get("use_sliding_window", False):
        sliding = None
    rope = dataclasses.replace(_parse_rope(raw, source), partial_rotary_factor=partial)
    half = rope.rotary_dim(head_dim) // 2
    if rope.rope_type == "longrope" and not len(rope.short_factor) == len(rope.long_factor) == half:
        raise ValueError(f"{source}: longrope's short_factor and long_factor need rotary_dim / 2 = {half} "
                         f"values each; they have {len(rope.short_factor)} and {len(rope.long_factor)}")
    return ModelConfig(
        architecture=arch,
        family=family,
        vocab_size=int(need("vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(need("intermediate_size")),
        num_layers=int(need("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=family == "qwen2" or bool(raw.get("attention_bias", False)),
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=family in ("qwen3", "qwen3_moe"),
        sliding_window=int(sliding) if sliding else None,
        rope=rope,
        quant=_parse_quant(raw.get("quantization_config"), source),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id")),
        moe=_parse_moe(raw, family, source),
        raw=raw,
    )


def _eos_ids(eos: Any) -> tuple[int, ...]:
    """config.json's eos_token_id: one id, a list of them, or none."""
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))


def _opt_config(raw: dict[str, Any], source: str, need) -> ModelConfig:
    """OPT's config.json (transformers' OPTConfig names and defaults)."""
    act = raw.get("activation_function", "relu")
    if act != "relu":
        raise ValueError(f"{source}: activation_function {act!r} is not supported; shardgen's OPT MLP is ReLU")
    if not raw.get("enable_bias", True) or not raw.get("layer_norm_elementwise_affine", True):
        raise ValueError(f"{source}: enable_bias and layer_norm_elementwise_affine must be true (as in every "
                         f"published OPT); shardgen's OPT layers have biases and affine LayerNorms")
    hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
    before = bool(raw.get("do_layer_norm_before", True))
    proj = int(raw.get("word_embed_proj_dim") or hidden)
    return ModelConfig(
        architecture="OPTForCausalLM", family="opt", vocab_size=int(need("vocab_size")), hidden_size=hidden,
        intermediate_size=int(need("ffn_dim")), num_layers=int(need("num_hidden_layers")), num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, rms_norm_eps=1e-5,  # nn.LayerNorm's default eps
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)), attention_bias=True, mlp_bias=True,
        qk_norm=False, sliding_window=None, rope=RopeConfig(), quant=_parse_quant(raw.get("quantization_config"), source),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "float16"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id", 2)),
        opt=OptConfig(layer_norm_before=before,
                      final_layer_norm=before and not raw.get("_remove_final_layer_norm", False),
                      word_embed_proj_dim=proj if proj != hidden else None),
        raw=raw)


def _gemma3_config(raw: dict[str, Any], source: str, need) -> ModelConfig:
    """Gemma 3's text config.json, as Google publishes it (rope_theta, rope_local_base_freq, rope_scaling,
    sliding_window_pattern) or as transformers 5 writes it (rope_parameters per layer type, layer_types)."""
    act = raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
        raise ValueError(f"{source}: hidden_activation {act!r} is not supported; shardgen's Gemma MLP is "
                         f"gelu_pytorch_tanh")
    if raw.get("attn_logit_softcapping") is not None:
        raise ValueError(f"{source}: attn_logit_softcapping is set; shardgen's attention kernels do not soft-cap "
                         f"scores (Gemma 3 leaves it null)")
    if raw.get("use_bidirectional_attention"):
        raise ValueError(f"{source}: use_bidirectional_attention is for embedding models; shardgen generates text")
    layers = int(need("num_hidden_layers"))
    pattern = int(raw.get("sliding_window_pattern", 6))
    types = raw.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                       for i in range(layers)]
    if len(types) != layers:
        raise ValueError(f"{source}: layer_types has {len(types)} entries for {layers} layers")
    nested = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    if "full_attention" in nested or "sliding_attention" in nested:
        global_raw = {"rope_parameters": nested.get("full_attention") or {"rope_theta": 1_000_000.0}}
        local_raw = {"rope_parameters": nested.get("sliding_attention") or {"rope_theta": 10_000.0}}
    else:
        global_raw = {"rope_theta": raw.get("rope_theta", 1_000_000.0), "rope_scaling": raw.get("rope_scaling")}
        local_raw = {"rope_theta": raw.get("rope_local_base_freq", 10_000.0)}
    heads = int(need("num_attention_heads"))
    head_dim = int(raw.get("head_dim") or 256)
    return ModelConfig(
        architecture="Gemma3ForCausalLM", family="gemma3", vocab_size=int(need("vocab_size")),
        hidden_size=int(need("hidden_size")), intermediate_size=int(need("intermediate_size")), num_layers=layers,
        num_heads=heads, num_kv_heads=int(raw.get("num_key_value_heads") or heads), head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 131072)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        attention_bias=bool(raw.get("attention_bias", False)), mlp_bias=False, qk_norm=True, sliding_window=None,
        rope=_parse_rope(global_raw, source), quant=_parse_quant(raw.get("quantization_config"), source),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        eos_token_ids=_eos_ids(raw.get("eos_token_id", 1)),
        gemma=GemmaConfig(sliding=tuple(t == "sliding_attention" for t in types),
                          sliding_window=int(raw.get("sliding_window") or 4096),
                          local_rope=_parse_rope(local_raw, source),
                          query_pre_attn_scalar=float(raw.get("query_pre_attn_scalar") or head_dim),
                          final_logit_softcapping=raw.get("final_logit_softcapping")),
        hidden_act="gelu_pytorch_tanh", raw=raw)


def _parse_moe(raw: dict[str, Any], family: str, source: str) -> MoeConfig | None:
    """Qwen3-MoE's and Mixtral's expert settings (transformers' names and defaults)."""
    layers = int(raw["num_hidden_layers"])
    if family == "mixtral":
        return MoeConfig(num_experts=int(raw.get("num_local_experts", 8)), top_k=int(raw.get("num_experts_per_tok", 2)),
                         intermediate_size=int(raw["intermediate_size"]), norm_topk_prob=True, sparse=(True,) * layers,
                         block="block_sparse_moe", gate_up=("w1", "w3"), down="w2")
    if family != "qwen3_moe":
        return None
    if "moe_intermediate_size" not in raw:
        raise ValueError(f"{source}: key 'moe_intermediate_size' is missing; a Qwen3MoeForCausalLM config needs it")
    step, dense = int(raw.get("decoder_sparse_step", 1)), set(raw.get("mlp_only_layers") or [])
    experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 128)  # Qwen's name, or transformers 5's
    return MoeConfig(num_experts=experts, top_k=int(raw.get("num_experts_per_tok", 8)),
                     intermediate_size=int(raw["moe_intermediate_size"]),
                     norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
                     sparse=tuple(i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(layers)))


def _parse_rope(raw: dict[str, Any], source: str) -> RopeConfig:
    # transformers 5 writes rope_parameters (with rope_theta inside); 4.x wrote rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    rope_type = "longrope" if rope_type == "su" else rope_type  # Phi-3's first name for it, as transformers reads it
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"{source}: rope type {rope_type!r} is not supported; shardgen supports {SUPPORTED_ROPE_TYPES}")
    # Phi-3 keeps original_max_position_embeddings beside max_position_embeddings, not in the rope parameters.
    original = int(params.get("original_max_position_embeddings", raw.get("original_max_position_embeddings", 8192)))
    rope = RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor") or 1.0),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=original,
    )
    if rope_type != "longrope":
        return rope
    # As transformers' _compute_longrope_parameters: the factor defaults to the ratio of the context lengths.
    factor = float(params.get("factor") or raw.get("max_position_embeddings", original) / original)
    attention = params.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    short, long = params.get("short_factor"), params.get("long_factor")
    if not isinstance(short, list) or not isinstance(long, list):
        raise ValueError(f"{source}: longrope needs short_factor and long_factor lists in rope_scaling")
    return dataclasses.replace(rope, factor=factor, short_factor=tuple(map(float, short)),
                               long_factor=tuple(map(float, long)), attention_factor=float(attention))


def _parse_quant(qc: dict[str, Any] | None, source: str) -> QuantConfig | None:
    if qc is None:
        return None
    if qc.get("quant_method") != "torchao":
        raise ValueError(
            f"{source}: quantization_config.quant_method is {qc.get('quant_method')!r}; shardgen reads torchao "
            f"plain int4 checkpoints (make one with `shardgen quantize SRC DST`)"
        )
    qt = qc.get("quant_type")
    default = qt.get("default") if isinstance(qt, dict) else None
    if not isinstance(default, dict) or default.get("_type") != "Int4WeightOnlyConfig":
        found = default.get("_type") if isinstance(default, dict) else qt
        raise ValueError(
            f"{source}: torchao quant_type {found!r} is not Int4WeightOnlyConfig; shardgen reads plain int4 "
            f"checkpoints (make one with `shardgen quantize SRC DST`)"
        )
    data = default.get("_data", {})
    packing = data.get("int4_packing_format", "plain")
    if packing != "plain":
        raise ValueError(
            f"{source}: int4_packing_format is {packing!r}; shardgen needs the sliceable 'plain' format "
            f"and converts each rank's slice itself"
        )
    return QuantConfig(group_size=int(data.get("group_size", 128)))
