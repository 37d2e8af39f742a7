"""``output_format`` openai-batch: the run's Parquet part files as one OpenAI Batch API output file.

Written at the end of a run (a resumed run included) from every part file in the output, so the part files stay
the truth that resume reads: ``openai-batch-output.jsonl`` holds one line per request,

    {"id": "batch_req_...", "custom_id": ..., "response": {"status_code": 200, "request_id": ..., "body": ...},
     "error": null}

with a ``chat.completion`` body for a ``/v1/chat/completions`` request and a ``text_completion`` body for a
``/v1/completions`` one (a row's n samples are its n choices), or, for a request shardgen refused,
``"response": null`` and ``"error": {"code": "invalid_request", "message": ...}``. Lines come in no particular order,
as in OpenAI's own output files: match them by ``custom_id``.
"""

from __future__ import annotations

import json
import time
import uuid
from itertools import accumulate, groupby
from pathlib import Path

import pyarrow.parquet as pq

from shardgen.pipeline.output_dir import OPENAI_BATCH_OUTPUT
from shardgen.pipeline.stages import openai_batch
from shardgen.pipeline.formats import json_chunks
from shardgen.pipeline.storage import Location

COLUMNS = ["id", "sample_index", "completion", "completion_token_ids", "prompt_tokens", "completion_tokens",
           "finish_reason", "error", "logprobs", "top_logprobs"]


def write_batch_output(output: Location, inputs: list[Location], model_dir: Path) -> int:
    """Write ``OPENAI_BATCH_OUTPUT`` in ``output`` from its part files; returns the lines written. ``inputs``: the
    request files (each request's url and model); ``model_dir``: for the tokens' text in logprobs, and the model
    name of requests that give none."""
    from shardgen.actors.model.tokenizer import load_tokenizer
    from shardgen.pipeline.stages.write import existing_output

    requests = _requests(inputs)
    tokenizer = load_tokenizer(str(model_dir))
    created = int(time.time())
    lines = []
    for part in existing_output(output):
        rows = pq.read_table(part.open(), columns=COLUMNS).to_pylist()
        rows.sort(key=lambda r: (r["id"], r["sample_index"] or 0))
        for custom_id, group in groupby(rows, key=lambda r: r["id"]):
            url, model, k = requests.get(custom_id, (openai_batch.COMPLETIONS_URL, None, 0))
            lines.append(json.dumps(_line(custom_id, list(group), url, model or model_dir.name, k, created,
                                          tokenizer)))
    output.child(OPENAI_BATCH_OUTPUT).write_bytes("".join(line + "\n" for line in lines).encode())
    return len(lines)


def _requests(inputs: list[Location]) -> dict[str, tuple[str, str | None, int]]:
    """custom_id -> (url, body.model, the alternatives asked per token) of every request line that has them."""
    out = {}
    for file in inputs:
        for columns, errors in json_chunks(file, ["custom_id", "url", "body"], 8192):
            for custom_id, url, body, error in zip(columns["custom_id"], columns["url"], columns["body"], errors):
                if not error and custom_id is not None:
                    body = body if isinstance(body, dict) else {}
                    model = body.get("model")
                    k = body.get("top_logprobs") if url == openai_batch.CHAT_URL else body.get("logprobs")
                    try:
                        k = int(str(k)) if k is not None else 0
                    except ValueError:  # the request was refused: its line is an error
                        k = 0
                    out[str(custom_id)] = (url, model if isinstance(model, str) else None, k)
    return out


def _line(custom_id: str, rows: list[dict], url: str, model: str, k: int, created: int, tokenizer) -> dict:
    line = {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id}
    if rows[0]["finish_reason"] == "error":
        return {**line, "response": None, "error": {"code": "invalid_request", "message": rows[0]["error"]}}
    chat = url == openai_batch.CHAT_URL
    choices = [_chat_choice(r, k, tokenizer) if chat else _text_choice(r, k, tokenizer) for r in rows]
    completion_tokens = sum(r["completion_tokens"] for r in rows)
    body = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion", "created": created, "model": model,
            "choices": choices,
            "usage": {"prompt_tokens": rows[0]["prompt_tokens"], "completion_tokens": completion_tokens,
                      "total_tokens": rows[0]["prompt_tokens"] + completion_tokens}}
    return {**line, "response": {"status_code": 200, "request_id": uuid.uuid4().hex, "body": body}, "error": None}


def _chat_choice(row: dict, k: int, tokenizer) -> dict:
    """One sample as a chat choice; with logprobs, each token's and its ``k`` most likely alternatives (shardgen
    computed at least one)."""
    logprobs = None
    if row["logprobs"] is not None:
        content = []
        for token, lp, top in zip(row["completion_token_ids"], row["logprobs"], row["top_logprobs"]):
            content.append({**_token(tokenizer, token), "logprob": lp,
                            "top_logprobs": [{**_token(tokenizer, t["token_id"]), "logprob": t["logprob"]}
                                             for t in top[:k]]})
        logprobs = {"content": content, "refusal": None}
    return {"index": row["sample_index"], "message": {"role": "assistant", "content": row["completion"]},
            "logprobs": logprobs, "finish_reason": row["finish_reason"]}


def _text_choice(row: dict, k: int, tokenizer) -> dict:
    """One sample as a text completion choice (``text_offset``: where each token starts in the completion)."""
    logprobs = None
    if row["logprobs"] is not None:
        tokens = [_token(tokenizer, t)["token"] for t in row["completion_token_ids"]]
        offsets = list(accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else []
        logprobs = {"tokens": tokens, "token_logprobs": list(row["logprobs"]), "text_offset": offsets,
                    "top_logprobs": [{_token(tokenizer, t["token_id"])["token"]: t["logprob"] for t in top[:k]}
                                     for top in row["top_logprobs"]]}
    return {"index": row["sample_index"], "text": row["completion"], "logprobs": logprobs,
            "finish_reason": row["finish_reason"]}


def _token(tokenizer, token_id: int) -> dict:
    text = tokenizer.decode([token_id])
    return {"token": text, "bytes": list(text.encode("utf-8"))}
