"""A shardgen run: read -> [skip finished] -> the processor's stages (tokenize, generate on R replicas x T ranks,
detokenize; pipeline/processor.py) -> Parquet.

``run(options)`` is ``execute(plan(options))``: ``plan`` checks and resolves everything (pipeline/plan.py), ``execute``
builds the stages, streams the dataset through them to the output, and summarises.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, TextIO

from shardgen.pipeline import interrupt, output_dir, resume
from shardgen.pipeline.options import RunOptions
from shardgen.pipeline.plan import RunPlan, plan
from shardgen.pipeline.progress import Progress
from shardgen.pipeline.processor import Stage, check_stages, generation_stages, release_replicas
from shardgen.pipeline.stages import generate, read, write
from shardgen.pipeline.summary import RunSummary, summarise


def run(options: RunOptions, echo: Callable[[str], None] = print, progress: TextIO | None = None) -> RunSummary:
    """Run the whole pipeline for ``options``; returns the summary that is also echoed. ``progress``: where the
    progress line goes (redrawn in place on a terminal), None for none.

    Everything a user can get wrong is checked before any worker starts (``plan``). Rerunning the same command on
    the same output resumes: rows already written are skipped."""
    return execute(plan(options), echo, progress)


def resume_stage(finished: resume.FinishedIds) -> Stage:
    """Leaves out the rows an earlier run of the same options wrote."""
    return Stage("skip-finished", resume.READS, resume.WRITES, lambda ds: ds.map_batches(
        resume.skip_finished, fn_kwargs={"handles": finished.handles}, batch_format="pyarrow", batch_size=8192))


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
    r = p.replicas
    quant = f"int4 G={r.model.quant.group_size}" if r.model.quant else "float"
    echo(f"shardgen: {len(p.files)} input file(s), model {r.model.architecture} ({quant}), {o.replicas} replica(s) x "
         f"tp {o.tp} on {r.device}; set up in {time.perf_counter() - p.started:.1f} s (Ray's start "
         f"{r.ray_start_s:.1f} s)" + (f"; resuming: {finished.rows:,} rows already in {o.output}" if finished else ""))
    run_id = r.spec.run_id
    control = interrupt.start_control(run_id)
    flush = generate.Flush(output, p.metadata, r.spec.model_dir, control=interrupt.control_name(run_id))
    todo = p.input_rows - (finished.inputs if finished else 0) if p.input_rows is not None else None
    stages = ([resume_stage(finished)] if finished else []) + generation_stages(r, flush, rows=todo)
    check_stages(stages, read.WRITES, write.READS)
    ds = read.read_prompts(p.files, p.root, o.prompt_column, p.id_column, o.input_format, p.carried)
    for stage in stages:
        ds = stage.apply(ds)
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
    summary = summarise(output, before, time.perf_counter() - p.started, r.device, layouts,
                        finished.rows if finished else 0, cached)
    for line in summary.lines():
        echo(line)
    if o.single_file is not None:
        from shardgen.pipeline.single_file import write_single_file

        rows = write_single_file(o.single_file, output, p.files, p.root, o.prompt_column, p.id_column,
                                 o.input_format)
        echo(f"shardgen: {rows:,} rows in input order in {o.single_file}")
    if o.output_format == "openai-batch":
        from shardgen.pipeline.openai_output import write_batch_output

        lines = write_batch_output(output, p.files, Path(o.model))
        echo(f"shardgen: {lines:,} responses in {output.child(output_dir.OPENAI_BATCH_OUTPUT)}")
    return summary


def root_cause(e: BaseException) -> str:
    """What stopped the job, in one line: a generate stage's giving up (its own message, wherever Ray's wrappers put
    it), else the last line of the innermost error under them (``RuntimeError: ...``)."""
    chain, seen = [], set()
    while isinstance(e, BaseException) and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    gave_up = generate.GAVE_UP.findall("\n".join(str(x) for x in chain))
    if gave_up:
        return gave_up[-1]
    # Ray 2.60 ends a failed task's message with a hint on retrying it: not the cause
    lines = [line for line in str(chain[-1]).strip().splitlines()
             if line.strip() and not line.startswith("To change retry")]
    return lines[-1] if lines else type(chain[-1]).__name__


def _reported(control) -> tuple[list[str], int]:
    """The hardware layouts this run's replicas reported and the prompt tokens their prefix caches gave (none and 0
    if the run's control actor cannot say)."""
    import ray

    try:
        return ray.get([control.layouts.remote(), control.cached.remote()], timeout=30)
    except ray.exceptions.RayError:
        return [], 0
