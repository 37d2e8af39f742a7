"""A shardgen run: read -> tokenize -> generate (R replicas x T ranks) -> detokenize -> Parquet."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, TextIO

from shardgen.actors import int4
from shardgen.actors.model.config import resolved_dtype_name
from shardgen.pipeline import checks, detokenize, generate, interrupt, read, resume, tokenize, write
from shardgen.pipeline.progress import Progress
from shardgen.pipeline.storage import Location
from shardgen.pipeline.options import RunOptions

# Rows a replica holds per sequence its engine runs at once: the waiting ones refill the engine while a batch's
# last rows finish and the next batch is on its way.
ROWS_IN_FLIGHT_PER_ENGINE_SLOT = 4
MIN_BATCHES_IN_FLIGHT = 4
# Each batch costs the pipeline something however many rows it has (H100, mixed workload, 1,024 rows in flight:
# from the replica's start to the last row written, batches of 64 rows ran at 0.83x the engine alone, 128 at
# 0.93x, 256 at 1.00x; benchmarks/pipeline_vs_engine.py). Small inputs get smaller batches, so every replica
# still gets several.
MAX_AUTO_BATCH_SIZE = 256
BATCHES_PER_REPLICA_AT_LEAST = 4


def auto_batch_size(rows: int | None, replicas: int) -> int:
    """``--batch-size`` when not given: 256 rows, or fewer when the input (``rows``; None: too big to count
    cheaply) would give a replica under 4 batches."""
    if rows is None:
        return MAX_AUTO_BATCH_SIZE
    return max(1, min(MAX_AUTO_BATCH_SIZE, -(-rows // (replicas * BATCHES_PER_REPLICA_AT_LEAST))))


def batches_in_flight(batch_size: int, max_num_seqs: int) -> int:
    """Ray Data batches each replica is given at once: enough for 4 waves of its engine, at most what rank 0
    serves concurrently."""
    from shardgen.actors.replica import RANK0_CONCURRENCY

    wanted = -(-ROWS_IN_FLIGHT_PER_ENGINE_SLOT * max_num_seqs // batch_size)
    return min(max(MIN_BATCHES_IN_FLIGHT, wanted), RANK0_CONCURRENCY)


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline and the columns it reads and writes."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    apply: Callable


@dataclass
class RunSummary:
    output: Location
    rows: int
    errors: int
    prompt_tokens: int
    generated_tokens: int
    wall_s: float
    files: int
    device: str
    layout: str
    resumed: int = 0  # rows a resumed run found already written

    def lines(self) -> list[str]:
        wall = max(self.wall_s, 1e-9)
        before = f"; {self.resumed:,} rows were there already" if self.resumed else ""
        return [
            f"shardgen run: {self.rows:,} rows ({self.errors:,} errors) written to {self.output} ({self.files} files){before}",
            f"  tokens: {self.prompt_tokens:,} prompt, {self.generated_tokens:,} generated; "
            f"{self.generated_tokens / wall:,.1f} generated tokens/s, {(self.prompt_tokens + self.generated_tokens) / wall:,.1f} total tokens/s",
            f"  wall time {self.wall_s:.1f} s on {self.device} ({self.layout})",
        ]


def build_stages(options: RunOptions, spec, flush: generate.Flush) -> list[Stage]:
    from ray.data import ActorPoolStrategy

    model = str(options.model)
    in_flight = batches_in_flight(options.batch_size, options.engine.max_num_seqs)
    return [
        Stage("tokenize", tokenize.READS, tokenize.WRITES, lambda ds: ds.map_batches(
            tokenize.TokenizeStage, fn_constructor_args=(model, options.chat, options.sampling),
            batch_format="pyarrow", batch_size=options.batch_size, compute=ActorPoolStrategy(min_size=1, max_size=4),
            num_cpus=1)),
        Stage("generate", generate.READS, generate.WRITES, lambda ds: ds.map_batches(
            generate.GenerateStage, fn_constructor_args=(spec, flush), batch_format="pyarrow", batch_size=options.batch_size,
            compute=ActorPoolStrategy(size=options.replicas, max_tasks_in_flight_per_actor=in_flight,
                                      max_concurrent_calls_per_actor=in_flight),
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


# Loggers whose lines tell a shardgen user nothing (shown with --verbose): Ray Data's per-operator progress dump
# every 10 s and its execution plan, and, on a local cluster that shardgen starts, the token-authentication notice.
QUIET_LOGGERS = ("ray.data", "ray._private.authentication.authentication_token_setup")


def quiet_ray() -> None:
    """shardgen's progress line replaces Ray Data's progress output."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def connect(options: RunOptions) -> None:
    import ray

    if not options.verbose:
        quiet_ray()
    if ray.is_initialized():
        return
    quiet = {"log_to_driver": options.verbose, "logging_level": "INFO" if options.verbose else "WARNING"}
    if options.address:
        ray.init(address=options.address, **quiet)
        return
    ranks = options.tp * options.replicas
    # A local cluster (its workers inherit this process's environment): enough logical CPUs for every
    # rank plus the CPU stages.
    ray.init(num_cpus=max(os.cpu_count() or 1, ranks + STAGE_CPUS), include_dashboard=False, **quiet)


