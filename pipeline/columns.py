"""The columns that travel between the stages in their Arrow form: a row's sampling parameters as one struct column
(written by tokenize, read by generate and detokenize), and the output schema the writer keeps."""

from __future__ import annotations

import pyarrow as pa

from shardgen.actors.engine.sequence import SEED_MODULUS, SamplingParams

PARAMS = pa.struct([
    ("max_new_tokens", pa.int64()),
    ("temperature", pa.float64()),
    ("top_p", pa.float64()),
    ("top_k", pa.int64()),
    ("seed", pa.int64()),  # null: unseeded
    ("stop", pa.list_(pa.string())),
    ("stop_token_ids", pa.list_(pa.int64())),
    ("ignore_eos", pa.bool_()),
    ("logprobs", pa.int64()),
    ("prompt_logprobs", pa.bool_()),
    ("n", pa.int64()),
    ("json_schema", pa.string()),
    ("regex", pa.string()),
    ("choice", pa.list_(pa.string())),
    ("repetition_penalty", pa.float64()),
    ("presence_penalty", pa.float64()),
    ("frequency_penalty", pa.float64()),
    ("min_p", pa.float64()),
    ("min_tokens", pa.int64()),
])
TOP_LOGPROBS = pa.list_(pa.list_(pa.struct([("token_id", pa.int32()), ("logprob", pa.float32())])))

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("sample_index", pa.int32()),  # 0..n-1 for the n samples of a row; null on an error row (one per input row)
    ("prompt", pa.string()),
    ("completion", pa.string()),
    ("completion_token_ids", pa.list_(pa.int32())),
    ("prompt_tokens", pa.int32()),
    ("completion_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("error", pa.string()),
    ("logprobs", pa.list_(pa.float32())),  # null unless the row asked for logprobs
    ("top_logprobs", TOP_LOGPROBS),
    ("prompt_logprobs", pa.list_(pa.float32())),  # null unless asked; the first prompt token's is null
])


# Columns the stages hand on that are not output. With the output columns, no input column may be named so: the
# input's other columns are carried through the stages beside them, into the output.
STAGE_COLUMNS = ("row", "params", "prompt_token_ids", "completion_text", "layout")
RESERVED = frozenset(OUTPUT_SCHEMA.names) | frozenset(STAGE_COLUMNS)


def carried(table: pa.Table) -> list[str]:
    """The input's own columns that ride along in ``table`` (everything the stages did not make)."""
    return [c for c in table.column_names if c not in RESERVED]


def output_table(block: pa.Table) -> pa.Table:
    """What a part file holds of finished rows: the output columns in ``OUTPUT_SCHEMA``'s order and types, then the
    input's carried columns as they came."""
    out = block.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA)
    for name in carried(block):
        out = out.append_column(block.schema.field(name), block.column(name))
    return out


def params_array(params: list[SamplingParams | None]) -> pa.Array:
    """Each row's parameters (None: a row that failed before it had any) as a ``PARAMS`` column."""
    def row(p: SamplingParams | None) -> dict | None:
        if p is None:
            return None
        # A seed of any size fits int64 as its remainder, which samples exactly as the seed does.
        seed = None if p.seed is None else p.seed % SEED_MODULUS
        return {"max_new_tokens": p.max_new_tokens, "temperature": float(p.temperature), "top_p": float(p.top_p),
                "top_k": p.top_k, "seed": seed, "stop": list(p.stop), "stop_token_ids": list(p.stop_token_ids),
                "ignore_eos": p.ignore_eos, "logprobs": p.logprobs,
                "prompt_logprobs": p.prompt_logprobs, "n": p.n, "json_schema": p.json_schema, "regex": p.regex,
                "choice": None if p.choice is None else list(p.choice),
                "repetition_penalty": float(p.repetition_penalty), "presence_penalty": float(p.presence_penalty),
                "frequency_penalty": float(p.frequency_penalty), "min_p": float(p.min_p), "min_tokens": p.min_tokens}

    return pa.array([row(p) for p in params], PARAMS)


def params_list(column: pa.ChunkedArray | pa.Array) -> list[SamplingParams | None]:
    """The ``SamplingParams`` of each row of a ``PARAMS`` column."""
    return [None if d is None else SamplingParams(**{**d, "stop": tuple(d["stop"]),
                                                     "stop_token_ids": tuple(d["stop_token_ids"]),
                                                     "choice": None if d["choice"] is None else tuple(d["choice"])})
            for d in column.to_pylist()]
