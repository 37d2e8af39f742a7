"""A mixture-of-experts MLP (Qwen3-MoE, Mixtral): a float router picks each token's top-k experts, each a SwiGLU MLP.

Tensor parallelism splits every expert as the dense MLP is split (gate/up by rows, down by columns), so each rank
reads only its slice of each expert's weights and holds all experts; the experts' partial sums are added locally
and all-reduced once per layer. Experts are int4 exactly as the checkpoint stores them, one plain ``Int4Tensor``
per expert and projection, and load as any linear.

After loading, where the layout has a grouped GEMM (actors/int4/experts.py: float experts, and humming's int4 on
SM90), each projection of every expert becomes one stacked weight, and a step runs all experts in one GEMM a
projection over the routed rows sorted by expert, with no host synchronisation. Elsewhere the experts stay separate
linears, run one after the other on the rows routed to them.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from shardgen.actors import int4
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.distributed import SINGLE, TPGroup
from shardgen.actors.model.layers import MLP, ColumnParallelLinear


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        """``prefix``: the block's checkpoint name (``model.layers.3.mlp``, Mixtral's ``...block_sparse_moe``)."""
        super().__init__()
        moe = cfg.moe
        self.tp, self.top_k, self.norm_topk_prob, self.num_experts = tp, moe.top_k, moe.norm_topk_prob, moe.num_experts
        if f"{prefix}.gate" in int4_groups:
            raise ValueError(f"{prefix}.gate (the router) is int4 in the checkpoint; shardgen keeps routers in the "
                             f"float dtype: quantize the model again with `shardgen quantize`")
        # The router is small (experts x hidden) and whole on every rank, so every rank routes alike.
        self.gate = ColumnParallelLinear(cfg.hidden_size, moe.num_experts, False, None, SINGLE, dtype, device)
        self.experts = nn.ModuleList(MLP(cfg, f"{prefix}.experts.{e}", int4_groups, tp, dtype, device,
                                         moe.intermediate_size, moe.gate_up, moe.down, reduce=False)
                                     for e in range(moe.num_experts))
        self.act_and_mul = self.experts[0].act_and_mul
        self.grouped: dict[str, int4.GroupedExperts] | None = None

    def expert_projections(self) -> dict[str, list[nn.Parameter]]:
        """Every expert's loaded weight of each projection, in expert order (for ``int4.convert_module_weights``)."""
        assert not any(e.gate_up_proj.bias is not None or e.down_proj.bias is not None for e in self.experts)
        return {"gate_up": [e.gate_up_proj.weight for e in self.experts],
                "down": [e.down_proj.weight for e in self.experts]}

    def use_grouped(self, grouped: dict[str, int4.GroupedExperts]) -> None:
        """Run the experts through these grouped GEMMs from now on; the separate experts' weights are freed."""
        self.grouped = grouped
        del self.experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As transformers: softmax in float32 over all experts, top-k, renormalised when the model says so.
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = self._grouped(x, weights, chosen) if self.grouped is not None else self._one_by_one(x, weights, chosen)
        if self.tp.size > 1:
            dist.all_reduce(out)
        return out

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        flat = chosen.flatten()
        order = torch.argsort(flat, stable=True)  # (token, k) pairs grouped by expert
        rows = order // self.top_k
        # Rows per expert, counted on the device: bincount would read its maximum back to the host.
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        h = self.act_and_mul(self.grouped["gate_up"](x[rows], counts))
        y = self.grouped["down"](h, counts) * weights.flatten()[order, None]
        return torch.zeros_like(x).index_add_(0, rows, y.to(x.dtype))

    def _one_by_one(self, x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        counts = torch.bincount(chosen.flatten(), minlength=self.num_experts).tolist()
        order = torch.argsort(chosen.flatten(), stable=True)  # (token, k) pairs grouped by expert
        tokens, weight = order // self.top_k, weights.flatten()[order]
        start = 0
        for e, n in enumerate(counts):
            if n:
                rows = tokens[start:start + n]
                y = self.experts[e](x[rows]) * weight[start:start + n, None]
                out.index_add_(0, rows, y.to(out.dtype))
                start += n
        return out
