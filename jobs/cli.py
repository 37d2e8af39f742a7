"""The ``shardgen`` command line. Heavy imports (torch, torchao, ray) happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Optional

import typer

from shardgen.actors.engine.config import EngineConfig
from shardgen.jobs.native_stderr import start_filter
from shardgen.jobs.process import run_then_exit, user_cache_dir

ENGINE = EngineConfig()  # the engine's defaults, shown in --help (actors.config imports nothing heavy)


app = typer.Typer(
    name="shardgen",
    help="Distributed batch inference for int4 LLMs on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a `ray job submit` entrypoint

ALLOW_PICKLE_HELP = ("Also read .bin/.pt weights (with torch.load(weights_only=True)) if the model has no safetensors; "
                     "off by default because unpickling untrusted files can run code.")


def main() -> None:
    """The ``shardgen`` console script: the app, then a quick exit. Ray's exit hook sleeps 0.5 s and stops a local
    cluster gracefully, and the interpreter then tears down torch's and Ray's modules; together that kept the process
    alive ~3.7 s after the summary. Here the cluster this process started is stopped at once and the teardown,
    which frees nothing the operating system would not, is skipped."""
    run_then_exit(app)


# Core modules name the setting a message is about by its field name in backquotes (`max_model_len`): the names of
# RunOptions and EngineConfig, which Python callers pass. On the command line each such setting is a flag.
_FIELD = re.compile(r"`([a-z][a-z0-9_]*)`")


@functools.cache
def _flags() -> frozenset[str]:
    command = typer.main.get_command(app)
    return frozenset(o for sub in command.commands.values() for p in sub.params for o in p.opts if o.startswith("--"))


def as_flags(message: str) -> str:
    """``message`` with each `field` it names written as the command line's flag (``--max-model-len``)."""
    def flag(m: re.Match) -> str:
        name = "--" + m.group(1).replace("_", "-")
        return name if name in _flags() else m.group(1)

    return _FIELD.sub(flag, message)


def _echo(message: str) -> None:
    typer.echo(as_flags(message))


