"""The causal LM of every family: its decoder (llama.py, opt.py, gemma3.py), lm_head, and the checkpoint loading
that reads this rank's slice of each tensor through its parameter's ``weight_loader``.

``forward(input_ids, positions, meta, kv_caches)`` takes the tokens of a
batch flattened into one dimension, so prefill, decode and chunked prefill run
through the same code; ``compute_logits`` turns hidden states into logits.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from shardgen.actors.kernels.kv_cache import LayerCache
from shardgen.actors.model.attention import AttentionMetadata
from shardgen.actors.model.checkpoint import Checkpoint
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.distributed import SINGLE, TPGroup
from shardgen.actors.model.layers import PACKED_MODULES, RENAMED_MODULES, ParallelLMHead, RotaryEmbedding
from shardgen.actors.model.gemma3 import Gemma3Decoder
from shardgen.actors.model.llama import DecoderModel
from shardgen.actors.model.opt import OPTDecoder

DECODERS = {"opt": OPTDecoder, "gemma3": Gemma3Decoder}  # every other family: the Llama-like DecoderModel

log = logging.getLogger(__name__)

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


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
        self.model = DECODERS.get(cfg.family, DecoderModel)(cfg, int4_groups, tp, dtype, device)
        self.softcap = cfg.gemma.final_logit_softcapping if cfg.gemma else None
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
        logits = self.lm_head(hidden)
        if self.softcap:  # Gemma's final-logit soft-capping, when its config sets it
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

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
    parts = [RENAMED_MODULES.get(p, p) for p in name.split(".")]
    for i, p in enumerate(parts):
        if p in PACKED_MODULES:
            merged, shard_id = PACKED_MODULES[p]
            parts[i] = merged
            return ".".join(parts), shard_id
    return ".".join(parts), None

