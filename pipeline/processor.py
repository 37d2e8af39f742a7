"""``build_processor(config)``: shardgen's stages on a Ray Dataset of prompts, as ``ray.data.llm.build_processor``
gives vLLM's, so that a user composes them with their own reads, maps and writes:

    import ray, shardgen

    processor = shardgen.build_processor(shardgen.ProcessorConfig(model="./model-int4", tp=2, replicas=4))
    out = processor(ray.data.read_parquet("s3://bucket/prompts/"))   # lazy, as every Dataset
    out.write_parquet("s3://bucket/completions/")

The processor is a list of stages (batch -> tokenize -> generate -> detokenize), each declaring the columns it reads
and writes. ``shardgen run`` is the same stages behind its own file reader, with resume in front and the Parquet
writer behind (pipeline/run.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from shardgen.pipeline.columns import OUTPUT_SCHEMA
from shardgen.pipeline.options import ProcessorConfig
from shardgen.pipeline.plan import ReplicaPlan, plan_replicas
from shardgen.pipeline.stages import dataset, detokenize, generate, tokenize

# Rows a replica holds per sequence its engine runs at once: the waiting ones refill the engine while a batch's
# last rows finish and the next batch is on its way.
ROWS_IN_FLIGHT_PER_ENGINE_SLOT = 4
MIN_BATCHES_IN_FLIGHT = 4
# The tokenize and detokenize actors live as long as the run but work in short bursts (a batch of 256 prompts
# tokenizes in milliseconds), and a write task only moves bytes: they ask for no CPU of their own, so a replica and
# the read tasks are all a run needs (plan.STAGE_CPUS). The read tasks keep Ray's one CPU: the "batch" stage's
# streaming repartition fuses into them only when both ask for the same.
STAGE_ACTOR_CPUS = 0


def batches_in_flight(batch_size: int, max_num_seqs: int, rows: int | None = None, replicas: int = 1) -> int:
    """Ray Data batches each replica is given at once: enough for 4 waves of its engine, at most what rank 0
    serves concurrently, and at most its share of the input's batches when ``rows`` is known: Ray Data hands every
    batch to the first ready actor up to this depth, so a small input would otherwise run on one replica alone."""
    from shardgen.actors.replica import RANK0_CONCURRENCY

    wanted = -(-ROWS_IN_FLIGHT_PER_ENGINE_SLOT * max_num_seqs // batch_size)
    depth = min(max(MIN_BATCHES_IN_FLIGHT, wanted), RANK0_CONCURRENCY)
    if rows is not None and rows > 0:
        batches = -(-rows // batch_size)
        depth = min(depth, -(-batches // replicas))
    return depth


@dataclass(frozen=True)
class Stage:
    """One step of the pipeline and the columns it reads and writes."""

    name: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    apply: Callable


def generation_stages(r: ReplicaPlan, flush: generate.Flush | None = None, output_only: bool = False,
                      rows: int | None = None) -> list[Stage]:
    """batch -> tokenize -> generate -> detokenize, from (id, prompt, row) to the output columns. ``flush``: where
    the generate stage writes finished rows before their batch is done (a run's output); None returns every row.
    ``output_only``: the last stage returns the output columns alone (else the writer picks them, and the layout).
    ``rows``: the rows to generate, where known, so that a small input is shared among the replicas."""
    from ray.data import ActorPoolStrategy

    c = r.config
    model, batch = str(c.model), c.batch_size
    in_flight = batches_in_flight(batch, c.engine.max_num_seqs, rows, c.replicas)
    # Blocks of one batch: a big input file would otherwise be one block, generated and written as one file at its
    # very end, so a lost driver would lose all of it. Small blocks stream through and land as they finish.
    return [
        Stage("batch", (), (), lambda ds: ds.repartition(target_num_rows_per_block=batch)),
        Stage("tokenize", tokenize.READS, tokenize.WRITES, lambda ds: ds.map_batches(
            tokenize.TokenizeStage, fn_constructor_args=(model, c.chat, c.sampling, c.chat_template, c.system_prompt),
            batch_format="pyarrow",
            batch_size=batch, compute=ActorPoolStrategy(min_size=1, max_size=4), num_cpus=STAGE_ACTOR_CPUS)),
        Stage("generate", generate.READS, generate.WRITES, lambda ds: ds.map_batches(
            generate.GenerateStage, fn_constructor_args=(r.spec, flush), batch_format="pyarrow", batch_size=batch,
            compute=ActorPoolStrategy(size=c.replicas, max_tasks_in_flight_per_actor=in_flight,
                                      max_concurrent_calls_per_actor=in_flight),
            num_cpus=0, label_selector=on_driver_node())),
        Stage("detokenize", detokenize.READS, detokenize.WRITES, lambda ds: ds.map_batches(
            detokenize.DetokenizeStage, fn_constructor_args=(model, output_only), batch_format="pyarrow",
            batch_size=batch,
            compute=ActorPoolStrategy(min_size=1, max_size=4), num_cpus=STAGE_ACTOR_CPUS)),
    ]


def on_driver_node() -> dict[str, str]:
    """Where the generate stage's actors live: the driver's node. Each holds a replica (its ranks' handles and
    placement group) and asks for no resources. On a worker node, that node's loss took the actor with it, and Ray's
    restart of it never finished (Ray 2.60, tests/pipeline/test_lost_node.py): the job hung. Here a lost node only
    kills ranks, whose replica the actor rebuilds on the nodes left; the driver's own node is the job's anyway.

    A label selector on the node id every Ray node carries (Ray Data's own local writes pin the driver's node so);
    a scheduling strategy would go through ``ray_remote_args``, which Ray 2.60 warns users is deprecated."""
    import ray

    return {"ray.io/node-id": ray.get_runtime_context().get_node_id()}


def check_stages(stages: list[Stage], columns: tuple[str, ...], sink_reads: tuple[str, ...]) -> None:
    """Each stage's inputs must be written by something before it (a wiring error, not user input)."""
    have = set(columns)
    for stage in stages:
        missing = set(stage.reads) - have
        assert not missing, f"stage {stage.name} reads {missing}, which no earlier stage writes"
        have |= set(stage.writes)
    assert not set(sink_reads) - have, f"the writer reads {set(sink_reads) - have}"


class Processor:
    """Generates completions for a Ray Dataset of prompts; made by ``build_processor``.

    ``processor(ds)`` returns a lazy Dataset with one row per sample of each input row, or one error row, in the
    columns of ``OUTPUT_SCHEMA`` (the README's output table). The input needs the config's ``prompt_column`` (text,
    or a list of {role, content} messages with ``chat``); an ``id`` column (or ``id_column``) names the rows,
    else each row gets a unique made-up id; the per-row columns of a run (max_new_tokens, temperature, n,
    json_schema, ...) override the config's sampling defaults row by row."""

    def __init__(self, replicas: ReplicaPlan) -> None:
        self.replicas = replicas
        # No stage of its own after detokenize: on a 2-CPU machine a task stage there would wait for the CPU that
        # the input's read tasks and the rank hold (the stages' actors ask for none).
        self.stages = [Stage("rows", dataset.READS, dataset.WRITES, self._rows),
                       *generation_stages(replicas, output_only=True)]
        check_stages(self.stages, (), tuple(OUTPUT_SCHEMA.names))

    @property
    def config(self) -> ProcessorConfig:
        return self.replicas.config

    def _rows(self, ds):
        c = self.config
        columns = _known_columns(ds)
        if columns is not None:
            dataset.check_dataset_columns(columns, c.prompt_column, c.id_column)
        return ds.map_batches(dataset.dataset_rows, fn_kwargs={"prompt_column": c.prompt_column,
                                                           "id_column": c.id_column}, batch_format="pyarrow")

    def __call__(self, ds):
        for stage in self.stages:
            ds = stage.apply(ds)
        return ds

    def release(self) -> None:
        """Free the GPUs and CPUs of this processor's replicas. Each run of a dataset frees its own when it ends
        (the generate stage's actors shut down); a run that was killed rather than shut down leaves them held until
        the Ray job ends, or until this."""
        release_replicas(self.replicas.spec.run_id)


def build_processor(config: ProcessorConfig) -> Processor:
    """A processor for ``config``: the model and the cluster are checked now (attaching to ``config.address``, or
    to the Ray cluster this process already runs, or starting a local one), and the replicas start when the first
    dataset runs. Ray Data's progress output is left as the caller set it."""
    from shardgen.actors.model.hub import resolve_model

    config = replace(config, model=resolve_model(config.model))
    return Processor(plan_replicas(config, quiet=False))


def _known_columns(ds) -> list[str] | None:
    """The dataset's columns when known without running it (None otherwise: the first block names a missing
    column then)."""
    schema = ds.schema(fetch_if_missing=False)
    return None if schema is None else list(schema.names)


def release_replicas(run_id: str) -> None:
    """Remove the placement groups (and so the ShardWorkers) of the replicas of ``run_id``: a placement group made by
    an actor otherwise lives as long as the whole Ray job, holding its GPUs."""
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
