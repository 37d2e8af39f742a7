"""Detokenize stage (CPU): completion token ids -> completion text.

A completion that a stop string ended comes from the engine already cut (``completion_text``, its token ids cut
with it: ``actors/engine/stops.py``); every other one is decoded here, off the GPU nodes' engine thread.
"""

from __future__ import annotations

import pyarrow as pa

READS = ("completion_token_ids", "completion_text", "finish_reason")
WRITES = ("completion",)


class DetokenizeStage:
    def __init__(self, model_dir: str) -> None:
        from shardgen.actors.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)

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
        return batch.append_column("completion", pa.array(completions, pa.string()))
