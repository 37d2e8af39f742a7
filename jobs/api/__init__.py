"""``import shardgen``: the Python API (this folder is the ``shardgen`` package itself; pyproject.toml maps it, and
``shardgen.actors``, ``shardgen.pipeline`` and ``shardgen.jobs`` are the repository's folders of those names).

    import ray, shardgen

    processor = shardgen.build_processor(shardgen.ProcessorConfig(model="./model-int4", replicas=2))
    out = processor(ray.data.read_parquet("prompts.parquet"))     # a Dataset of the output columns
    summary = shardgen.run(shardgen.RunOptions(model="./model-int4", input="prompts.jsonl", output="out/"))

Every name loads on first use: ``import shardgen.jobs.cli`` (the command line) imports this package first and
must not pay for Ray Data and torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_processor": "shardgen.pipeline.processor",
    "Processor": "shardgen.pipeline.processor",
    "ProcessorConfig": "shardgen.pipeline.options",
    "RunOptions": "shardgen.pipeline.options",
    "run": "shardgen.pipeline.run",
    "RunSummary": "shardgen.pipeline.summary",
    "SamplingParams": "shardgen.actors.engine.sequence",
    "EngineConfig": "shardgen.actors.engine.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> object:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'shardgen' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
