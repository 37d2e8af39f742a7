"""The model's config: one small validated object (``ModelConfig``), which tensor-parallel degrees it can be split
into, and the checks of a model directory. hf_config.py reads each family's config.json into it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shardgen.actors.int4.rules import row_slice_problem


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # longrope (Phi-3): per-frequency divisors below and above original_max_position_embeddings, and the factor
    # cos and sin are scaled by
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    partial_rotary_factor: float = 1.0  # the share of each head that rotates (Phi-4-mini: 0.75); the rest passes

    def rotary_dim(self, head_dim: int) -> int:
        return int(head_dim * self.partial_rotary_factor)


@dataclass(frozen=True)
class OptConfig:
    """What OPT has and the Llama-like families do not (learned positions, LayerNorm, ReLU and biases are implied)."""

    layer_norm_before: bool = True  # False (OPT-350m): each norm comes after its residual add
    final_layer_norm: bool = True  # absent when the norms come after, or with _remove_final_layer_norm
    word_embed_proj_dim: int | None = None  # embeddings narrower than hidden_size, projected in and out


@dataclass(frozen=True)
class GemmaConfig:
    """What Gemma 3 adds: local (sliding-window) layers with their own rope, the attention scale, soft-capping."""

    sliding: tuple[bool, ...]  # per layer: a local, sliding-window layer
    sliding_window: int
    local_rope: RopeConfig
    query_pre_attn_scalar: float
    final_logit_softcapping: float | None = None


@dataclass(frozen=True)
class MoeConfig:
    """A mixture-of-experts MLP: top-k of ``num_experts`` SwiGLU experts per token, and where the checkpoint keeps
    them (Qwen3-MoE: ``mlp.experts.E.{gate,up,down}_proj``, Mixtral: ``block_sparse_moe.experts.E.{w1,w3,w2}``,
    the router as ``gate`` beside ``experts``)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # each expert's
    norm_topk_prob: bool  # the top-k weights renormalised to sum to 1
    sparse: tuple[bool, ...]  # per layer: experts (True) or the dense MLP of intermediate_size
    block: str = "mlp"  # the checkpoint's name of the MoE block
    gate_up: tuple[str, str] = ("gate_proj", "up_proj")
    down: str = "down_proj"