# Logical CPUs the Ray Data stages hold besides the ranks: a tokenize and a detokenize actor (1 CPU each, held for
# the whole run) and one CPU for the read, batch and write tasks.
STAGE_CPUS = 3


def check_cluster(resources: dict[str, float], device: str, tp: int, replicas: int) -> None:
    """Refuse a cluster too small for the run, before anything waits on it: each rank takes 1 CPU (and 1 GPU on
    cuda), and the stages ``STAGE_CPUS`` more. Without this check the run waits for resources that never come."""
    ranks = tp * replicas
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if device == "cuda" and ranks > gpus:
        raise ValueError(f"--tp {tp} x --replicas {replicas} needs {ranks} GPUs; the cluster has {gpus:g}; lower "
                         f"--replicas or --tp")
    need = ranks + STAGE_CPUS
    if cpus < need:
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs; this run needs {need} ({ranks} for --tp {tp} x "
                         f"--replicas {replicas}, one a rank, and {STAGE_CPUS} for reading, tokenizing, detokenizing "
                         f"and writing); start the head with more logical CPUs (ray start --head --num-cpus={need}), "
                         f"add a node, or lower --replicas or --tp")


def run(options: RunOptions, echo: Callable[[str], None] = print, progress: TextIO | None = None) -> RunSummary:
    """Run the whole pipeline for ``options``; returns the summary that is also echoed. ``progress``: where the
    progress line goes (redrawn in place on a terminal), None for none.

    Everything a user can get wrong (checkpoint, input, output, options) is checked before any worker starts.
    Rerunning the same command on the same ``--output`` resumes: rows already written are skipped."""
    import ray

    from shardgen.actors.worker import ReplicaSpec

    start = time.perf_counter()
    plan = checks.check_files(options)
    files, id_column, output = plan.files, plan.id_column, plan.output  # id_column None: ids are <file>:<row>
    config = checks.check_model(options)
    ids_checked = id_column is not None and sum(f.size() for f in files) <= resume.LOCAL_ID_CHECK_BYTES
    if ids_checked:
        resume.check_unique_ids_locally(files, id_column)
    existing = write.existing_output(output)
    fields = run_manifest(options)
    done_files = resume.plan_output(output, fields, options.overwrite, existing)
    ray_start = time.perf_counter()
    connect(options)
    ray_up = time.perf_counter()
    device = options.device
    gpus = ray.cluster_resources().get("GPU", 0)
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise ValueError("--device cuda: the cluster has no CUDA GPU; use --device cpu (or auto), or attach to a "
                         "cluster with GPUs through --address")
    check_cluster(ray.cluster_resources(), device, options.tp, options.replicas)
    if config.quant:
        int4.check_group_size(config.quant.group_size, f"{options.model}/config.json")
    if device == "cuda" and config.quant and options.int4_layout != int4.LAYOUT_TILED:
        int4.check_cuda_group_size(config.quant.group_size)
    if device == "cpu":
        int4.hardware_layout("cpu", options.int4_layout)  # refuses a GPU layout before any worker starts
    cpus = os.cpu_count() or 1
    run_id = uuid.uuid4().hex[:12]
    spec = ReplicaSpec(model_dir=str(options.model.resolve()), tp=options.tp, device=device, dtype=options.dtype,
                       int4_layout=options.int4_layout, engine=options.engine,
                       kernel_cache_dir=str(options.kernel_cache_dir) if options.kernel_cache_dir else None,
                       cpu_threads=max(1, cpus // (options.tp * options.replicas)), run_id=run_id,
                       allow_pickle=options.allow_pickle)
    input_rows = read.count_rows(files)
    batch_size = options.batch_size or auto_batch_size(input_rows, options.replicas)
    options = replace(options, model=Path(spec.model_dir), batch_size=batch_size)
    ds = read.read_prompts(files, plan.root, options.prompt_column, id_column)
    if id_column is not None and not ids_checked:
        resume.check_unique_ids(ds, id_column, read.estimate_rows(files))
    if options.overwrite:
        cleared = resume.clear_output(output)
        if cleared:
            echo(f"shardgen: {cleared}")
    resume.remove_partial_writes(output)
    resume.write_manifest(output, fields)
    finished = resume.FinishedIds.load(done_files) if done_files else None
    echo(f"shardgen: {len(files)} input file(s), model {config.architecture} ({'int4 G=%d' % config.quant.group_size if config.quant else 'float'}), "
         f"{options.replicas} replica(s) x tp {options.tp} on {device}; set up in "
         f"{time.perf_counter() - start:.1f} s (Ray's start {ray_up - ray_start:.1f} s)"
         + (f"; resuming: {finished.rows:,} rows already in {options.output}" if finished else ""))

    quant = f"torchao int4 plain, group size {config.quant.group_size}" if config.quant else "none"
    metadata = write.run_metadata(
        version=_version(), model=str(options.model), quantization=quant, tp=options.tp, replicas=options.replicas,
        device=device, dtype=resolved_dtype_name(options.dtype, device), sampling_defaults=asdict(options.sampling))
    control = interrupt.start_control(run_id)
    flush = generate.Flush(output, metadata, spec.model_dir, control=interrupt.control_name(run_id))
    stages = build_stages(options, spec, flush)
    # Blocks of one batch: a big input file would otherwise be one block, generated and written as one file
    # at its very end, so a lost driver would lose all of it. Small blocks stream through and land as they finish.
    stages.insert(0, Stage("batch", (), (), lambda ds: ds.repartition(target_num_rows_per_block=options.batch_size)))
    if finished:
        stages.insert(0, Stage("skip-finished", resume.READS, resume.WRITES, lambda ds: ds.map_batches(
            resume.skip_finished, fn_kwargs={"handles": finished.handles}, batch_format="pyarrow", batch_size=8192)))
    check_stages(stages, read.WRITES, write.READS)
    for stage in stages:
        ds = stage.apply(ds)
    sink = write.ParquetSink(output, metadata)
    todo = input_rows - (finished.rows if finished else 0) if input_rows is not None else None
    before = write.existing_output(output)
    watch = None
    if progress is not None:
        watch = Progress(output, todo, progress,
                         tokens=lambda: ray.get(control.generated.remote(), timeout=5)).start()
    try:
        with interrupt.stop_on_signals(control, lambda: len(write.existing_output(output)), echo) as stop:
            ds.write_datasink(sink)
            if stop.requested:  # the stages returned early and the dataset ran out before the drain stopped it
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        safe = write.rows_in(write.existing_output(output))
        raise interrupt.Interrupted(
            f"interrupted: {safe:,} rows are safe in {options.output} ({safe - write.rows_in(before):,} written by "
            f"this run); rerun the same command to resume (finished rows are skipped)") from None
    except Exception as e:  # a stage gave up (a replica that keeps failing, say): say why, keep what was written
        raise RuntimeError(f"the job stopped: {root_cause(e)}. Rows written so far stay in {options.output}; rerun "
                           f"the same command to resume") from e
    finally:
        if watch is not None:
            watch.stop()
        release_replicas(run_id)
        ray.kill(control)
        if finished:
            finished.close()
    # counted from the files: rows written early by the generate stage never pass the sink
    t = write.WriteStats()
    seen = {f.path for f in before}
    written = [f for f in write.existing_output(output) if f.path not in seen]
    for path in written:
        t.add(write.read_stats(path))
    summary = RunSummary(output, t.rows, t.errors, t.prompt_tokens, t.completion_tokens,
                         time.perf_counter() - start, t.files, device, _layouts(written),
                         resumed=finished.rows if finished else 0)
    for line in summary.lines():
        echo(line)
    return summary


def root_cause(e: BaseException) -> str:
    """The last line of the innermost error under Ray's wrappers (``RuntimeError: ...``)."""
    while True:
        inner = getattr(e, "cause", None) or e.__cause__
        if not isinstance(inner, BaseException) or inner is e:
            break
        e = inner
    lines = str(e).strip().splitlines()
    return lines[-1] if lines else type(e).__name__


def run_manifest(options: RunOptions) -> dict:
    """The options that decide what a row's completion is: a rerun with the same ones resumes the output."""
    return resume.manifest(model=Path(options.model).resolve(), input=Location.of(options.input).key,
                           prompt_column=options.prompt_column, id_column=options.id_column, chat=options.chat,
                           sampling=asdict(options.sampling), max_model_len=options.engine.max_model_len)


def release_replicas(run_id: str) -> None:
    """Remove this run's placement groups (and so its ShardWorkers): a placement group made by an actor
    otherwise lives as long as the whole Ray job, holding its GPUs."""
    from ray.util import (
        get_placement_group,
        placement_group_table,
        remove_placement_group,
    )

    from shardgen.actors.replica import placement_group_name

    prefix = placement_group_name(run_id, "")
    for info in placement_group_table().values():
        if info.get("name", "").startswith(prefix) and info.get("state") != "REMOVED":
            remove_placement_group(get_placement_group(info["name"]))


def _layouts(files: list[Location]) -> str:
    """The hardware layouts that wrote ``files`` (this run's: a resumed output may hold another GPU's files)."""
    import pyarrow.parquet as pq

    names = set()
    for f in files:
        meta = pq.ParquetFile(f.open()).schema_arrow.metadata or {}
        names.update(meta.get(b"shardgen.hardware_layout", b"?").decode().split(","))
    return ", ".join(sorted(names - {""})) or "nothing written"


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardgen")
    except PackageNotFoundError:
        return "0+unknown"
