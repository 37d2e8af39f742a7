"""Detokenize stage (CPU): completion token ids -> completion text, cut before the first stop string."""

from __future__ import annotations

import pyarrow as pa

from actors.sequence import SamplingParams

READS = ("completion_token_ids", "params", "finish_reason")
WRITES = ("completion",)


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


class DetokenizeStage:
    def __init__(self, model_dir: str) -> None:
        from actors.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        completions = []
        for toks, params, reason in zip(batch.column("completion_token_ids").to_pylist(),
                                        batch.column("params").to_pylist(), batch.column("finish_reason").to_pylist()):
            if reason == "error":
                completions.append(None)
                continue
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            stops = SamplingParams.from_json(params).stop if params else ()
            completions.append(cut_at_stop(text, stops) if stops else text)
        return batch.append_column("completion", pa.array(completions, pa.string()))
