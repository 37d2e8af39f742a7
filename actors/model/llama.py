"""The Llama-like decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3, and with experts Qwen3-MoE and Mixtral): rotary
attention with grouped KV heads, a SwiGLU MLP or a mixture of SwiGLU experts (moe.py), RMSNorms fused with the
residual adds. Gemma 3's decoder reuses its attention (gemma3.py)."""

from __future__ import annotations

import torch
from torch import nn

from shardgen.actors.kernels.kv_cache import LayerCache
from shardgen.actors.model.attention import AttentionMetadata, attention
from shardgen.actors.model.config import ModelConfig, RopeConfig
from shardgen.actors.model.distributed import TPGroup
from shardgen.actors.model.layers import (
    MLP,
    MergedColumnParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabParallelEmbedding,
    merged_group,
)
from shardgen.actors.model.moe import SparseMoE


class Attention(nn.Module):
    """Self-attention of one layer. ``rope``, ``sliding_window`` and ``scale`` are the model's unless given (Gemma 3's
    local and global layers differ in them); ``norm`` is the q/k norm's class, when the family has one."""

    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str, rope: RopeConfig | None = None,
                 sliding_window: int | None = None, scale: float | None = None, norm: type = RMSNorm) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = cfg.num_kv_heads // tp.size
        self.scale = scale or cfg.head_dim ** -0.5
        self.sliding_window = sliding_window or cfg.sliding_window
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [q, kv, kv], cfg.attention_bias, merged_group(int4_groups, prefix, "qkv_proj"), tp, dtype, device)
        o_bias = cfg.attention_bias and cfg.family != "qwen2"  # Qwen2 has q/k/v bias only
        self.o_proj = RowParallelLinear(q, cfg.hidden_size, o_bias, int4_groups.get(f"{prefix}.o_proj"), tp, dtype, device)
        self.rotary = RotaryEmbedding(cfg.head_dim, rope or cfg.rope, device)
        if cfg.qk_norm:
            self.q_norm = norm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
            self.k_norm = norm(cfg.head_dim, cfg.rms_norm_eps, dtype, device)
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


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        prefix = f"model.layers.{index}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", int4_groups, tp, dtype, device)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)
        if cfg.moe is not None and cfg.moe.sparse[index]:
            self.mlp = SparseMoE(cfg, f"{prefix}.{cfg.moe.block}", int4_groups, tp, dtype, device)
        else:
            self.mlp = MLP(cfg, f"{prefix}.mlp", int4_groups, tp, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: LayerCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output, the residual stream before it); the next norm adds the two."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.self_attn(h, positions, meta, kv_cache)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, int4_groups, tp, dtype, device) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerCache] | None) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, meta, kv_caches[i] if kv_caches is not None else None)
        return self.norm(x, residual)[0]
