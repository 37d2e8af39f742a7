"""What a finished run says: rows, errors, tokens, throughput, wall time, and the device and layouts that ran it."""

from __future__ import annotations

from dataclasses import dataclass

from shardgen.pipeline.stages import write
from shardgen.pipeline.storage import Location


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
    layout: str  # the hardware layouts of this run's replicas ("nothing written" when no row was generated)
    resumed: int = 0  # rows a resumed run found already written
    cached_prompt_tokens: int = 0  # prompt tokens the replicas' prefix caches gave instead of computing them
    inputs: int | None = None  # input rows answered, when it differs from rows (n samples per row)

    def _cached(self) -> str:
        if not self.cached_prompt_tokens or not self.prompt_tokens:
            return ""
        share = min(self.cached_prompt_tokens / self.prompt_tokens, 1.0)
        return f" ({self.cached_prompt_tokens:,}, {share:.0%}, from the prefix cache)"

    def lines(self) -> list[str]:
        wall = max(self.wall_s, 1e-9)
        before = f"; {self.resumed:,} rows were there already" if self.resumed else ""
        inputs = f"{self.inputs:,} input rows, " if self.inputs is not None and self.inputs != self.rows else ""
        return [
            f"shardgen run: {self.rows:,} rows ({inputs}{self.errors:,} errors) written to {self.output} ({self.files} files){before}",
            f"  tokens: {self.prompt_tokens:,} prompt{self._cached()}, {self.generated_tokens:,} generated; "
            f"{self.generated_tokens / wall:,.1f} generated tokens/s, {(self.prompt_tokens + self.generated_tokens) / wall:,.1f} total tokens/s",
            f"  wall time {self.wall_s:.1f} s on {self.device} ({self.layout})",
        ]


def summarise(output: Location, before: list[Location], wall_s: float, device: str, layouts: list[str],
              resumed: int, cached_prompt_tokens: int = 0) -> RunSummary:
    """The summary of the part files in ``output`` that were not there ``before`` (rows written early by the generate
    stage never pass the sink, so they are counted from the files). ``layouts``: what the replicas reported."""
    seen = {f.path for f in before}
    stats = write.WriteStats()
    for path in write.existing_output(output):
        if path.path not in seen:
            stats.add(write.read_stats(path))
    layout = ", ".join(sorted(set(layouts))) if stats.rows else "nothing written"
    return RunSummary(output, stats.rows, stats.errors, stats.prompt_tokens, stats.completion_tokens, wall_s,
                      stats.files, device, layout or "?", resumed, cached_prompt_tokens, stats.inputs)
