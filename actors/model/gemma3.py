"""Gemma 3's text decoder (``Gemma3ForCausalLM``) from the Llama-like decoder's attention and MLP.

What differs: RMSNorms scale by (1 + w) (the loader stores 1 + w, so the fused norm kernel runs them), four norms a
layer (each sublayer's output is normed before its residual add), q/k norms, embeddings scaled by sqrt(hidden),
GELU (tanh) in the MLP, attention scaled by query_pre_attn_scalar, and local layers that attend within a sliding
window with their own rope between the global ones. Final-logit soft-capping is in ``CausalLM.compute_logits``.
"""

from __future__ import annotations

import torch
from torch import nn

from shardgen.actors.kernels.kv_cache import LayerCache
from shardgen.actors.model.attention import AttentionMetadata
from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.distributed import TPGroup
from shardgen.actors.model.layers import MLP, RMSNorm, VocabParallelEmbedding, read_checked
from shardgen.actors.model.llama import Attention


class GemmaRMSNorm(RMSNorm):
    """x / rms(x) * (1 + w): the checkpoint holds w, the parameter 1 + w (added in float32)."""

    def weight_loader(self, param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
        param.data.copy_(read_checked(ckpt, name, tuple(param.shape), 0, 0, param.shape[0], False).float() + 1.0)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        g, h, eps, prefix = cfg.gemma, cfg.hidden_size, cfg.rms_norm_eps, f"model.layers.{index}"
        local = g.sliding[index]
        self.input_layernorm = GemmaRMSNorm(h, eps, dtype, device)
        self.self_attn = Attention(cfg, f"{prefix}.self_attn", int4_groups, tp, dtype, device,
                                   rope=g.local_rope if local else cfg.rope,
                                   sliding_window=g.sliding_window if local else None,
                                   scale=g.query_pre_attn_scalar ** -0.5, norm=GemmaRMSNorm)
        self.post_attention_layernorm = GemmaRMSNorm(h, eps, dtype, device)
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype, device)
        self.mlp = MLP(cfg, f"{prefix}.mlp", int4_groups, tp, dtype, device)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps, dtype, device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor, meta: AttentionMetadata,
                kv_cache: LayerCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's normed MLP output, the residual stream before it); the next norm adds the two."""
        h, residual = self.input_layernorm.add_and_norm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, positions, meta, kv_cache))
        h, residual = self.pre_feedforward_layernorm(h, residual)
        return self.post_feedforward_layernorm(self.mlp(h)), residual


class Gemma3Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, device)
        # transformers rounds the scale to the weights' dtype before multiplying
        self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype, device=device),
                             persistent=False)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i, int4_groups, tp, dtype, device)
                                    for i in range(cfg.num_layers))
        self.norm = GemmaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype, device)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[LayerCache] | None) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids) * self.embed_scale, None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, meta, kv_caches[i] if kv_caches is not None else None)
        return self.norm(x, residual)[0]
