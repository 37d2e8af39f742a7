"""Detokenize stage (CPU): completion token ids -> completion text.

A completion that a stop string ended comes from the engine already cut (``completion_text``, its token ids cut
with it: ``actors/engine/stops.py``); every other one is decoded here, off the GPU nodes' engine thread.
"""

from __future__ import annotations

import pyarrow as pa

from shardgen.pipeline.columns import output_table

READS = ("completion_token_ids", "completion_text", "finish_reason")
WRITES = ("completion",)


class DetokenizeStage:
    """``output_only``: return only the output columns (``columns.OUTPUT_SCHEMA``), as a processor's last stage."""

    def __init__(self, model_dir: str, output_only: bool = False) -> None:
        from shardgen.actors.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        self.output_only = output_only

    def __call__(self, batch: pa.Table) -> pa.Table:
        completions = []
        for toks, text, reason in zip(batch.column("completion_token_ids").to_pylist(),
                                      batch.column("completion_text").to_pylist(),
                                      batch.column("finish_reason").to_pylist()):
            if reason == "error":
                completions.append(None)
            elif text is not None:
                completions.append(text)
            else:
                completions.append(self.tokenizer.decode(toks, skip_special_tokens=True))
        batch = batch.append_column("completion", pa.array(completions, pa.string()))
        return output_table(batch) if self.output_only else batch
