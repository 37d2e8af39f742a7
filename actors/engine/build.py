"""The one path from a loaded rank to its engine: the runner (KV cache, CUDA graphs), then the scheduler and
engine over it. The worker, ``shardgen bench``, the benchmarks and the tests all build engines here."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.engine import Engine
from shardgen.actors.engine.runner import ModelRunner
from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.distributed import SINGLE, TPGroup
from shardgen.actors.model.loader import LoadedModel


def max_model_len(config: EngineConfig, model: ModelConfig) -> int:
    """The longest sequence (prompt + completion) the engine runs: ``config.max_model_len``, at most and by
    default the model's ``max_position_embeddings``."""
    limit = model.max_position_embeddings
    return min(config.max_model_len or limit, limit)


def build_engine(loaded: LoadedModel, config: EngineConfig, tp: TPGroup = SINGLE,
                 device: torch.device | str | None = None, eos_token_ids: Iterable[int] = (),
                 detokenize: Callable[[list[int]], str] | None = None,
                 runner_class: type[ModelRunner] = ModelRunner, tokenizer=None) -> Engine:
    """Size this rank's KV cache, capture its decode graphs and build the engine over them.

    ``device``: where the model's weights are (default: the device of its first parameter). Under tensor
    parallelism every rank builds one; rank 0 schedules through ``engine``, the others run ``engine.runner.follow()``.
    ``runner_class``: a ``ModelRunner`` subclass (the benchmarks time its steps). ``tokenizer``: the model's, for
    structured outputs (requests with a constraint are refused without it)."""
    if device is None:
        device = next(loaded.model.parameters()).device
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    length = max_model_len(config, loaded.config)
    runner = runner_class(loaded, tp, device, config, length)
    make_grammars = None
    if tokenizer is not None:
        from shardgen.actors.engine.grammar import Grammars

        make_grammars = lambda: Grammars(tokenizer, loaded.config.vocab_size)  # noqa: E731
    return Engine(runner, config, length, set(eos_token_ids), detokenize, make_grammars)
