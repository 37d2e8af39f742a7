"""Detokenize stage (CPU): completion token ids -> completion text, cut before the first stop string.

A completion cut at a stop string keeps the token ids that lie wholly before the cut, so ``completion_token_ids``
and ``completion_tokens`` describe the text, not the stop string (vLLM's ``include_stop_str_in_output=False``);
a token that straddles the cut (text before the stop string merged with its start) is dropped with it.
"""

from __future__ import annotations

import pyarrow as pa

from shardgen.pipeline.columns import params_list

READS = ("completion_token_ids", "completion_tokens", "params", "finish_reason")
WRITES = ("completion", "completion_token_ids", "completion_tokens")


def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    cuts = [text.find(s) for s in stops if s in text]
    return text[: min(cuts)] if cuts else text


class DetokenizeStage:
    def __init__(self, model_dir: str) -> None:
        from shardgen.actors.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        completions, ids = [], []
        for toks, params, reason in zip(batch.column("completion_token_ids").to_pylist(),
                                        params_list(batch.column("params")), batch.column("finish_reason").to_pylist()):
            if reason == "error":
                completions.append(None)
                ids.append(toks)
                continue
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            stops = params.stop if params else ()
            cut = cut_at_stop(text, stops) if stops else text
            if len(cut) < len(text):
                toks = self._tokens_before(toks, cut)
            completions.append(cut)
            ids.append(toks)
        batch = batch.append_column("completion", pa.array(completions, pa.string()))
        batch = batch.set_column(batch.schema.get_field_index("completion_token_ids"), "completion_token_ids",
                                 pa.array(ids, pa.list_(pa.int32())))
        return batch.set_column(batch.schema.get_field_index("completion_tokens"), "completion_tokens",
                                pa.array([len(t) for t in ids], pa.int32()))

    def _tokens_before(self, toks: list[int], cut: str) -> list[int]:
        """The longest prefix of ``toks`` whose text lies within ``cut`` (the engine stops right after the stop
        string, so this walks back a few tokens)."""
        k = len(toks)
        while k > 0 and not cut.startswith(self.tokenizer.decode(toks[:k], skip_special_tokens=True)):
            k -= 1
        return toks[:k]
