"""Tokenize stage (CPU actors): prompt text (or chat messages with --chat, or a chat request of an OpenAI batch
file) -> token ids, and each row's
sampling parameters resolved from the run's defaults and the row's own overrides.

A row that cannot be generated keeps its place: it gets an ``error`` naming the
column and the problem, and the later stages pass it through.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import pyarrow as pa

from shardgen.actors.engine.sequence import SamplingParams
from shardgen.pipeline.columns import carried, params_array
from shardgen.pipeline.stages.read import READ_ERROR

READS = ("id", "prompt", "row")
WRITES = ("id", "prompt", "prompt_token_ids", "params", "error")


def row_seed(run_seed: int, row_id: str) -> int:
    """A row's own seed from the run's --seed and its id: the same wherever and with whatever the row runs."""
    digest = hashlib.blake2b(f"{run_seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class TokenizeStage:
    """``chat_template``: a template's text, used instead of the tokenizer's own; ``system_prompt``: a system message
    put first in every chat prompt that has none."""

    def __init__(self, model_dir: str, chat: bool, defaults: SamplingParams, chat_template: str | None = None,
                 system_prompt: str | None = None) -> None:
        from shardgen.actors.model.tokenizer import load_tokenizer

        self.tokenizer = load_tokenizer(model_dir)
        if chat_template is not None:
            self.tokenizer.chat_template = chat_template
        self.chat = chat
        self.defaults = defaults
        self.system_prompt = system_prompt
        if chat and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"`chat` was given but the tokenizer in {model_dir} has no chat template")

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids, prompts = batch.column("id").to_pylist(), batch.column("prompt").to_pylist()
        token_ids, params, errors = [], [], []
        for row_id, prompt, row in zip(ids, prompts, batch.column("row").to_pylist()):
            toks, p, err = self._one(row_id, prompt, json.loads(row))
            token_ids.append(toks)
            params.append(p)
            errors.append(err)
        out = pa.table({
            "id": pa.array(ids, pa.string()), "prompt": pa.array(prompts, pa.string()),
            "prompt_token_ids": pa.array(token_ids, pa.list_(pa.int32())),
            "params": params_array(params), "error": pa.array(errors, pa.string()),
        })
        for name in carried(batch):  # the input's own columns, for the output
            out = out.append_column(batch.schema.field(name), batch.column(name))
        return out

    def _one(self, row_id: str | None, prompt: str | None, row: dict) -> tuple[list[int], SamplingParams | None, str | None]:
        if row_id is None:
            return [], None, "id: the id column is null"
        if READ_ERROR in row:
            return [], None, row[READ_ERROR]
        try:
            params = self._params(row_id, row)
        except ValueError as e:
            return [], None, str(e)
        text = prompt if prompt is not None else row.get("prompt_json")
        if self.chat or row.get("chat"):
            if not getattr(self.tokenizer, "chat_template", None):
                return [], params, "messages: the model's tokenizer has no chat template; send /v1/completions"
            try:
                messages = json.loads(text) if isinstance(text, str) else None
            except json.JSONDecodeError:
                messages = None
            if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
                return [], params, "prompt: with `chat` a prompt must be a JSON list of {role, content} messages"
            if self.system_prompt is not None and not any(m["role"] == "system" for m in messages):
                messages = [{"role": "system", "content": self.system_prompt}, *messages]
            try:
                toks = self.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            except Exception as e:  # the template's own checks (roles out of order, content it cannot render)
                return [], params, f"messages: the chat template refused them ({type(e).__name__}: {e})"
            if hasattr(toks, "keys"):  # transformers 5 returns a BatchEncoding
                toks = toks["input_ids"]
            return list(toks), params, None
        if "prompt_type" in row:
            return [], params, f"prompt: expected text, got {row['prompt_type']}"
        if text is None or text == "":
            return [], params, "prompt: empty or null"
        toks = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(toks), params, None

    def _params(self, row_id: str, row: dict) -> SamplingParams:
        values = {k: _number(row[k]) for k in (*INTEGER_COLUMNS, *NUMBER_COLUMNS) if k in row}
        for k in INTEGER_COLUMNS:
            if k in values and not _integral(values[k]):
                raise ValueError(f"{k}: expected an integer, got {values[k]!r}")
            if k in values:
                values[k] = int(values[k])
        for k in NUMBER_COLUMNS:
            if k in values and (isinstance(values[k], bool) or not isinstance(values[k], (int, float))):
                raise ValueError(f"{k}: expected a number, got {values[k]!r}")
        if "stop" in row:
            values["stop"] = _stop_list(row["stop"])
        if "stop_token_ids" in row:
            values["stop_token_ids"] = _token_ids(row["stop_token_ids"])
        constraint = _constraint(row)
        if constraint:  # a row's own constraint replaces the run's
            values.update({"json_schema": None, "regex": None, "choice": None, **constraint})
        if "seed" not in values and self.defaults.seed is not None:
            values["seed"] = row_seed(self.defaults.seed, row_id)
        p = dataclasses.replace(self.defaults, **values)
        problems = p.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return p


INTEGER_COLUMNS = ("max_new_tokens", "top_k", "seed", "logprobs", "n", "min_tokens")
NUMBER_COLUMNS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _integral(value: object) -> bool:
    return not isinstance(value, bool) and (isinstance(value, int) or (isinstance(value, float) and value.is_integer()))


def _token_ids(value: object) -> tuple[int, ...]:
    """``stop_token_ids``: a list of token ids (in CSV, a JSON list; one id alone is a list of one)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"stop_token_ids: expected a list of token ids, got {value!r}") from None
    value = [value] if not isinstance(value, list) else value
    ids = [_number(v) for v in value]
    if not all(_integral(v) and v >= 0 for v in ids):
        raise ValueError(f"stop_token_ids: expected a list of token ids (integers >= 0), got {value!r}")
    return tuple(int(v) for v in ids)


