"""Tensor-parallel layers. Each parameter carries its own ``weight_loader(param, ckpt, name, shard_id)``
that reads only this rank's slice from the checkpoint; collectives are in ``forward``.

Int4 weights are held as plain ``Int4Tensor`` parameters until ``int4.convert_module_weights``
turns them into the hardware's layout.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from shardgen.actors.kernels import fused_ops
from shardgen.actors import int4
from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.config import ModelConfig, RopeConfig
from shardgen.actors.model.distributed import SINGLE, TPGroup


# Checkpoint projection -> (merged shardgen parameter, part index).
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    "w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),  # Mixtral's experts
}
LLAMA_PARTS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
# Checkpoint module names of other families -> shardgen's (Mixtral's MoE block and its experts' down projection).
RENAMED_MODULES = {"block_sparse_moe": "mlp", "w2": "down_proj"}


def merged_group(int4_groups: dict[str, int], prefix: str, merged: str,
                 sources: tuple[str, ...] | None = None) -> int | None:
    """The int4 group size of the checkpoint projections merged into ``prefix.merged`` (None: all dense), or of
    the one fused tensor a checkpoint holds for them (Phi-3's qkv_proj and gate_up_proj). ``sources``: the
    checkpoint's names of the parts (default: Llama's q/k/v_proj or gate/up_proj)."""
    if f"{prefix}.{merged}" in int4_groups:
        return int4_groups[f"{prefix}.{merged}"]
    sources = [f"{prefix}.{src}" for src in sources or LLAMA_PARTS[merged]]
    groups = {int4_groups.get(s) for s in sources}
    if len(groups) != 1:
        raise ValueError(f"{', '.join(sources)} must all be int4 with one group size, or all plain; the checkpoint has {groups}")
    return groups.pop()


def load_whole(param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
    """The ``weight_loader`` of a tensor every rank holds whole (norms, OPT's positions)."""
    param.data.copy_(read_checked(ckpt, name, tuple(param.shape), 0, 0, param.shape[0], False))


def parameter(data: torch.Tensor, loader: Callable[..., None], **attrs: object) -> nn.Parameter:
    """A frozen parameter that carries its ``weight_loader``. A module's own method is held through a weak
    reference: module and parameter would otherwise refer to each other, and a dropped parameter (a mixture's
    experts once grouped) or a deleted model would wait for the cycle collector to give its memory back."""
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = _weakly_bound(loader) if inspect.ismethod(loader) else loader
    for k, v in attrs.items():
        setattr(p, k, v)
    return p


def _weakly_bound(method: Callable[..., None]) -> Callable[..., None]:
    """``method`` called through a weak reference to its object (the module, which holds the parameter)."""
    ref = weakref.WeakMethod(method)

    def weight_loader(*args: object, **kwargs: object) -> None:
        bound = ref()
        assert bound is not None, "a parameter's module is gone: load weights through the model that holds them"
        bound(*args, **kwargs)

    return weight_loader


def read_checked(ckpt: Checkpoint, name: str, full_shape: tuple[int, ...], dim: int, start: int, length: int, int4_expected: bool) -> torch.Tensor:
    """Read [start, start+length) along ``dim`` of ``name`` after checking it is the tensor the config describes."""
    entry = ckpt.entry(name)
    if tuple(entry.shape) != tuple(full_shape):
        raise ValueError(
            f"{name} has shape {tuple(entry.shape)} in the checkpoint, but config.json implies {tuple(full_shape)}; "
            f"the weights and config.json do not belong together"
        )
    if entry.is_int4 != int4_expected:
        want = "int4" if int4_expected else "a plain tensor"
        raise ValueError(f"{name} is {'int4' if entry.is_int4 else 'a plain tensor'} in the checkpoint but {want} was expected")
    return ckpt.read(name, dim, start, length)


class LinearBase(nn.Module):
    """y = x W^T (+ b) with W (out_local, in_local): int4 when ``group_size`` is set, else dense."""

    def __init__(self, in_local: int, out_local: int, bias: bool, group_size: int | None,
                 tp: TPGroup, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.tp = tp
        self.group_size = group_size
        if group_size:
            w = int4.empty((out_local, in_local), group_size, dtype, device)
        else:
            w = torch.zeros(out_local, in_local, dtype=dtype, device=device)
        self.weight = parameter(w, self.weight_loader, input_dim=1, output_dim=0)
        self.bias = parameter(torch.zeros(out_local, dtype=dtype, device=device), self.weight_loader, output_dim=0) if bias else None

    def weight_loader(self, param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
        raise NotImplementedError

    def _linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        # The int4 kernels refuse strided activations.
        return int4.linear(x.contiguous(), self.weight, bias)


class ColumnParallelLinear(LinearBase):
    """Splits the output features: rank r holds rows [r*N/T, (r+1)*N/T) of W. No communication."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
                 tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        assert out_features % tp.size == 0, (out_features, tp.size)
        self.in_features, self.out_features = in_features, out_features
        super().__init__(in_features, out_features // tp.size, bias, group_size, tp, dtype, device)

    def weight_loader(self, param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
        full = (self.out_features, self.in_features) if param is self.weight else (self.out_features,)
        start, length = self.tp.shard(self.out_features)
        src = read_checked(ckpt, name, full, 0, start, length, param is self.weight and self.group_size is not None)
        int4.copy_rows(param.data, src, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._linear(x, self.bias)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of one input in one GEMM (gate/up, q/k/v).

    Each rank's weight is [shard of part 0; shard of part 1; ...], so the local
    output splits back into the parts with ``split(local_sizes)``. The parts come from one checkpoint tensor each
    (``shard_id`` names the part), or all from one fused tensor (``shard_id`` None: Phi-3), sliced per part.
    """

    def __init__(self, in_features: int, part_sizes: list[int], bias: bool = False, group_size: int | None = None,
                 tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        assert all(p % tp.size == 0 for p in part_sizes), (part_sizes, tp.size)
        self.part_sizes = list(part_sizes)
        self.local_sizes = [p // tp.size for p in part_sizes]
        super().__init__(in_features, sum(part_sizes), bias, group_size, tp, dtype, device)

    def weight_loader(self, param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
        if shard_id is None:  # one fused tensor [part 0; part 1; ...]: each part's slice for this rank
            full = (sum(self.part_sizes), self.in_features) if param is self.weight else (sum(self.part_sizes),)
            for i, part in enumerate(self.part_sizes):
                start, length = self.tp.shard(part)
                src = read_checked(ckpt, name, full, 0, sum(self.part_sizes[:i]) + start, length,
                                   param is self.weight and self.group_size is not None)
                int4.copy_rows(param.data, src, sum(self.local_sizes[:i]))
            return
        assert isinstance(shard_id, int), shard_id
        part = self.part_sizes[shard_id]
        full = (part, self.in_features) if param is self.weight else (part,)
        start, length = self.tp.shard(part)
        src = read_checked(ckpt, name, full, 0, start, length, param is self.weight and self.group_size is not None)
        int4.copy_rows(param.data, src, sum(self.local_sizes[:shard_id]))


class RowParallelLinear(LinearBase):
    """Splits the input features: rank r holds columns [r*K/T, (r+1)*K/T) of W; partial sums all-reduced, unless
    ``reduce`` is false (the experts of an MoE block: their sum is reduced once, by the block)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, group_size: int | None = None,
                 tp: TPGroup = SINGLE, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 reduce: bool = True) -> None:
        assert in_features % tp.size == 0, (in_features, tp.size)
        assert reduce or not bias, "a bias is added once, after the reduction"
        self.in_features, self.out_features, self.reduce = in_features, out_features, reduce
        # The bias is whole on every rank and added once, after the reduction.
        super().__init__(in_features // tp.size, out_features, bias, group_size, tp, dtype, device)

    def weight_loader(self, param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
        if param is self.weight:
            entry = ckpt.entry(name)
            if entry.is_int4 and len(entry.shape) == 2:
                int4.check_shardable(name, entry.shape, 1, self.tp.size, entry.group_size)
            start, length = self.tp.shard(self.in_features)
            src = read_checked(ckpt, name, (self.out_features, self.in_features), 1, start, length, self.group_size is not None)
        else:
            src = read_checked(ckpt, name, (self.out_features,), 0, 0, self.out_features, False)
        int4.copy_rows(param.data, src, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._linear(x, None)
        if self.tp.size > 1 and self.reduce:
            dist.all_reduce(y)
        if self.bias is not None:
            y = y + self.bias
        return y


class MLP(nn.Module):
    """The gated MLP: down(act(gate) * up), gate and up in one GEMM. ``intermediate``, ``parts`` (the checkpoint's
    names of gate and up) and ``down`` default to the dense MLP's; an MoE expert passes its own, and ``reduce``
    false (the block reduces the experts' sum once)."""

    def __init__(self, cfg: ModelConfig, prefix: str, int4_groups: dict[str, int], tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str, intermediate: int | None = None,
                 parts: tuple[str, str] | None = None, down: str = "down_proj", reduce: bool = True) -> None:
        super().__init__()
        i = intermediate or cfg.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(
            cfg.hidden_size, [i, i], cfg.mlp_bias, merged_group(int4_groups, prefix, "gate_up_proj", parts), tp, dtype,
            device)
        self.down_proj = RowParallelLinear(i, cfg.hidden_size, cfg.mlp_bias, int4_groups.get(f"{prefix}.{down}"), tp,
                                           dtype, device, reduce)
        self.act_and_mul = fused_ops.silu_and_mul if cfg.hidden_act == "silu" else fused_ops.gelu_tanh_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))


class VocabParallelBase(nn.Module):
    """A (vocab, hidden) weight split by vocab rows: rank r holds rows [r*V', (r+1)*V') with V' = ceil(V/T);
    rows past V stay zero, so every rank's shard has the same shape."""

    def __init__(self, vocab_size: int, hidden_size: int, group_size: int | None, tp: TPGroup,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.tp, self.vocab_size, self.hidden_size, self.group_size = tp, vocab_size, hidden_size, group_size
        self.rows_per_rank = math.ceil(vocab_size / tp.size)
        self.vocab_start = tp.rank * self.rows_per_rank
        self.vocab_end = min(self.vocab_start + self.rows_per_rank, vocab_size)
        if group_size:
            w = int4.empty((self.rows_per_rank, hidden_size), group_size, dtype, device)
        else:
            w = torch.zeros(self.rows_per_rank, hidden_size, dtype=dtype, device=device)
        self.weight = parameter(w, self.weight_loader, input_dim=1, output_dim=0)

    def weight_loader(self, param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
        length = max(self.vocab_end - self.vocab_start, 0)
        src = read_checked(ckpt, name, (self.vocab_size, self.hidden_size), 0, self.vocab_start, length,
                           self.group_size is not None)
        int4.copy_rows(param.data, src, 0)


class VocabParallelEmbedding(VocabParallelBase):
    """Vocab-parallel embedding (always dense); each rank looks up its own rows, then all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TPGroup = SINGLE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(vocab_size, hidden_size, None, tp, dtype, device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        mine = (ids >= self.vocab_start) & (ids < self.vocab_end)
        y = F.embedding((ids - self.vocab_start) * mine, self.weight) * mine.unsqueeze(-1)
        dist.all_reduce(y)
        return y


class ParallelLMHead(VocabParallelBase):
    """Vocab-parallel output projection (int4 or dense); the logit shards are gathered on every rank."""

    def __init__(self, vocab_size: int, hidden_size: int, group_size: int | None = None, tp: TPGroup = SINGLE,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__(vocab_size, hidden_size, group_size, tp, dtype, device)

    def tie_to(self, embedding: VocabParallelEmbedding) -> None:
        assert self.group_size is None and embedding.rows_per_rank == self.rows_per_rank
        self.weight = embedding.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = int4.linear(h.contiguous(), self.weight)
        if self.tp.size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp.size)]
            dist.all_gather(parts, logits)
            logits = torch.cat(parts, dim=-1)
        return logits[..., : self.vocab_size]


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.eps = eps
        self.weight = parameter(torch.ones(size, dtype=dtype, device=device), self.weight_loader)

    def weight_loader(self, param: nn.Parameter, ckpt: Checkpoint, name: str, shard_id: object = None) -> None:
        load_whole(param, ckpt, name)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(x); with ``residual``: (RMSNorm(x + residual), x + residual), in one kernel on the GPU."""
        return fused_ops.rms_norm(x, self.weight, self.eps, residual)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(RMSNorm(x + residual), x + residual); before the first layer there is no residual yet: (RMSNorm(x), x)."""
        return (self(x), x) if residual is None else self(x, residual)


def rope_inv_freq(head_dim: int, rope: RopeConfig, long: bool = False) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, with Llama 3 / linear / LongRoPE scaling as transformers computes
    them (``long``: LongRoPE's factors for contexts beyond original_max_position_embeddings)."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    if rope.rope_type == "longrope":
        return 1.0 / (torch.tensor(rope.long_factor if long else rope.short_factor) * rope.theta ** exponent)
    inv_freq = 1.0 / (rope.theta ** exponent)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old_len = rope.original_max_position_embeddings
        low_wavelen = old_len / rope.low_freq_factor
        high_wavelen = old_len / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old_len / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form, as in transformers' Llama/Qwen/Phi-3).

    LongRoPE has two sets of frequencies; transformers picks per forward call by the sequence's length. shardgen
    picks once per engine, as vLLM does: the long ones when the engine's ``max_model_len`` is beyond
    original_max_position_embeddings (``use_long_factors``), so a sequence's cached keys never mix the two.
    """

    def __init__(self, head_dim: int, rope: RopeConfig, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.rope, self.head_dim, self.rotary_dim = rope, head_dim, rope.rotary_dim(head_dim)
        self.register_buffer("inv_freq", rope_inv_freq(self.rotary_dim, rope).to(device), persistent=False)
        self.scale = rope.attention_factor  # cos and sin scaled: the rotated part of q and k, after the rotation

    def use_long_factors(self, on: bool) -> None:
        if self.rope.rope_type == "longrope":
            self.inv_freq = rope_inv_freq(self.rotary_dim, self.rope, long=on).to(self.inv_freq.device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (tokens, heads, head_dim), k: (tokens, kv_heads, head_dim); rotated in place on the GPU."""
        if self.rotary_dim == self.head_dim:
            return self._rotate(positions, q, k)
        # As transformers' partial rotary: the first rotary_dim features of each head rotate, the rest pass through.
        r = self.rotary_dim
        q_rot, k_rot = self._rotate(positions, q[..., :r], k[..., :r])
        return torch.cat([q_rot, q[..., r:]], dim=-1), torch.cat([k_rot, k[..., r:]], dim=-1)

    def _rotate(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = fused_ops.apply_rotary(q, k, positions, self.inv_freq)
        if self.scale != 1.0:
            q, k = q * self.scale, k * self.scale
        return q, k