@dataclass(frozen=True)
class QuantConfig:
    """torchao plain int4, weight-only, as transformers' ``TorchAoConfig`` writes it."""

    group_size: int

    def to_hf_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "torchao",
            "quant_type": {
                "default": {
                    "_type": "Int4WeightOnlyConfig",
                    "_version": 2,
                    "_data": {"group_size": self.group_size, "int4_packing_format": "plain"},
                }
            },
            "modules_to_not_convert": None,
            "include_input_output_embeddings": False,
            "untie_embedding_weights": False,
        }


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_window: int | None
    rope: RopeConfig
    quant: QuantConfig | None
    torch_dtype: str
    eos_token_ids: tuple[int, ...] = field(default=())
    opt: OptConfig | None = None  # set for OPT only
    gemma: GemmaConfig | None = None  # set for Gemma 3 only
    hidden_act: str = "silu"  # the MLP's gate activation: silu, or gelu_pytorch_tanh (Gemma)
    moe: MoeConfig | None = None  # set for the mixture-of-experts families
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        """Read ``config.json`` of a Hugging Face style model directory."""
        path = Path(model_dir) / "config.json"
        check_model_dir(Path(model_dir))
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: a shardgen model directory needs config.json, tokenizer files and *.safetensors")
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); fix or re-export the config") from e
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """A parsed config.json (``source`` names it in messages); hf_config.py reads each family's keys."""
        from shardgen.actors.model.hf_config import parse_config

        return parse_config(raw, source)

    def tp_problems(self, tp_size: int, int4_groups: dict[str, int] | None = None) -> list[str]:
        """Why this model cannot be split over ``tp_size`` ranks (empty: it can).

        ``int4_groups``: the checkpoint's int4 modules and their group sizes (``loader.int4_groups``); a
        row-parallel int4 layer (o_proj, down_proj) needs K/T to be a multiple of its G, a float one does not.
        None: every layer taken as int4 at the config's group size (no checkpoint at hand)."""
        out = []
        if self.num_heads % tp_size or self.num_kv_heads % tp_size:
            out.append(f"does not divide the attention heads ({self.num_heads}) and KV heads ({self.num_kv_heads})")
        dense_mlp = self.moe is None or not all(self.moe.sparse)
        if dense_mlp and self.intermediate_size % tp_size:
            out.append(f"does not divide intermediate_size {self.intermediate_size}")
        if self.moe and self.moe.intermediate_size % tp_size:
            out.append(f"does not divide the experts' intermediate size {self.moe.intermediate_size}")
        if out or self.quant is None:
            return out
        # (what, its K, which checkpoint modules): a row-parallel int4 slice must hold whole groups
        row_parallel = ([("out_proj", self.hidden_size, ".out_proj"), ("fc2", self.intermediate_size, ".fc2")]
                        if self.family == "opt" else [("o_proj", self.num_heads * self.head_dim, ".o_proj")])
        if self.family != "opt" and dense_mlp:
            row_parallel.append(("down_proj", self.intermediate_size, ".mlp.down_proj"))
        if self.moe:
            row_parallel.append((f"experts' {self.moe.down}", self.moe.intermediate_size, f".{self.moe.down}"))
        for kind, k, suffix in row_parallel:
            if int4_groups is None:
                groups = {self.quant.group_size}
            else:
                groups = {g for name, g in int4_groups.items() if name.endswith(suffix)
                          and (".experts." in name) == kind.startswith("experts")}
            out += [f"{kind}: {problem}" for g in sorted(groups) if (problem := row_slice_problem(k, tp_size, g))]
        return out

    def check_tp(self, tp_size: int, int4_groups: dict[str, int] | None = None) -> None:
        """Refuse a tensor-parallel degree this model cannot be split into, naming why and the valid ones."""
        if tp_size < 1:
            raise ValueError(f"`tp` must be >= 1, got {tp_size}")
        problems = self.tp_problems(tp_size, int4_groups)
        if problems:
            split_heads = self.num_heads % tp_size or self.num_kv_heads % tp_size
            heads = " (shardgen splits KV heads across ranks and does not replicate them)" if split_heads else ""
            raise ValueError(f"`tp` {tp_size} {'; '.join(problems)}{heads}. Valid `tp` for this model: "
                             f"{self.valid_tp_sizes(int4_groups)}")

    @property
    def embed_dim(self) -> int:
        """Width of the token embeddings and of lm_head's input (OPT's may be narrower than hidden_size)."""
        return self.opt.word_embed_proj_dim if self.opt and self.opt.word_embed_proj_dim else self.hidden_size

    @property
    def checkpoint_prefix(self) -> str:
        """Where the decoder's tensors live in the checkpoint (shardgen's own modules are always ``model.*``)."""
        return "model.decoder." if self.family == "opt" else "model."

    def valid_tp_sizes(self, int4_groups: dict[str, int] | None = None, limit: int = 64) -> list[int]:
        return [t for t in range(1, limit + 1) if not self.tp_problems(t, int4_groups)]


def check_model_dir(model_dir: Path) -> None:
    """Refuse a model path that is a file or does not exist, saying which."""
    if model_dir.is_file():
        raise FileNotFoundError(f"{model_dir} is a file; give the model's directory (the folder holding config.json "
                                f"and *.safetensors)")
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {model_dir} does not exist; check the path")


def resolved_dtype_name(dtype: str, device_type: str) -> str:
    """``--dtype auto`` is bfloat16 on CUDA and float32 on CPU; other names are themselves."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" else "float32"
