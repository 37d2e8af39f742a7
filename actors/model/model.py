"""Decoder-only transformer (Llama, Mistral, Qwen2, Qwen3; OPT's decoder is in opt.py) built from tensor-parallel
layers.

``forward(input_ids, positions, meta, kv_caches)`` takes the tokens of a
batch flattened into one dimension, so prefill, decode and chunked prefill run
through the same code; ``compute_logits`` turns hidden states into logits.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from shardgen.actors.kernels import fused_ops
from shardgen.actors.model.attention import AttentionMetadata, attention
from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.distributed import SINGLE, TPGroup
from shardgen.actors.kernels.kv_cache import LayerCache
from shardgen.actors.model.layers import (
    PACKED_MODULES,
    MergedColumnParallelLinear,
    ParallelLMHead,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    merged_group,
)
from shardgen.actors.model.opt import OPTDecoder

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = cfg.num_kv_heads // tp.size
        self.scale = cfg.head_dim ** -0.5
        self.sliding_window = cfg.sliding_window
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [q, kv, kv], cfg.attention_bias, merged_group(int4_groups, prefix, "qkv_proj"), tp, dtype, device)
        o_bias = cfg.attention_bias and cfg.family != "qwen2"  # Qwen2 has q/k/v bias only
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, o_bias, int4_groups.get(f"{prefix}.o_proj"), tp, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope, device)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: LayerCache | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.local_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = attention(q, k, v, meta, self.scale, kv_cache, self.sliding_window)
        return self.o_proj(out.reshape(out.shape[0], -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [i, i], cfg.mlp_bias, merged_group(int4_groups, prefix, "gate_up_proj"), tp, dtype, device)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, cfg.mlp_bias, int4_groups.get(f"{prefix}.down_proj"), tp, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(fused_ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", int4_groups, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.mlp = MLP(cfg, f"{prefix}.mlp", int4_groups, tp, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: LayerCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds the two."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, meta, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, f"model.layers.{i}", int4_groups, tp, dtype, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerCache] | None) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, meta, kv_caches[i] if kv_caches is not None else None)
        return self.norm(x, residual)[0]


class CausalLM(nn.Module):
    """The whole model for one tensor-parallel rank; parameter names follow transformers', q/k/v and gate/up merged.

    ``int4_groups`` maps a linear module's checkpoint name (``model.layers.0.mlp.down_proj``)
    to its int4 group size; modules not in it are dense.
    """

    def __init__(self, cfg: ModelConfig, tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", int4_groups: dict[str, int] | None = None) -> None:
        super().__init__()
        int4_groups = int4_groups or {}
        cfg.check_tp(tp.size, int4_groups)
        self.config, self.tp = cfg, tp
        decoder = OPTDecoder if cfg.family == "opt" else DecoderModel
        self.model = decoder(cfg, int4_groups, tp, dtype, device)
        if cfg.tie_word_embeddings and "lm_head" in int4_groups:
            raise ValueError("lm_head is int4 but tie_word_embeddings is true; set it false in config.json (the head is stored separately)")
        self.lm_head = ParallelLMHead(cfg.vocab_size, cfg.embed_dim, int4_groups.get("lm_head"), tp, dtype, device)
        if cfg.tie_word_embeddings:
            self.lm_head.tie_to(self.model.embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerCache] | None = None) -> torch.Tensor:
        return self.model(input_ids, positions, meta, kv_caches)

    def set_max_model_len(self, max_model_len: int) -> None:
        """What the engine will run up to: LongRoPE models take their long frequencies beyond the original length."""
        long = max_model_len > self.config.rope.original_max_position_embeddings
        for m in self.modules():
            if isinstance(m, RotaryEmbedding):
                m.use_long_factors(long)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def load_weights(self, ckpt: Checkpoint) -> None:
        """Read this rank's slice of every weight through each parameter's own ``weight_loader``."""
        params = dict(self.named_parameters(remove_duplicate=False))
        expected = {(n, None) for n in params if not any(p in n for p in ("qkv_proj", "gate_up_proj"))}
        expected |= {(n, i) for n in params if "qkv_proj" in n for i in range(3)}
        expected |= {(n, i) for n in params if "gate_up_proj" in n for i in range(2)}
        if self.config.tie_word_embeddings:
            expected.discard(("lm_head.weight", None))
        loaded: set[tuple[str, int | None]] = set()
        for name in ckpt.names():
            if name.endswith(_IGNORED_SUFFIXES) or (self.config.tie_word_embeddings and name == "lm_head.weight"):
                continue
            target, shard_id = _param_name(name, self.config.checkpoint_prefix)
            if target not in params:
                log.warning("ignoring checkpoint tensor %s: the model has no parameter for it", name)
                continue
            param = params[target]
            param.weight_loader(param, ckpt, name, shard_id)
            if shard_id is None and ("qkv_proj" in target or "gate_up_proj" in target):  # fused: every part
                loaded |= {(target, i) for i in range(3 if "qkv_proj" in target else 2)}
            loaded.add((target, shard_id))
        missing = sorted(f"{n}" + (f" (part {s})" if s is not None else "") for n, s in expected - loaded)
        if missing:
            raise ValueError(
                f"the checkpoint in {ckpt.dir} lacks {len(missing)} tensor(s) the model needs, e.g. {missing[:5]}; "
                f"it is incomplete or does not match config.json")


def _param_name(name: str, prefix: str = "model.") -> tuple[str, int | None]:
    """Checkpoint tensor name -> (shardgen parameter name, merged part or None); the decoder's ``prefix`` in the
    checkpoint becomes ``model.``."""
    if name.startswith(prefix):
        name = "model." + name[len(prefix):]
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p in PACKED_MODULES:
            merged, shard_id = PACKED_MODULES[p]
            parts[i] = merged
            return ".".join(parts), shard_id
    return name, None