def _fail(message: str) -> None:
    typer.secho(f"error: {as_flags(message)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command(epilog="Example: shardgen quantize ./Llama-3.2-1B ./Llama-3.2-1B-int4 --group-size 128")
def quantize(
    src: Path = typer.Argument(..., help="Float (bf16/fp16/fp32) Hugging Face model directory with *.safetensors."),
    dst: Path = typer.Argument(..., help="Output directory for the plain int4 checkpoint."),
    group_size: int = typer.Option(128, help="int4 group size G along K (32, 64, 128, 256; CUDA runs 64 and up)."),
    quantize_lm_head: bool = typer.Option(False, help="Quantize lm_head too (kept in the float dtype by default)."),
    max_shard_size_gb: float = typer.Option(5.0, help="Largest safetensors shard to write, in GiB."),
    overwrite: bool = typer.Option(False, help="Replace the checkpoint in DST (only its files are removed)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Quantize a local float model to shardgen's plain int4 checkpoint, one tensor at a time."""
    from shardgen.actors.model.quantize import quantize_checkpoint

    try:
        r = quantize_checkpoint(src, dst, group_size, quantize_lm_head, int(max_shard_size_gb * 2**30), overwrite, allow_pickle)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    if r.removed:
        typer.echo(f"--overwrite: removed {len(r.removed)} file(s) of the earlier checkpoint in {r.output} "
                   f"({', '.join(r.removed[:6])}{', ...' if len(r.removed) > 6 else ''})")
    for name in r.unquantizable:
        typer.secho(f"kept in float, cannot be grouped: {name}", fg=typer.colors.YELLOW)
    typer.echo(
        f"wrote {r.output}: {r.int4_weights} int4 weights (G={group_size}), {len(r.kept_dense)} float tensors, "
        f"{r.bytes_in / 2**20:.1f} MiB -> {r.bytes_out / 2**20:.1f} MiB in {r.seconds:.1f} s"
    )


RUN_EXAMPLE = ("Example: shardgen run --model ./Llama-3.2-1B-int4 --input prompts.parquet --output out/ --tp 2 --replicas 4\n\n"
               "With no --model and --input, runs the embedded demo model on its prompt set.")


@app.command(epilog=RUN_EXAMPLE)
def run(
    model: Optional[str] = typer.Option(None, help="Plain int4 (or float) checkpoint directory, or a model id (org/name) "
                                                   "in the local Hugging Face cache. Default: the embedded demo."),
    input: Optional[str] = typer.Option(None, "--input", help="Prompts: a .parquet/.jsonl/.csv file or a directory of "
                                        "them; a local path, or a URI such as s3://bucket/prompts/."),
    output: Optional[str] = typer.Option(None, help="Output directory for Parquet files (a local path or a URI). "
                                         "Default: ./demo-output for the demo."),
    tp: int = typer.Option(1, help="Tensor-parallel ranks per replica (one GPU each)."),
    replicas: int = typer.Option(1, help="Replicas (each T ranks) serving batches in parallel."),
    max_new_tokens: int = typer.Option(64, help="Default tokens to generate per row (a row's max_new_tokens column overrides)."),
    temperature: float = typer.Option(0.0, help="0 is greedy."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass, in (0, 1]."),
    top_k: int = typer.Option(0, help="Sample from the k most likely tokens; 0 turns it off."),
    seed: Optional[int] = typer.Option(None, help="Makes sampling reproducible: each row's seed derives from it and the row id."),
    ignore_eos: bool = typer.Option(False, help="Keep generating past EOS (fixed-length outputs, for benchmarks)."),
    min_p: float = typer.Option(0.0, help="Drop tokens less likely than min_p x the likeliest (after top-k and top-p); "
                                          "0 turns it off."),
    repetition_penalty: float = typer.Option(1.0, help="Divide the logits (> 0; multiply those < 0) of every token "
                                                       "already in the prompt or completion by this; 1 turns it off."),
    presence_penalty: float = typer.Option(0.0, help="Subtract this from the logits of tokens already in the "
                                                     "completion, in [-2, 2]."),
    frequency_penalty: float = typer.Option(0.0, help="Subtract this, times its count so far, from the logit of each "
                                                      "token of the completion, in [-2, 2]."),
    min_tokens: int = typer.Option(0, help="Generate at least this many tokens before EOS, a stop token or a stop "
                                           "string may end the completion."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="A string that ends the completion (not included); "
                                             "repeat for several. A row's stop column replaces them."),
    stop_token_ids: Optional[list[int]] = typer.Option(None, "--stop-token-ids", help="A token id that ends the "
                                                       "completion, besides EOS; repeat for several."),
    logprobs: int = typer.Option(0, help="K > 0: each completion token's log-probability (logprobs column) and the K "
                                         "most likely tokens at its step (top_logprobs); a row's logprobs column "
                                         "overrides. 0 turns it off."),
    prompt_logprobs: bool = typer.Option(False, help="Each prompt token's log-probability given the tokens before it "
                                                     "(prompt_logprobs column; the first token's is null)."),
    json_schema: Optional[Path] = typer.Option(None, "--json-schema", help="A JSON Schema file: every completion is "
                                                "JSON valid for it (a row's own json_schema, regex or choice "
                                                "column replaces it)."),
    n: int = typer.Option(1, "--n", help="Samples per prompt: n output rows per input row (sample_index 0..n-1), "
                                         "the prompt computed once; a row's n column overrides."),
    prompt_column: str = typer.Option("prompt", help="Column holding the prompt text."),
    id_column: Optional[str] = typer.Option(None, help="Column holding a unique row id, in every input file (default: "
                                                       "id when every file has it; else ids are <file>:<row>)."),
    chat: bool = typer.Option(False, help="Prompts are JSON lists of {role, content}; apply the tokenizer's chat template."),
    chat_template: Optional[Path] = typer.Option(None, "--chat-template", help="A Jinja chat template file, used "
                                                 "instead of the tokenizer's own (with --chat)."),
    system_prompt: Optional[str] = typer.Option(None, "--system-prompt", help="A system message put first in every "
                                                "chat prompt that has none (with --chat, or OpenAI batch chat "
                                                "requests)."),
    input_format: str = typer.Option("auto", help="auto (each file by its extension: .parquet, .jsonl, .csv) or "
                                                  "openai-batch (OpenAI Batch API request lines: custom_id is the "
                                                  "id; /v1/chat/completions and /v1/completions bodies)."),
    output_format: str = typer.Option("parquet", help="parquet, or openai-batch (with --input-format openai-batch: "
                                                      "also writes openai-batch-output.jsonl, one OpenAI batch "
                                                      "response line per request, at the end)."),
    single_file: Optional[str] = typer.Option(None, "--single-file", help="Also write every row, in input order, "
                                              "into this one .parquet file (outside --output) at the end."),
    device: str = typer.Option("auto", help="auto (cuda if the cluster has GPUs), cpu or cuda."),
    dtype: str = typer.Option("auto", help="auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32."),
    batch_size: Optional[int] = typer.Option(None, help="Rows per Ray Data batch (default: 256, or fewer so each "
                                                        "replica gets at least 4 batches of a small input)."),
    max_num_seqs: int = typer.Option(ENGINE.max_num_seqs, help="Most sequences a replica's engine runs at once."),
    max_num_batched_tokens: int = typer.Option(ENGINE.max_num_batched_tokens,
                                               help="Most tokens in one engine step (prefill chunks plus decodes)."),
    max_model_len: Optional[int] = typer.Option(None, help="Longest prompt + completion; default: the model's max_position_embeddings."),
    kv_cache_gb: Optional[float] = typer.Option(None, help="KV cache per rank in GiB; default: sized from free memory."),
    gpu_memory_utilization: float = typer.Option(ENGINE.gpu_memory_utilization,
                                                 help="Share of each GPU's memory for weights, activations and KV cache."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="Run decode steps eagerly, without CUDA graphs."),
    prefix_caching: bool = typer.Option(True, "--prefix-caching/--no-prefix-caching",
                                        help="Share the KV cache of prompts' common prefixes (a system prompt is "
                                             "computed once per replica while its blocks stay cached)."),
    kv_cache_dtype: str = typer.Option("auto", help="KV cache elements: auto (the model's dtype) or fp8 (e4m3 with a "
                                                    "scale per token and head: ~2x the tokens, GPUs of compute "
                                                    "capability 8.9+ or the CPU)."),
    int4_layout: str = typer.Option("auto", help="int4 weights on the GPU: auto (int4-dual on SM90 with humming "
                                                 "installed, else int4-preshuffled on SM90+, else int4-plain), "
                                                 "int4-preshuffled (fbgemm), int4-plain, int4-humming "
                                                 "or int4-humming-fp8act (humming's W4A16 / W4A8 GEMMs, SM90), or "
                                                 "int4-dual (humming for steps of <= 128 rows, preshuffled above; "
                                                 "both packings in memory)."),
    address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster to attach to; default: start a local one."),
    overwrite: bool = typer.Option(False, help="Replace an earlier run's output (only shardgen's own files are removed)."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's own progress and log lines too."),
) -> None:
    """Generate a completion for every row of a table of prompts; writes Parquet and prints a summary."""
    from shardgen.actors.engine.sequence import SamplingParams
    from shardgen.pipeline.interrupt import Interrupted
    from shardgen.pipeline.options import RunOptions, read_chat_template, read_json_schema

    if (model is None) != (input is None):
        _fail("pass both --model and --input, or neither (to run the embedded demo)")
    demo = False
    try:
        if model is None:
            from shardgen.jobs.demo import demo_assets

            model, input = demo_assets()
            demo = True
            if output is None:
                output, overwrite = Path("demo-output"), True
            typer.echo(f"shardgen: running the embedded demo model ({model}) on {input}")
        else:
            from shardgen.actors.model.hub import resolve_model

            model = resolve_model(model)
        if output is None:
            _fail("pass --output DIR for the Parquet files")
        from shardgen.pipeline.storage import is_uri

        if RAY_JOB_ENV in os.environ and not is_uri(output) and not Path(output).is_absolute():
            _fail(f"--output {output} is relative, and a Ray job runs in a temporary copy of its --working-dir "
                  f"({Path.cwd()}): the files would be lost with it. Give an absolute path on storage the "
                  f"cluster's nodes share, e.g. --output {Path('/mnt/shared') / output}")
        options = RunOptions(
            model=model, input=input, output=output, tp=tp, replicas=replicas, device=device, dtype=dtype,
            prompt_column=prompt_column, id_column=id_column, chat=chat, input_format=input_format, output_format=output_format,
            chat_template=read_chat_template(chat_template), system_prompt=system_prompt, single_file=single_file,
            batch_size=batch_size, overwrite=overwrite,
            address=address, int4_layout=int4_layout, allow_pickle=allow_pickle, verbose=verbose,
            kernel_cache_dir=user_cache_dir(),
            sampling=SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                    seed=seed, ignore_eos=ignore_eos, logprobs=logprobs,
                                    prompt_logprobs=prompt_logprobs, n=n, min_p=min_p,
                                    repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                                    frequency_penalty=frequency_penalty, min_tokens=min_tokens,
                                    stop=tuple(stop or ()), stop_token_ids=tuple(stop_token_ids or ()),
                                    json_schema=read_json_schema(json_schema)),
            engine=EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                                max_model_len=max_model_len,
                                kv_cache_memory=int(kv_cache_gb * 2**30) if kv_cache_gb else None,
                                gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=not enforce_eager,
                                kv_cache_dtype=kv_cache_dtype, prefix_caching=prefix_caching),
        )
        from shardgen.pipeline.preflight import check_files

        check_files(options)  # files checked before torch and Ray load (seconds): refused at once
        from shardgen.pipeline.run import run as run_pipeline

        if not verbose:
            start_filter()  # Ray's C++ noise; run_then_exit stops the filter
        run_pipeline(options, echo=_echo, progress=sys.stderr)
    except Interrupted as e:
        typer.secho(f"shardgen: {as_flags(str(e))}", fg=typer.colors.YELLOW, err=True)
        raise typer.Exit(code=130)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        _fail(str(e))
    if demo:
        _show_samples(options.output)


def _show_samples(output: str | Path, count: int = 3) -> None:
    """A few prompts and their completions, so a first run shows what the model does."""
    import pyarrow.dataset as pads

    from shardgen.pipeline.stages.write import existing_output

    files = existing_output(output)
    rows = pads.dataset([f.path for f in files], format="parquet", filesystem=files[0].fs).to_table(columns=["id", "prompt", "completion"]).sort_by("id")
    for row in rows.slice(0, count).to_pylist():
        typer.echo(f"\n--- {row['id']} ---\n{row['prompt']}", nl=False)
        typer.secho(row["completion"] or "", fg=typer.colors.GREEN)


BENCH_EXAMPLE = ("Example: shardgen bench --workloads decode-heavy --systems shardgen-int4,shardgen-bf16\n\n"
                 "Workloads: decode-heavy (128 x 32 in / 2048 out), prefill-heavy (32 x 4096 / 32), mixed (1000 x 1024 / 128); "
                 "by name: throughput (2048 x 128 / 2048), shared-prefix (1000 x (one 2000-token system prompt + 100 "
                 "of their own) / 128).")


@app.command(epilog=BENCH_EXAMPLE)
def bench(
    workloads: str = typer.Option("decode-heavy,prefill-heavy,mixed", help="Comma-separated workloads (also "
                                  "throughput: 2,048 prompts x 128 in / 2,048 out, with a high --max-num-seqs; and "
                                  "shared-prefix, for prefix caching)."),
    systems: str = typer.Option("shardgen-int4,shardgen-bf16,hf-bf16,hf-int4-preshuffled",
                                help="Comma-separated systems: shardgen-int4 is the default int4 path (--int4-layout "
                                     "auto); shardgen-int4-<layout> forces a layout (dual, humming, humming-fp8act, "
                                     "preshuffled, plain); and, for comparison, "
                                     "shardgen-int4-fp8-kv, shardgen-int4-preshuffled-fp8-kv and "
                                     "shardgen-bf16-fp8-kv (an fp8 KV cache), shardgen-int4-no-prefix-caching and "
                                     "shardgen-bf16-no-prefix-caching, "
                                     "shardgen-int4-no-overlap (every engine step synchronous), "
                                     "shardgen-int4-json-half and shardgen-int4-penalties-half (every other "
                                     "request held to a JSON schema, or penalised), "
                                     "shardgen-int4-one-attention-launch (a step's attention in one paged-kernel "
                                     "launch, not one per kind of sequence) and shardgen-int4-cudnn-prompts "
                                     "(long prompts through cuDNN, not FlashAttention)."),
    scale: float = typer.Option(1.0, help="Fraction of each workload's prompts to run (a quick check: 0.05)."),
    max_num_seqs: int = typer.Option(ENGINE.max_num_seqs, help="shardgen engine: most sequences per step."),
    max_num_batched_tokens: int = typer.Option(ENGINE.max_num_batched_tokens, help="shardgen engine: most tokens per step."),
    gpu_memory_utilization: float = typer.Option(ENGINE.gpu_memory_utilization,
                                                 help="shardgen engine: share of GPU memory to use."),
    enforce_eager: bool = typer.Option(False, "--enforce-eager", help="shardgen engine: no CUDA graphs."),
    results_dir: Path = typer.Option(Path("benchmarks/results"), help="Where the JSON and PNG go."),
    shape: str = typer.Option("llama-8b", help="Model shape: llama-8b (Llama-3.1-8B), llama-70b, or qwen3-30b-a3b "
                                               "(Qwen3-30B-A3B, 128 experts, 8 a token)."),
    checkpoint_dir: Optional[Path] = typer.Option(None, help="Where the int4 checkpoint of the shape is written (reused "
                                                        "if present); default /tmp/shardgen-bench-<shape>-int4."),
) -> None:
    """Benchmark a model of a real shape with random weights on one GPU: shardgen (int4 in each layout; bf16) vs
    Hugging Face generate."""
    import torch

    try:  # the harness lives in the repository's benchmarks/ package, beside its results; it is not installed
        from benchmarks.bench import BenchConfig, run_bench
    except ImportError:
        _fail("shardgen bench runs from a checkout of the shardgen repository (its benchmarks/ folder): cd into it, "
              "or run python -m benchmarks.bench there")
    if not torch.cuda.is_available():
        _fail("shardgen bench needs a CUDA GPU (and fbgemm-gpu-genai for int4); none is visible here")
    try:
        config = BenchConfig(workloads=tuple(workloads.split(",")), systems=tuple(systems.split(",")), scale=scale,
                             max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             gpu_memory_utilization=gpu_memory_utilization, results_dir=results_dir,
                             checkpoint_dir=checkpoint_dir, shape=shape, cuda_graphs=not enforce_eager,
                             kernel_cache_dir=user_cache_dir())
    except ValueError as e:
        _fail(str(e))
    run_bench(config)


@app.command(epilog="Example: shardgen inspect ./Llama-3.2-1B-int4")
def inspect(
    model: str = typer.Argument(..., help="Checkpoint directory, or a model id in the local Hugging Face cache."),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help=ALLOW_PICKLE_HELP),
) -> None:
    """Describe a checkpoint: architecture, shape, quantization, size on disk, and which --tp values work."""
    from shardgen.actors.model.checkpoint import Checkpoint
    from shardgen.actors.model.config import ModelConfig

    from shardgen.actors.model.hub import resolve_model

    try:
        model = resolve_model(model)
        cfg = ModelConfig.from_dir(model)
        with Checkpoint(model, allow_pickle) as ckpt:
            entries = list(ckpt.entries.values())
            files = ckpt.files
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    size = sum(f.stat().st_size for f in files)
    int4_n = sum(e.is_int4 for e in entries)
    groups = sorted({e.group_size for e in entries if e.is_int4})
    typer.echo(f"{model}: {cfg.architecture}, {cfg.num_layers} layers, hidden {cfg.hidden_size}, intermediate "
               f"{cfg.intermediate_size}, {cfg.num_heads} heads / {cfg.num_kv_heads} KV heads, vocab {cfg.vocab_size}")
    if cfg.moe:
        experts_int4 = sum(e.is_int4 and ".experts." in e.name for e in entries)
        typer.echo(f"experts: {cfg.moe.num_experts} in each of {sum(cfg.moe.sparse)} MoE layers, top {cfg.moe.top_k} "
                   f"a token{' (renormalised)' if cfg.moe.norm_topk_prob else ''}, expert intermediate "
                   f"{cfg.moe.intermediate_size}; {experts_int4} int4 expert weights, routers "
                   f"{'float' if not any(e.is_int4 and e.name.endswith('.gate.weight') for e in entries) else 'int4'}")
    quant = f"plain int4, group size {cfg.quant.group_size}" if cfg.quant else "none (float)"
    typer.echo(f"quantization: {quant}; {int4_n} int4 weights (group sizes {groups or '-'}), "
               f"{len(entries) - int4_n} float tensors")
    typer.echo(f"size on disk: {size / 2**30:.3f} GiB in {len(files)} safetensors file(s)")
    problems = run_problems(model, allow_pickle, sorted(set(groups) | ({cfg.quant.group_size} if cfg.quant else set())))
    if problems:
        for problem in problems:
            typer.secho(f"error: {as_flags(problem)}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=2)
    groups_by_module = {e.name.rsplit(".", 1)[0]: e.group_size for e in entries if e.is_int4}
    valid = cfg.valid_tp_sizes(groups_by_module)
    typer.echo(f"valid --tp: {valid}")
    for t in range(2, max(valid + [8]) + 1):  # why each small --tp that is not valid is not
        if t not in valid:
            _echo(f"  --tp {t}: {'; '.join(cfg.tp_problems(t, groups_by_module))}")


def run_problems(model: Path, allow_pickle: bool, group_sizes: list[int]) -> list[str]:
    """What ``shardgen run`` would refuse in this model directory (the same checks, at --tp 1)."""
    from shardgen.actors import int4
    from shardgen.actors.model.loader import check_checkpoint
    from shardgen.actors.model.tokenizer import check_tokenizer_files

    checks = [lambda: check_checkpoint(model, 1, allow_pickle), lambda: check_tokenizer_files(model)]
    checks += [lambda g=g: int4.check_group_size(g, f"{model}") for g in group_sizes]
    problems = []
    for check in checks:
        try:
            check()
        except (ValueError, FileNotFoundError) as e:
            problems.append(str(e))
    return problems


if __name__ == "__main__":
    main()
