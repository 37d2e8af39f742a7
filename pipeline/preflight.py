"""What a run checks before any worker starts, so a mistake is named in seconds with a one-line message.

``check_files`` reads only small files and headers (no torch, no Ray): the CLI runs it before the heavy imports,
and ``pipeline.plan`` runs it again with ``check_model``, which reads every rank's tensor headers through torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from shardgen.actors.model.config import ModelConfig
from shardgen.actors.model.tokenizer import check_tokenizer_files
from shardgen.pipeline import output_dir
from shardgen.pipeline.stages import read
from shardgen.pipeline.options import ProcessorConfig, RunOptions
from shardgen.pipeline.storage import Location


@dataclass(frozen=True)
class FilePlan:
    """The input and output as the run reads and writes them."""

    files: list[Location]
    root: Location  # the files are named relative to it (ids without an id column are <name>:<row>)
    id_column: str | None  # None: ids are <file>:<row>
    output: Location
    carried: dict  # the input's other columns, carried into the output: name -> Arrow type


def check_model_files(config: ProcessorConfig) -> ModelConfig:
    """The model's config.json and tokenizer files, and the engine's lengths against them."""
    model = ModelConfig.from_dir(config.model)
    check_tokenizer_files(config.model, chat=config.chat and config.chat_template is None)
    limit = config.engine.max_model_len
    if limit is not None and limit > model.max_position_embeddings:
        raise ValueError(f"`max_model_len` {limit} is above the model's max_position_embeddings "
                         f"({model.max_position_embeddings}, {config.model / 'config.json'}); pass at most that")
    return model


def check_files(options: RunOptions) -> FilePlan:
    """The model's config and tokenizer files, every input file's schema, and where the output goes."""
    check_model_files(options)
    files = read.input_files(options.input)
    output_dir.check_locations(options.output, options.input, options.model)
    if options.single_file is not None:
        from shardgen.pipeline.single_file import check_single_file

        check_single_file(options.single_file, options.output, options.input)
    id_column = read.check_inputs(files, options.prompt_column, options.id_column, options.input_format)
    given = Location.of(options.input)
    root = given if given.is_dir() else given.parent
    carried = read.carried_columns(files, options.prompt_column, id_column, options.input_format)
    return FilePlan(files, root, id_column, Location.of(options.output), carried)


def check_model(config: ProcessorConfig) -> ModelConfig:
    """Every rank of ``--tp`` finds each tensor it needs with the shape config.json implies (headers only)."""
    from shardgen.actors.model.loader import check_checkpoint

    return check_checkpoint(config.model, config.tp, config.allow_pickle)
