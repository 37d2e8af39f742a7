"""A shardgen run: read -> tokenize -> generate (R replicas x T ranks) -> detokenize -> Parquet.

``run(options)`` is ``execute(plan(options))``: ``plan`` checks and resolves everything (pipeline/plan.py), ``execute``
builds the stages, streams the dataset through them to the output, and summarises.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from shardgen.pipeline import interrupt, output_dir, resume
from shardgen.pipeline.options import RunOptions
from shardgen.pipeline.plan import RunPlan, plan
from shardgen.pipeline.progress import Progress
from shardgen.pipeline.stages import detokenize, generate, read, tokenize, write
from shardgen.pipeline.summary import RunSummary, summarise

# Rows a replica holds per sequence its engine runs at once: the waiting ones refill the engine while a batch's
# last rows finish and the next batch is on its way.
ROWS_IN_FLIGHT_PER_ENGINE_SLOT = 4
MIN_BATCHES_IN_FLIGHT = 4
# The tokenize and detokenize actors live as long as the run but work in short bursts (a batch of 256 prompts
# tokenizes in milliseconds), and a write task only moves bytes: they ask for no CPU of their own, so a replica and
# the read tasks are all a run needs (plan.STAGE_CPUS). The read tasks keep Ray's one CPU: the "batch" stage's
# streaming repartition fuses into them only when both ask for the same.
STAGE_ACTOR_CPUS = 0


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


def build_stages(p: RunPlan, finished: resume.FinishedIds | None, flush: generate.Flush) -> list[Stage]:
    """The stages after the read, in order; each declares the columns it reads and writes (``check_stages``)."""
    from ray.data import ActorPoolStrategy

    o = p.options
    model, batch = str(o.model), o.batch_size
    in_flight = batches_in_flight(batch, o.engine.max_num_seqs)
    stages = []
    if finished:
        stages.append(Stage("skip-finished", resume.READS, resume.WRITES, lambda ds: ds.map_batches(
            resume.skip_finished, fn_kwargs={"handles": finished.handles}, batch_format="pyarrow", batch_size=8192)))
    # Blocks of one batch: a big input file would otherwise be one block, generated and written as one file at its
    # very end, so a lost driver would lose all of it. Small blocks stream through and land as they finish.
    stages += [
        Stage("batch", (), (), lambda ds: ds.repartition(target_num_rows_per_block=batch)),
        Stage("tokenize", tokenize.READS, tokenize.WRITES, lambda ds: ds.map_batches(
            tokenize.TokenizeStage, fn_constructor_args=(model, o.chat, o.sampling), batch_format="pyarrow",
            batch_size=batch, compute=ActorPoolStrategy(min_size=1, max_size=4), num_cpus=STAGE_ACTOR_CPUS)),
        Stage("generate", generate.READS, generate.WRITES, lambda ds: ds.map_batches(
            generate.GenerateStage, fn_constructor_args=(p.spec, flush), batch_format="pyarrow", batch_size=batch,
            compute=ActorPoolStrategy(size=o.replicas, max_tasks_in_flight_per_actor=in_flight,
                                      max_concurrent_calls_per_actor=in_flight),
            num_cpus=0)),
        Stage("detokenize", detokenize.READS, detokenize.WRITES, lambda ds: ds.map_batches(
            detokenize.DetokenizeStage, fn_constructor_args=(model,), batch_format="pyarrow", batch_size=batch,
            compute=ActorPoolStrategy(min_size=1, max_size=4), num_cpus=STAGE_ACTOR_CPUS)),
    ]
    return stages


def check_stages(stages: list[Stage], columns: tuple[str, ...], sink_reads: tuple[str, ...]) -> None:
    """Each stage's inputs must be written by something before it (a wiring error, not user input)."""
    have = set(columns)
    for stage in stages:
        missing = set(stage.reads) - have
        assert not missing, f"stage {stage.name} reads {missing}, which no earlier stage writes"
        have |= set(stage.writes)
    assert not set(sink_reads) - have, f"the writer reads {set(sink_reads) - have}"