def _number(value: object) -> object:
    """A number written as text (a CSV column that also holds text) is that number; anything else is left as it is,
    for the checks to name."""
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return value
        return int(number) if number.is_integer() else number
    return value


def _constraint(row: dict) -> dict:
    """A row's structured-output columns, typed: ``json_schema`` as JSON text (a JSONL or Parquet object is written
    out), ``regex`` as text, ``choice`` as a list of strings (in CSV, a JSON list). Whether they compile is the
    engine's check (its error names the column too)."""
    out: dict = {}
    if "json_schema" in row:
        schema = row["json_schema"]
        if isinstance(schema, str):
            try:
                json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"json_schema: not JSON ({e})") from None
        elif isinstance(schema, dict):
            schema = json.dumps(schema)
        else:
            raise ValueError(f"json_schema: expected a JSON Schema object or its text, got {type(schema).__name__}")
        out["json_schema"] = schema
    if "regex" in row:
        if not isinstance(row["regex"], str):
            raise ValueError(f"regex: expected text, got {type(row['regex']).__name__}")
        out["regex"] = row["regex"]
    if "choice" in row:
        choice = row["choice"]
        if isinstance(choice, str):
            try:
                choice = json.loads(choice)
            except json.JSONDecodeError:
                raise ValueError("choice: expected a list of strings (in CSV, a JSON list)") from None
        if not isinstance(choice, list) or not all(isinstance(c, str) and c for c in choice) or not choice:
            raise ValueError(f"choice: expected a non-empty list of non-empty strings, got {choice!r}")
        out["choice"] = tuple(choice)
    return out


def _stop_list(value: object) -> tuple[str, ...]:
    """A list of stop strings, or one string (as vLLM and the OpenAI API take it). CSV cannot hold lists: a cell that
    is a JSON list is that list."""
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = None
        value = parsed if isinstance(parsed, list) else [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ValueError(f"stop: expected a list of non-empty strings, got {value!r}")
    return tuple(value)
