"""OPT (``OPTForCausalLM``) from the same tensor-parallel layers as the Llama-like decoder.

What differs: learned absolute positions (OPT's table starts at row 2), LayerNorm with biases, a ReLU MLP of fc1
and fc2, biases on every projection, no rotary embedding, and for OPT-350m norms after the residual adds and
embeddings narrower than the hidden size (projected in and out). The checkpoint keeps the decoder under
``model.decoder.``; shardgen's modules are ``model.*`` as for every family (``ModelConfig.checkpoint_prefix``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardgen.actors.kernels.kv_cache import LayerCache
from shardgen.actors.model.attention import AttentionMetadata, attention
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.distributed import SINGLE, TPGroup
from shardgen.actors.model.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    load_whole,
    merged_group,
    parameter,
)

POSITION_OFFSET = 2  # OPT's position table reserves its first two rows (fairseq's padding offset)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, whole on every rank."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.eps = eps
        self.weight = parameter(torch.ones(size, dtype=dtype, device=device), load_whole)
        self.bias = parameter(torch.zeros(size, dtype=dtype, device=device), load_whole)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class PositionEmbedding(nn.Module):
    """OPT's learned positions, whole on every rank (max_position_embeddings + 2 rows: small beside the vocab)."""

    def __init__(self, max_positions: int, hidden_size: int, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.weight = parameter(torch.zeros(max_positions + POSITION_OFFSET, hidden_size, dtype=dtype, device=device),
                             load_whole)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return F.embedding(positions + POSITION_OFFSET, self.weight)


class OPTAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h = cfg.hidden_size
        self.head_dim = cfg.head_dim
        self.num_heads = self.num_kv_heads = cfg.num_heads // tp.size
        self.scale = cfg.head_dim ** -0.5
        self.qkv_proj = MergedColumnParallelLinear(h, [h, h, h], True, merged_group(int4_groups, prefix, "qkv_proj"),
                                                   tp, dtype, device)
        self.out_proj = RowParallelLinear(h, h, True, int4_groups.get(f"{prefix}.out_proj"), tp, dtype, device)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: LayerCache | None) -> torch.Tensor:
        q, k, v = self.qkv_proj(x).split(self.qkv_proj.local_sizes, dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        out = attention(q, k, v, meta, self.scale, kv_cache, None)
        return self.out_proj(out.reshape(out.shape[0], -1))


class OPTDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.norm_before = cfg.opt.layer_norm_before
        self.self_attn_layer_norm = LayerNorm(h, eps, dtype, device)
        self.self_attn = OPTAttention(cfg, f"{prefix}.self_attn", int4_groups, tp, dtype, device)
        self.final_layer_norm = LayerNorm(h, eps, dtype, device)
        self.fc1 = ColumnParallelLinear(h, cfg.intermediate_size, True, int4_groups.get(f"{prefix}.fc1"), tp, dtype,
                                        device)
        self.fc2 = RowParallelLinear(cfg.intermediate_size, h, True, int4_groups.get(f"{prefix}.fc2"), tp, dtype,
                                     device)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, kv_cache: LayerCache | None) -> torch.Tensor:
        h = self.self_attn_layer_norm(x) if self.norm_before else x
        x = x + self.self_attn(h, meta, kv_cache)
        if not self.norm_before:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.norm_before else x
        x = x + self.fc2(torch.relu(self.fc1(h)))
        return x if self.norm_before else self.final_layer_norm(x)


class OPTDecoder(nn.Module):
    """Embeddings (+ positions), the layers, the final norm; ``forward`` returns the hidden states lm_head takes."""

    def __init__(self, cfg: ModelConfig, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        h, prefix = cfg.hidden_size, cfg.checkpoint_prefix
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.embed_dim, tp, dtype, device)
        self.embed_positions = PositionEmbedding(cfg.max_position_embeddings, h, dtype, device)
        narrow = cfg.embed_dim != h  # OPT-350m: the projections are small, so every rank holds them whole
        self.project_in = (ColumnParallelLinear(cfg.embed_dim, h, False, int4_groups.get(f"{prefix}project_in"),
                                                SINGLE, dtype, device) if narrow else None)
        self.project_out = (ColumnParallelLinear(h, cfg.embed_dim, False, int4_groups.get(f"{prefix}project_out"),
                                                 SINGLE, dtype, device) if narrow else None)
        self.layers = nn.ModuleList(OPTDecoderLayer(cfg, f"{prefix}layers.{i}", int4_groups, tp, dtype, device)
                                    for i in range(cfg.num_layers))
        self.final_layer_norm = LayerNorm(h, cfg.rms_norm_eps, dtype, device) if cfg.opt.final_layer_norm else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerCache] | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        if self.project_in is not None:
            x = self.project_in(x)
        x = x + self.embed_positions(positions)
        for i, layer in enumerate(self.layers):
            x = layer(x, meta, kv_caches[i] if kv_caches is not None else None)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return self.project_out(x) if self.project_out is not None else x
