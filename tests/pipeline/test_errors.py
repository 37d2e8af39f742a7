"""Bad files, checkpoints, options and outputs: each is refused with a message naming what to fix, before any
worker starts, and leaves no output behind that a later run would trust.

One table: (case, how to break things, the message). Every case goes through ``pipeline.run.run`` (``execute(plan(options))``; or the options
object the CLI builds), the path ``shardgen run`` and ``python -m shardgen.jobs.generate`` take.
"""

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from shardgen.actors.engine.config import EngineConfig
from shardgen.actors.engine.sequence import SamplingParams
from shardgen.jobs.cli import as_flags
from shardgen.pipeline import output_dir
from shardgen.pipeline.options import RunOptions
from shardgen.pipeline.plan import run_manifest
from shardgen.pipeline.run import run
from tests.helpers import model_with_tokenizer


@pytest.fixture(scope="module", autouse=True)
def ray_after():
    yield
    import ray

    if ray.is_initialized():  # only the GPU-count case starts a cluster
        ray.shutdown()


def copy_model(model: Path, tmp: Path) -> Path:
    return Path(shutil.copytree(model, tmp / "model"))


def edit_config(model: Path, **changes: object) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def rewrite_weights(model: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = model / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    edit(tensors)
    save_file(tensors, str(path), metadata=meta)


# Each setup gets (options, tmp) and returns the options to run; it may break files under tmp on the way.
def _model(edit: Callable[[Path], None]) -> Callable[[RunOptions, Path], RunOptions]:
    def setup(o: RunOptions, tmp: Path) -> RunOptions:
        model = copy_model(o.model, tmp)
        edit(model)
        return replace(o, model=model)
    return setup


def _input(name: str, content: bytes | None) -> Callable[[RunOptions, Path], RunOptions]:
    def setup(o: RunOptions, tmp: Path) -> RunOptions:
        (tmp / "in").mkdir()
        if content is not None:
            (tmp / "in" / name).write_bytes(content)
        return replace(o, input=tmp / "in" / name if content is not None else tmp / "in")
    return setup


def _files(contents: dict[str, bytes]) -> Callable[[RunOptions, Path], RunOptions]:
    def setup(o: RunOptions, tmp: Path) -> RunOptions:
        (tmp / "in").mkdir()
        for name, content in contents.items():
            (tmp / "in" / name).write_bytes(content)
        return replace(o, input=tmp / "in")
    return setup


def _option(**changes: object) -> Callable[[RunOptions, Path], RunOptions]:
    return lambda o, tmp: replace(o, **changes)


def _output_of_another_run(o: RunOptions, tmp: Path) -> RunOptions:
    out = tmp / "out"
    out.mkdir()
    pq.write_table(pa.table({"id": ["a"]}), out / "part-0.parquet")
    output_dir.write_manifest(out, run_manifest(replace(o, sampling=SamplingParams(max_new_tokens=7))))
    return replace(o, output=out)


def _foreign_output(o: RunOptions, tmp: Path) -> RunOptions:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return replace(o, output=tmp / "out")


def _output_holding_the_input(o: RunOptions, tmp: Path) -> RunOptions:
    (tmp / "out").mkdir()
    shutil.copy(o.input, tmp / "out" / "prompts.jsonl")
    return replace(o, input=tmp / "out" / "prompts.jsonl", overwrite=True)


def _parquet(columns: dict) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def _output_is_a_file(o: RunOptions, tmp: Path) -> RunOptions:
    (tmp / "out").write_text("")
    return replace(o, output=tmp / "out")


def _groups_split_by_tp(o: RunOptions, tmp: Path) -> RunOptions:
    _, model = model_with_tokenizer("llama", tmp, group_size=128)  # o_proj K = 128: at --tp 2 a rank holds 64 columns
    return replace(o, model=model, tp=2)


def _index_to(target: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        (model / "model.safetensors").rename(model / "shard-1.safetensors")
        with safe_open(str(model / "shard-1.safetensors"), "pt") as f:
            keys = list(f.keys())
        (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: target for k in keys}}))
    return edit


def _pickle_only(model: Path) -> None:
    (model / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, model / "pytorch_model.bin")


