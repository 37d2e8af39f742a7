"""A shardgen run: read -> tokenize -> generate (R replicas x T ranks) -> detokenize -> Parquet."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from pipeline import detokenize, generate, read, tokenize, write
from pipeline.options import RunOptions

BATCHES_IN_FLIGHT_PER_REPLICA = 4


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline and the columns it reads and writes."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    apply: Callable


@dataclass
class RunSummary:
    output: Path
    rows: int
    errors: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    files: int
    device: str
    layout: str

    def lines(self) -> list[str]:
        wall = max(self.wall_s, 1e-9)
        return [
            f"shardgen run: {self.rows:,} rows ({self.errors:,} errors) written to {self.output} ({self.files} files)",
            f"  tokens: {self.prompt_tokens:,} prompt, {self.generated_tokens:,} generated; "
            f"{self.generated_tokens / wall:,.1f} generated tokens/s, {(self.prompt_tokens + self.generated_tokens) / wall:,.1f} total tokens/s",
            f"  wall time {self.wall_s:.1f} s on {self.device} ({self.layout})",
        ]


def build_stages(options: RunOptions, spec) -> list[Stage]:
    from ray.data import ActorPoolStrategy

    model = str(options.model)
    return [
        Stage("tokenize", tokenize.READS, tokenize.WRITES, lambda ds: ds.map_batches(
            tokenize.TokenizeStage, fn_constructor_args=(model, options.chat, options.sampling),
            batch_format="pyarrow", batch_size=options.batch_size, compute=ActorPoolStrategy(min_size=1, max_size=4),
            num_cpus=1)),
        Stage("generate", generate.READS, generate.WRITES, lambda ds: ds.map_batches(
            generate.GenerateStage, fn_constructor_args=(spec,), batch_format="pyarrow", batch_size=options.batch_size,
            compute=ActorPoolStrategy(size=options.replicas, max_tasks_in_flight_per_actor=BATCHES_IN_FLIGHT_PER_REPLICA,
                                      max_concurrent_calls_per_actor=BATCHES_IN_FLIGHT_PER_REPLICA),
            num_cpus=0)),
        Stage("detokenize", detokenize.READS, detokenize.WRITES, lambda ds: ds.map_batches(
            detokenize.DetokenizeStage, fn_constructor_args=(model,), batch_format="pyarrow",
            batch_size=options.batch_size, compute=ActorPoolStrategy(min_size=1, max_size=4), num_cpus=1)),
    ]


def check_stages(stages: list[Stage], columns: tuple[str, ...], sink_reads: tuple[str, ...]) -> None:
    """Each stage's inputs must be written by something before it (a wiring error, not user input)."""
    have = set(columns)
    for stage in stages:
        missing = set(stage.reads) - have
        assert not missing, f"stage {stage.name} reads {missing}, which no earlier stage writes"
        have |= set(stage.writes)
    assert not set(sink_reads) - have, f"the writer reads {set(sink_reads) - have}"


def connect(options: RunOptions) -> None:
    import ray

    if ray.is_initialized():
        return
    quiet = {"log_to_driver": False, "logging_level": "WARNING"}
    if options.address:
        ray.init(address=options.address, **quiet)
        return
    ranks = options.tp * options.replicas
    # A local cluster (its workers inherit this process's environment): enough logical CPUs for every
    # rank plus the CPU stages.
    ray.init(num_cpus=max(os.cpu_count() or 1, ranks + 3), include_dashboard=False, **quiet)


def run(options: RunOptions, echo: Callable[[str], None] = print) -> RunSummary:
    """Run the whole pipeline for ``options``; returns the summary that is also echoed."""
    import ray

    from actors.config import ModelConfig
    from actors.worker import ReplicaSpec

    start = time.perf_counter()
    config = ModelConfig.from_dir(options.model)
    config.check_tp(options.tp)
    files = read.input_files(options.input)
    read.check_columns(files, options.prompt_column)
    existing = write.existing_output(options.output)
    if existing and not options.overwrite:
        raise ValueError(f"--output {options.output} holds another run's output ({len(existing)} part files); "
                         f"pass --overwrite to replace it, or choose another --output")
    connect(options)
    device = options.device
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and options.tp * options.replicas > gpus:
        raise ValueError(f"--tp {options.tp} x --replicas {options.replicas} needs {options.tp * options.replicas} GPUs; "
                         f"the cluster has {gpus:g}")
    cpus = os.cpu_count() or 1
    run_id = uuid.uuid4().hex[:12]
    spec = ReplicaSpec(model_dir=str(options.model.resolve()), tp=options.tp, device=device, dtype=options.dtype,
                       preshuffle=options.preshuffle, engine=options.engine,
                       cpu_threads=max(1, cpus // (options.tp * options.replicas)), run_id=run_id)
    options = replace(options, model=Path(spec.model_dir))
    if existing:
        shutil.rmtree(options.output)
    echo(f"shardgen: {len(files)} input file(s), model {config.architecture} ({'int4 G=%d' % config.quant.group_size if config.quant else 'float'}), "
         f"{options.replicas} replica(s) x tp {options.tp} on {device}")

    ds = read.read_prompts(options.input, options.prompt_column, options.id_column)
    stages = build_stages(options, spec)
    check_stages(stages, read.WRITES, write.READS)
    for stage in stages:
        ds = stage.apply(ds)
    quant = f"torchao int4 plain, group size {config.quant.group_size}" if config.quant else "none"
    sink = write.ParquetSink(options.output, write.run_metadata(
        version=_version(), model=str(options.model), quantization=quant, tp=options.tp, replicas=options.replicas,
        device=device, dtype=options.dtype, sampling_defaults=asdict(options.sampling)))
    try:
        ds.write_datasink(sink)
    finally:
        release_replicas(run_id)
    t = sink.totals
    summary = RunSummary(options.output, t.rows, t.errors, t.prompt_tokens, t.completion_tokens,
                         time.perf_counter() - start, t.files, device, _layout_of(options.output))
    for line in summary.lines():
        echo(line)
    return summary


def release_replicas(run_id: str) -> None:
    """Remove this run's placement groups (and so its ShardWorkers): a placement group made by an actor
    otherwise lives as long as the whole Ray job, holding its GPUs."""
    from ray.util import (
        get_placement_group,
        placement_group_table,
        remove_placement_group,
    )

    from actors.replica import placement_group_name

    prefix = placement_group_name(run_id, "")
    for info in placement_group_table().values():
        if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED":
            remove_placement_group(get_placement_group(info["name"]))


def _layout_of(output: Path) -> str:
    import pyarrow.parquet as pq

    files = write.existing_output(output)
    if not files:
        return "no output"
    meta = pq.read_schema(files[0]).metadata or {}
    return meta.get(b"shardgen.hardware_layout", b"?").decode()


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardgen")
    except PackageNotFoundError:
        return "0+unknown"
