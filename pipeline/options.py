"""The options of a processor and of one ``shardgen run``, validated once at the edge (CLI, job entry point or
``build_processor``)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.sequence import SamplingParams
from shardgen.actors.int4.rules import LAYOUT_CHOICES

DEVICES = ("auto", "cpu", "cuda")
REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/")  # s3://, gs://, hf://, https:// ...
DTYPES = ("auto", "bfloat16", "float16", "float32")
INPUT_FORMATS = ("auto", "openai-batch")  # auto: each file by its extension; openai-batch: stages/openai_batch.py
OUTPUT_FORMATS = ("parquet", "openai-batch")  # openai-batch: the part files, then one JSONL file (openai_output.py)


def _file_text(path: Path, field: str, what: str) -> str:
    if not Path(path).is_file():
        raise FileNotFoundError(f"`{field}` {path} does not exist; give {what}")
    return Path(path).read_text()


def read_chat_template(path: Path | None) -> str | None:
    """The text of a ``chat_template`` file (None: no file), refused unless Jinja parses it."""
    if path is None:
        return None
    text = _file_text(path, "chat_template", "a Jinja chat template file")
    import jinja2

    try:  # as transformers compiles it (its {% generation %} tag and loop controls), where it can say
        from transformers.utils.chat_template_utils import _compile_jinja_template as compile_template
    except ImportError:
        compile_template = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).from_string
    try:
        compile_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"`chat_template` {path} line {e.lineno}: not a Jinja template ({e.message})") from None
    return text


def read_json_schema(path: Path | None) -> str | None:
    """The text of a ``json_schema`` file for every row (None: no file), refused unless it is a JSON object."""
    if path is None:
        return None
    text = _file_text(path, "json_schema", "a file holding one JSON Schema")
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"`json_schema` {path} is not JSON ({e}); give a file holding one JSON Schema") from None
    if not isinstance(schema, dict):
        raise ValueError(f"`json_schema` {path} holds a {type(schema).__name__}, not a JSON Schema object")
    return text


@dataclass(frozen=True, kw_only=True)
class ProcessorConfig:
    """What generating completions for a dataset of prompts needs: the model, the replicas and their engines, the
    sampling defaults and which columns hold the prompt and the id. ``shardgen.build_processor`` takes it as is;
    ``RunOptions`` adds the files a run reads and writes. Checked once, when it is made."""

    model: Path  # a model directory (a str is taken as one), or with build_processor a model id in the HF cache
    tp: int = 1
    replicas: int = 1
    device: str = "auto"
    dtype: str = "auto"
    prompt_column: str = "prompt"
    id_column: str | None = None  # None: "id" when the input has it, else ids are made (<file>:<row> for files)
    chat: bool = False
    chat_template: str | None = None  # a Jinja chat template's text, used instead of the tokenizer's own
    system_prompt: str | None = None  # a system message for every chat prompt that has none
    batch_size: int | None = None  # None: pipeline.plan.auto_batch_size
    address: str | None = None
    int4_layout: str = "auto"
    kernel_cache_dir: Path | None = None
    allow_pickle: bool = False
    verbose: bool = False  # Ray's own progress and log lines, which shardgen's progress line replaces
    sampling: SamplingParams = field(default_factory=SamplingParams)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, str):
            object.__setattr__(self, "model", Path(self.model))
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def chat_prompts(self) -> bool:
        """Whether prompts may be chat messages (the chat template applies)."""
        return self.chat

    def problems(self) -> list[str]:
        """Every value that cannot run, each named by its field."""
        problems = []
        if self.tp < 1:
            problems.append(f"`tp` must be >= 1, got {self.tp}")
        if self.replicas < 1:
            problems.append(f"`replicas` must be >= 1, got {self.replicas}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"`batch_size` must be >= 1, got {self.batch_size}")
        if self.device not in DEVICES:
            problems.append(f"`device` must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in DTYPES:
            problems.append(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.int4_layout not in LAYOUT_CHOICES:
            problems.append(f"`int4_layout` must be one of {', '.join(LAYOUT_CHOICES)}, got {self.int4_layout!r}")
        if REMOTE.match(str(self.model)):  # Path("s3://b/x") is "s3:/b/x"
            problems.append(f"`model` {str(self.model).replace(':/', '://', 1)}: a model directory must be a local "
                            f"path (on a cluster, a file system every node sees); copy the model there first. "
                            f"`input` and `output` may be URIs")
        if not self.prompt_column or self.id_column == "":
            problems.append("`prompt_column` and `id_column` must not be empty")
        if self.system_prompt == "":
            problems.append("`system_prompt` must not be empty; leave it out for no system message")
        elif (self.system_prompt is not None or self.chat_template is not None) and not self.chat_prompts():
            problems.append(f"`{'system_prompt' if self.system_prompt is not None else 'chat_template'}` applies to "
                            f"chat prompts: pass `chat` too (prompts as JSON lists of {{role, content}} messages)")
        for problem in self.sampling.problems():  # "top_p must be ..." -> "`top_p` must be ..."
            name, rest = problem.split(" ", 1)
            problems.append(f"`{name}` {rest}")
        return problems


@dataclass(frozen=True, kw_only=True)
class RunOptions(ProcessorConfig):
    """A ``shardgen run``: the processor's config, plus the files it reads and writes."""

    input: Path | str  # a local path, or a URI pyarrow's filesystems open (s3://, gs://, ...)
    output: Path | str
    input_format: str = "auto"  # auto: each file by its extension; openai-batch: OpenAI Batch API request lines
    output_format: str = "parquet"
    single_file: Path | str | None = None  # also every row in input order in this one Parquet file, at the end
    overwrite: bool = False

    def chat_prompts(self) -> bool:
        return self.chat or self.input_format == "openai-batch"  # a batch file's chat requests

    def problems(self) -> list[str]:
        problems = super().problems()
        if self.input_format not in INPUT_FORMATS:
            problems.append(f"`input_format` must be one of {', '.join(INPUT_FORMATS)}, got {self.input_format!r}")
        elif self.input_format == "openai-batch" and (self.id_column is not None or self.chat):
            problems.append("`input_format` openai-batch takes each request's custom_id as its id and its url "
                            "(chat or completions) for the template: leave out `id_column` and `chat`")
        if self.output_format not in OUTPUT_FORMATS:
            problems.append(f"`output_format` must be one of {', '.join(OUTPUT_FORMATS)}, got {self.output_format!r}")
        elif self.output_format == "openai-batch" and self.input_format != "openai-batch":
            problems.append("`output_format` openai-batch answers OpenAI batch requests: pass `input_format` "
                            "openai-batch too")
        return problems