def run(options: RunOptions, echo: Callable[[str], None] = print, progress: TextIO | None = None) -> RunSummary:
    """Run the whole pipeline for ``options``; returns the summary that is also echoed. ``progress``: where the
    progress line goes (redrawn in place on a terminal), None for none.

    Everything a user can get wrong is checked before any worker starts (``plan``). Rerunning the same command on
    the same output resumes: rows already written are skipped."""
    return execute(plan(options), echo, progress)


def execute(p: RunPlan, echo: Callable[[str], None] = print, progress: TextIO | None = None) -> RunSummary:
    """Run a checked plan: prepare the output, stream the rows through the stages, write them, summarise."""
    import ray

    o, output = p.options, p.output
    if o.overwrite:
        cleared = output_dir.clear_output(output)
        if cleared:
            echo(f"shardgen: {cleared}")
    output_dir.remove_partial_writes(output)
    output_dir.write_manifest(output, p.manifest)
    finished = resume.FinishedIds.load(p.resume_from) if p.resume_from else None
    quant = f"int4 G={p.model.quant.group_size}" if p.model.quant else "float"
    echo(f"shardgen: {len(p.files)} input file(s), model {p.model.architecture} ({quant}), {o.replicas} replica(s) x "
         f"tp {o.tp} on {p.device}; set up in {time.perf_counter() - p.started:.1f} s (Ray's start "
         f"{p.ray_start_s:.1f} s)" + (f"; resuming: {finished.rows:,} rows already in {o.output}" if finished else ""))
    run_id = p.spec.run_id
    control = interrupt.start_control(run_id)
    flush = generate.Flush(output, p.metadata, p.spec.model_dir, control=interrupt.control_name(run_id))
    stages = build_stages(p, finished, flush)
    check_stages(stages, read.WRITES, write.READS)
    ds = read.read_prompts(p.files, p.root, o.prompt_column, p.id_column, o.input_format)
    for stage in stages:
        ds = stage.apply(ds)
    todo = p.input_rows - (finished.inputs if finished else 0) if p.input_rows is not None else None
    before = write.existing_output(output)
    watch = None
    if progress is not None:
        watch = Progress(output, todo, progress, tokens=lambda: ray.get(control.generated.remote(), timeout=5)).start()
    try:
        with interrupt.stop_on_signals(control, lambda: len(write.existing_output(output)), echo) as stop:
            ds.write_datasink(write.ParquetSink(output, p.metadata), ray_remote_args={"num_cpus": 0})
            if stop.requested:  # the stages returned early and the dataset ran out before the drain stopped it
                raise KeyboardInterrupt
        layouts, cached = _reported(control)
    except KeyboardInterrupt:
        safe = write.rows_in(write.existing_output(output))
        raise interrupt.Interrupted(
            f"interrupted: {safe:,} rows are safe in {o.output} ({safe - write.rows_in(before):,} written by "
            f"this run); rerun the same command to resume (finished rows are skipped)") from None
    except Exception as e:  # a stage gave up (a replica that keeps failing, say): say why, keep what was written
        raise RuntimeError(f"the job stopped: {root_cause(e)}. Rows written so far stay in {o.output}; rerun "
                           f"the same command to resume") from e
    finally:
        if watch is not None:
            watch.stop()
        release_replicas(run_id)
        ray.kill(control)
        if finished:
            finished.close()
    summary = summarise(output, before, time.perf_counter() - p.started, p.device, layouts,
                        finished.rows if finished else 0, cached)
    for line in summary.lines():
        echo(line)
    if o.output_format == "openai-batch":
        from shardgen.pipeline.openai_output import write_batch_output

        lines = write_batch_output(output, p.files, Path(o.model))
        echo(f"shardgen: {lines:,} responses in {output.child(output_dir.OPENAI_BATCH_OUTPUT)}")
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


def _reported(control) -> tuple[list[str], int]:
    """The hardware layouts this run's replicas reported and the prompt tokens their prefix caches gave (none and 0
    if the run's control actor cannot say)."""
    import ray

    try:
        return ray.get([control.layouts.remote(), control.cached.remote()], timeout=30)
    except ray.exceptions.RayError:
        return [], 0
