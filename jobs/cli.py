"""The ``shardgen`` command line. Heavy imports (torch, torchao, ray) happen inside commands so ``--help`` is instant."""

from __future__ import annotations

import logging
from pathlib import Path

import typer


class _DropTorchaoCppNotice(logging.Filter):
    """torchao logs that its own C++ CPU ops are skipped; shardgen does not use them (int4 runs on fbgemm or dequantized)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Skipping import of cpp extensions" not in record.getMessage()


logging.getLogger("torchao").addFilter(_DropTorchaoCppNotice())

app = typer.Typer(
    name="shardgen",
    help="Distributed batch inference for int4 LLMs on Ray.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


@app.command(epilog="Example: shardgen quantize ./Llama-3.2-1B ./Llama-3.2-1B-int4 --group-size 128")
def quantize(
    src: Path = typer.Argument(..., help="Float (bf16/fp16/fp32) Hugging Face model directory with *.safetensors."),
    dst: Path = typer.Argument(..., help="Output directory for the plain int4 checkpoint."),
    group_size: int = typer.Option(128, help="int4 group size G along K (32, 64, 128)."),
    quantize_lm_head: bool = typer.Option(False, help="Quantize lm_head too (kept in the float dtype by default)."),
    max_shard_size_gb: float = typer.Option(5.0, help="Largest safetensors shard to write, in GiB."),
    overwrite: bool = typer.Option(False, help="Replace DST if it is not empty."),
) -> None:
    """Quantize a local float model to shardgen's plain int4 checkpoint, one tensor at a time."""
    from actors.quantize import quantize_checkpoint

    try:
        r = quantize_checkpoint(src, dst, group_size, quantize_lm_head, int(max_shard_size_gb * 2**30), overwrite)
    except (ValueError, FileNotFoundError) as e:
        _fail(str(e))
    for name in r.unquantizable:
        typer.secho(f"kept in float, cannot be grouped: {name}", fg=typer.colors.YELLOW)
    typer.echo(
        f"wrote {r.output}: {r.int4_weights} int4 weights (G={group_size}), {len(r.kept_dense)} float tensors, "
        f"{r.bytes_in / 2**20:.1f} MiB -> {r.bytes_out / 2**20:.1f} MiB in {r.seconds:.1f} s"
    )


@app.command(epilog="Example: shardgen run --model ./Llama-3.2-1B-int4 --input prompts.parquet --output out/")
def run() -> None:
    """Generate completions for a table of prompts (the batch pipeline arrives with issue 4)."""
    typer.echo("shardgen run: not yet - the batch pipeline (engine, Ray actors, Parquet output) lands in the next issue.")
    typer.echo("Available now: `shardgen quantize SRC DST` and the int4 model in actors/ (see README).")


if __name__ == "__main__":
    app()
