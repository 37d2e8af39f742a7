"""``plan(options) -> RunPlan``: every check of a run and everything it resolves (files, device, dtype, batch size,
the replicas' spec, what to resume), once, before anything is written. ``pipeline.run.execute`` then only runs it."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from shardgen.actors.int4 import rules
from shardgen.actors.model.config import ModelConfig, resolved_dtype_name
from shardgen.actors.worker import ReplicaSpec
from shardgen.pipeline import output_dir, preflight, resume
from shardgen.pipeline.options import ProcessorConfig, RunOptions
from shardgen.pipeline.stages import read, write
from shardgen.pipeline.storage import Location

# Each batch costs the pipeline something however many rows it has: batches of 256 rows kept up with the engine
# alone, smaller ones did not (benchmarks/pipeline_vs_engine.py; figures in benchmarks/README.md). Small inputs get
# smaller batches, so every replica still gets several.
MAX_AUTO_BATCH_SIZE = 256
BATCHES_PER_REPLICA_AT_LEAST = 4
# Logical CPUs the Ray Data stages need besides the ranks: one for the read tasks (with the batch stage fused into
# them); the tokenize and detokenize actors and the write tasks ask for none (run.STAGE_ACTOR_CPUS).
STAGE_CPUS = 1
# Loggers whose lines tell a shardgen user nothing (shown with `verbose`): Ray Data's per-operator progress dump
# every 10 s and its execution plan, and, on a local cluster that shardgen starts, the token-authentication notice.
QUIET_LOGGERS = ("ray.data", "ray._private.authentication.authentication_token_setup")


@dataclass(frozen=True)
class RunPlan:
    """A checked run: what ``execute`` needs, each thing resolved once."""

    options: RunOptions  # the model path absolute and the batch size decided
    replicas: ReplicaPlan  # the model, device, dtype and the replicas' spec
    files: list[Location]
    root: Location  # the input files are named relative to it
    id_column: str | None  # None: ids are <file>:<row>
    output: Location
    carried: dict  # the input's other columns, carried into the output: name -> Arrow type
    resume_from: list[Location]  # finished part files of an earlier run of the same options
    manifest: dict  # what decides a row's completion (the run record)
    input_rows: int | None  # None: too costly to count
    metadata: dict[str, str]  # the Parquet key-value metadata of every part file
    started: float  # time.perf_counter() when planning began


@dataclass(frozen=True)
class ReplicaPlan:
    """The replicas of a processor, resolved on the cluster it attached to."""

    config: ProcessorConfig  # the model path absolute and the batch size decided
    model: ModelConfig
    device: str  # "cpu" or "cuda"
    dtype: str  # resolved: bfloat16, float16 or float32
    spec: ReplicaSpec
    ray_start_s: float  # Ray's start took this long


def plan_replicas(config: ProcessorConfig, model: ModelConfig | None = None, quiet: bool = True) -> ReplicaPlan:
    """Attach to the cluster (or start one) and resolve what each replica runs, refusing a model, cluster or layout
    that cannot run. ``model``: the checkpoint as already checked (None: check it here). ``quiet``: replace Ray
    Data's progress output with shardgen's (a run's own), which a library caller keeps."""
    import ray

    if model is None:
        preflight.check_model_files(config)
        model = preflight.check_model(config)
    ray_start = time.perf_counter()
    connect(config, quiet)
    ray_start_s = time.perf_counter() - ray_start
    resources = ray.cluster_resources()
    device = resolve_device(config.device, resources.get("GPU", 0))
    check_cluster(resources, device, config.tp, config.replicas)
    check_int4(model, device, config)
    config = replace(config, model=config.model.resolve(), batch_size=config.batch_size or MAX_AUTO_BATCH_SIZE)
    spec = ReplicaSpec(model_dir=str(config.model), tp=config.tp, device=device, dtype=config.dtype,
                       int4_layout=config.int4_layout, engine=config.engine,
                       kernel_cache_dir=str(config.kernel_cache_dir) if config.kernel_cache_dir else None,
                       cpu_threads=max(1, (os.cpu_count() or 1) // (config.tp * config.replicas)),
                       run_id=uuid.uuid4().hex[:12], allow_pickle=config.allow_pickle)
    return ReplicaPlan(config, model, device, resolved_dtype_name(config.dtype, device), spec, ray_start_s)


def plan(options: RunOptions) -> RunPlan:
    """Check ``options`` against the files, the model and the cluster, and resolve the run.

    Everything a user can get wrong (checkpoint, input, output, options, cluster size) is refused here with a
    message naming it, before any worker starts and before anything is written."""
    started = time.perf_counter()
    files = preflight.check_files(options)
    model = preflight.check_model(options)
    ids_checked = files.id_column is not None and sum(f.size() for f in files.files) <= resume.LOCAL_ID_CHECK_BYTES
    if ids_checked:
        resume.check_unique_ids_locally(files.files, files.id_column)
    fields = run_manifest(options)
    resume_from = output_dir.plan_output(files.output, fields, options.overwrite, write.existing_output(files.output))
    input_rows = read.count_rows(files.files)
    options = replace(options, batch_size=options.batch_size or auto_batch_size(input_rows, options.replicas))
    replicas = plan_replicas(options, model)
    if files.id_column is not None and not ids_checked:  # a big input: its ids are checked by a Ray Data pass
        dataset = read.read_prompts(files.files, files.root, options.prompt_column, files.id_column,
                                    options.input_format)
        resume.check_unique_ids(dataset, files.id_column, read.estimate_rows(files.files))
    quant = f"torchao int4 plain, group size {model.quant.group_size}" if model.quant else "none"
    metadata = write.run_metadata(
        version=_version(), model=str(replicas.config.model), quantization=quant, tp=options.tp,
        replicas=options.replicas, device=replicas.device, dtype=replicas.dtype,
        sampling_defaults=asdict(options.sampling))
    return RunPlan(replicas.config, replicas, files.files, files.root, files.id_column, files.output, files.carried,
                   resume_from, fields, input_rows, metadata, started)


def run_manifest(options: RunOptions) -> dict:
    """The options that decide what a row's completion is: a rerun with the same ones resumes the output."""
    return output_dir.manifest(model=Path(options.model).resolve(), input=Location.of(options.input).key,
                           prompt_column=options.prompt_column, id_column=options.id_column, chat=options.chat,
                           # only when set: outputs of runs from before the option resume as they were
                           **({"input_format": options.input_format} if options.input_format != "auto" else {}),
                           **{k: getattr(options, k) for k in ("chat_template", "system_prompt")
                              if getattr(options, k) is not None},
                           sampling=asdict(options.sampling), max_model_len=options.engine.max_model_len)


def auto_batch_size(rows: int | None, replicas: int) -> int:
    """The batch size when none is given: 256 rows, or fewer when the input (``rows``; None: too big to count
    cheaply) would give a replica under 4 batches."""
    if rows is None:
        return MAX_AUTO_BATCH_SIZE
    return max(1, min(MAX_AUTO_BATCH_SIZE, -(-rows // (replicas * BATCHES_PER_REPLICA_AT_LEAST))))


def resolve_device(device: str, gpus: float) -> str:
    """``auto`` is cuda on a cluster with GPUs, else cpu; cuda on a cluster without is refused."""
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise ValueError("`device` cuda: the cluster has no CUDA GPU; use `device` cpu (or auto), or attach to a "
                         "cluster with GPUs through `address`")
    return device


def check_int4(model: ModelConfig, device: str, config: ProcessorConfig) -> None:
    """The checkpoint's int4 group size and the asked layout run on ``device``."""
    if model.quant:
        rules.check_group_size(model.quant.group_size, f"{config.model}/config.json")
        if device == "cuda":
            rules.check_cuda_group_size(model.quant.group_size)
    if device == "cpu":
        from shardgen.actors import int4

        int4.hardware_layout("cpu", config.int4_layout)  # refuses a GPU layout before any worker starts


def check_cluster(resources: dict[str, float], device: str, tp: int, replicas: int) -> None:
    """Refuse a cluster too small for the run, before anything waits on it: each rank takes 1 CPU (and 1 GPU on
    cuda), and the stages ``STAGE_CPUS`` more. Without this check the run waits for resources that never come."""
    ranks = tp * replicas
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if device == "cuda" and ranks > gpus:
        raise ValueError(f"`tp` {tp} x `replicas` {replicas} needs {ranks} GPUs; the cluster has {gpus:g}; lower "
                         f"`replicas` or `tp`")
    need = ranks + STAGE_CPUS
    if cpus < need:
        raise ValueError(f"the Ray cluster has {cpus:g} CPUs; this run needs {need} ({ranks} for `tp` {tp} x "
                         f"`replicas` {replicas}, one a rank, and {STAGE_CPUS} for reading the input); start the head "
                         f"with more logical CPUs (ray start --head --num-cpus={need}), add a node, or lower `replicas` "
                         f"or `tp`")


def connect(config: ProcessorConfig, quiet: bool = True) -> None:
    """Attach to the cluster at ``config.address``, or start a local one with a CPU for every rank and stage; one
    already attached is kept. ``quiet``: shardgen's progress line replaces Ray Data's (unless ``verbose``)."""
    import ray

    if quiet and not config.verbose:
        quiet_ray()
    if ray.is_initialized():
        return
    logs = {"log_to_driver": config.verbose, "logging_level": "INFO" if config.verbose else "WARNING"}
    if config.address:
        try:
            ray.init(address=config.address, **logs)
        except ConnectionError as e:
            raise ValueError(f"could not attach to the Ray cluster at `address` {config.address} ({e}); start one "
                             f"there (ray start --head), give the address `ray start` printed, or leave `address` "
                             f"out to start a local cluster") from e
        return
    ranks = config.tp * config.replicas
    # A local cluster (its workers inherit this process's environment).
    ray.init(num_cpus=max(os.cpu_count() or 1, ranks + STAGE_CPUS), include_dashboard=False, **logs)


def quiet_ray() -> None:
    """shardgen's progress line replaces Ray Data's progress output."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shardgen")
    except PackageNotFoundError:
        return "0+unknown"