def _truncate(model: Path) -> None:
    path = model / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CASES = [
    # input
    ("input missing", _option(input=Path("/nonexistent/prompts.jsonl")), "--input /nonexistent/prompts.jsonl does not exist"),
    ("input empty directory", _input("", None), "is an empty directory; put .parquet, .jsonl or .csv files in it"),
    ("input unknown extension", _input("p.txt", b"hello\n"), "--input holds files of unknown type (p.txt)"),
    ("input empty jsonl", _input("p.jsonl", b""), "p.jsonl has no rows; give prompts, one row each"),
    ("input jsonl of blank lines", _input("p.jsonl", b"\n  \n"), "p.jsonl has no rows"),
    ("input header-only csv", _input("p.csv", b"id,prompt\n"), "p.csv has no rows"),
    ("input parquet of 0 rows", _input("p.parquet", _parquet({"id": pa.array([], pa.string()),
                                                              "prompt": pa.array([], pa.string())})),
     "p.parquet has no rows"),
    ("input directory of empty files", _files({"a.jsonl": b"", "b.csv": b"prompt\n"}), "(2 files) has no rows"),
    ("input a json array", _input("p.json", b'[{"prompt": "x"}]'),
     "holds a JSON array; shardgen reads JSON Lines (one object per line)"),
    ("input a later file lacks the prompt column", _files({"a.jsonl": b'{"prompt": "x"}\n', "b.csv": b"text\nhi\n"}),
     "b.csv has no column 'prompt' (columns found: ['text']); pass --prompt-column"),
    ("input corrupt parquet", _input("p.parquet", b"PAR1 not really"), "cannot read"),
    ("input broken json", _input("p.jsonl", b"{id: 1,\n"), "as json"),
    ("ids repeated", _input("p.jsonl", b"".join(json.dumps({"id": i, "prompt": "x"}).encode() + b"\n" for i in "abacbd")),
     "the id column 'id' repeats ids, e.g. ['a', 'b']; every row needs its own id"),
    ("ids missing in some rows", _input("p.jsonl", b'{"id": "a", "prompt": "x"}\n{"prompt": "y"}\n{"id": null, "prompt": "z"}\n'),
     "the id column 'id' is null or empty in 2 row(s); give every row an id"),
    ("a later file lacks the id column", _files({"a.jsonl": b'{"id": "a", "prompt": "x"}\n', "b.jsonl": b'{"prompt": "y"}\n'}),
     "b.jsonl (columns found: ['prompt']) but 1 other file(s) have it; either every input file has the id column"),
    ("the first file lacks the id column", _files({"a.jsonl": b'{"prompt": "x"}\n', "b.jsonl": b'{"id": "b", "prompt": "y"}\n'}),
     "the id column 'id' is missing from"),
    ("--id-column not in the input", _option(id_column="nope"),
     "--id-column 'nope' is not in"),
    ("ids empty in a csv", _input("p.csv", b"id,prompt\na,x\n,y\n"), "the id column 'id' is null or empty in 1 row(s)"),
    ("prompt column missing", _option(prompt_column="text"),
     "has no column 'text' (columns found: ['id', 'prompt', 'max_new_tokens']); pass --prompt-column"),
    # checkpoint
    ("model directory missing", _option(model=Path("/nonexistent/model")), "model directory /nonexistent/model does not exist"),
    ("config.json missing", _model(lambda m: (m / "config.json").unlink()), "config.json is missing"),
    ("config.json broken", _model(lambda m: (m / "config.json").write_text("{")), "config.json is not valid JSON"),
    ("architecture unsupported", _model(lambda m: edit_config(m, architectures=["GPT2LMHeadModel"])),
     "LlamaForCausalLM"),
    ("quantization not torchao", _model(lambda m: edit_config(m, quantization_config={"quant_method": "gptq", "bits": 4})),
     "gptq"),
    ("int4 packing not plain", _model(lambda m: edit_config(m, quantization_config={
        "quant_method": "torchao", "quant_type": {"default": {"_type": "Int4WeightOnlyConfig", "_data": {
            "group_size": 64, "int4_packing_format": "preshuffled"}}}})), "preshuffled"),
    ("safetensors truncated", _model(_truncate), "is not a readable safetensors file"),
    ("tensor missing", _model(lambda m: rewrite_weights(m, lambda t: t.pop("model.norm.weight"))),
     "lacks 1 tensor(s) the model needs, e.g. ['model.norm.weight']"),
    ("tokenizer files missing", _model(lambda m: [(m / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")]),
     "has no tokenizer files (one of tokenizer.json, tokenizer.model"),
    ("--chat without a chat template", _option(chat=True), "--chat: the tokenizer in"),
    ("--max-model-len above the model's positions", lambda o, tmp: replace(o, engine=EngineConfig(max_model_len=10**6)),
     "--max-model-len 1000000 is above the model's max_position_embeddings"),
    ("tensor of the wrong shape", _model(lambda m: rewrite_weights(m, lambda t: t.update({"model.norm.weight": torch.ones(7)}))),
     "model.norm.weight has shape (7,) in the checkpoint, but config.json implies (256,)"),
    ("pickle weights only", _model(_pickle_only), "holds only pickle weights (pytorch_model.bin)"),
    ("index points outside", _model(_index_to("../../elsewhere.safetensors")), "points outside the model directory"),
    ("index names a missing shard", _model(_index_to("shard-9.safetensors")), "is listed in"),
    ("--tp does not divide the heads", _option(tp=3), "--tp 3 does not divide"),
    ("--tp splits int4 groups", _groups_split_by_tp,
     "o_proj: row-parallel int4 slice K/T = 128/2 = 64 is not a multiple of the group size G = 128"),
    # options
    ("--top-p outside (0, 1]", _option(sampling=SamplingParams(top_p=0)), "--top-p must be in (0, 1]"),
    ("--temperature negative", _option(sampling=SamplingParams(temperature=-1)), "--temperature must be"),
    ("--max-new-tokens zero", _option(sampling=SamplingParams(max_new_tokens=0)), "--max-new-tokens must be"),
    ("--logprobs above 20", _option(sampling=SamplingParams(logprobs=21)),
     "--logprobs must be an integer in [0, 20] (0 turns it off), got 21"),
    ("--tp zero", _option(tp=0), "--tp must be >= 1, got 0"),
    ("--model on object storage", _option(model=Path("s3://bucket/model")),
     "--model s3://bucket/model: a model directory must be a local path"),
    ("--replicas zero", _option(replicas=0), "--replicas must be >= 1, got 0"),
    ("--device unknown", _option(device="tpu"), "--device must be one of auto, cpu, cuda, got 'tpu'"),
    ("--dtype unknown", _option(dtype="int3"), "--dtype must be one of"),
    ("--batch-size zero", _option(batch_size=0), "--batch-size must be >= 1, got 0"),
    ("--int4-layout unknown", _option(int4_layout="int4-fast"), "--int4-layout must be one of auto, int4-preshuffled"),
    ("--int4-layout of a GPU on the CPU", _option(device="cpu", int4_layout="int4-preshuffled"),
     "--int4-layout int4-preshuffled runs on CUDA GPUs"),
    ("--max-num-seqs zero", lambda o, tmp: replace(o, engine=EngineConfig(max_num_seqs=0)), "--max-num-seqs must be >= 1"),
    # output
    ("output of another run", _output_of_another_run,
     "holds another run's output (1 part files; what differs, that run -> this one: sampling.max_new_tokens: 7 -> 2); "),
    ("output not a shardgen run", _foreign_output, "is not empty and holds no shardgen run"),
    ("output is a file", _output_is_a_file, "is a file; give a directory"),
    ("output holds the input", _output_holding_the_input, "holds the input"),
    ("output is the input directory", lambda o, tmp: replace(_files({"p.jsonl": b'{"prompt": "x"}\n'})(o, tmp),
                                                             output=tmp / "in"), "is the input"),
    ("output inside the input directory", lambda o, tmp: replace(_files({"p.jsonl": b'{"prompt": "x"}\n'})(o, tmp),
                                                                 output=tmp / "in" / "out"),
     "is inside the input directory"),
    ("output is the model directory", lambda o, tmp: replace(o, output=o.model), "is the model"),
    # cluster
    ("cuda on a cluster without GPUs", _option(device="cuda", tp=2, replicas=2),
     "--device cuda: the cluster has no CUDA GPU; use --device cpu"),
]


@pytest.mark.parametrize("setup,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_what_to_fix(demo, tmp_path, setup, message):
    model, prompts = demo
    base = dict(model=model, input=prompts, output=tmp_path / "out", sampling=SamplingParams(max_new_tokens=2))
    output = tmp_path / "out"
    listing = lambda: sorted(p.name for p in output.iterdir()) if output.is_dir() else None  # noqa: E731
    before = listing()
    with pytest.raises((ValueError, FileNotFoundError)) as caught:
        options = setup(RunOptions(**base), tmp_path)
        output = options.output
        before = listing()
        run(options)
    print(f"{caught.typename}: {caught.value}")
    assert message in as_flags(str(caught.value)), "the message, as the command line says it"
    assert listing() == before, "a refused run must leave the output as it was"


@pytest.mark.parametrize("resources,device,tp,replicas,message", [
    ({"CPU": 2}, "cpu", 2, 1, "the Ray cluster has 2 CPUs; this run needs 3 (2 for --tp 2 x --replicas 1, one a rank, "
                              "and 1 for reading the input); start the head with more logical CPUs (ray start --head "
                              "--num-cpus=3), add a node, or lower --replicas or --tp"),
    ({"CPU": 64, "GPU": 2}, "cuda", 2, 2, "--tp 2 x --replicas 2 needs 4 GPUs; the cluster has 2; lower --replicas"),
    ({"CPU": 4, "GPU": 8}, "cuda", 2, 2, "the Ray cluster has 4 CPUs; this run needs 5"),
])
def test_a_cluster_too_small_for_the_run_is_refused_saying_what_it_needs(resources, device, tp, replicas, message):
    from shardgen.pipeline.plan import check_cluster

    with pytest.raises(ValueError) as caught:
        check_cluster(resources, device, tp, replicas)
    assert message in as_flags(str(caught.value))
    check_cluster({"CPU": 2}, "cpu", 1, 1)  # the smallest that runs: a plain `ray start --head` on 2 cores


def test_the_table_covers_at_least_25_cases():
    assert len(CASES) >= 25
