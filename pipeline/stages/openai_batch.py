"""OpenAI Batch API input files (``input_format`` openai-batch): each JSONL line is one request,

    {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": [...], ...}}

or ``"url": "/v1/completions"`` with ``body.prompt``, and becomes one input row of the pipeline: id = custom_id, the
prompt (chat messages as JSON, with ``chat`` set so that the tokenize stage applies the chat template), and the
body's sampling fields under shardgen's names. A line that is not such a request becomes an error row naming the
line and the field; a field that would change the completion and that shardgen does not run (a logit
bias, tools) is an error too, never silently dropped. Informational fields (``model``,
``user``, ``metadata``, ...) are ignored: the run's model answers every request.
"""

from __future__ import annotations

import json

import pyarrow as pa

ID_FIELD = "custom_id"
FIELDS = ("custom_id", "method", "url", "body")
CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
# body field -> shardgen's per-row column (same meaning)
RENAMED = {"max_tokens": "max_new_tokens", "max_completion_tokens": "max_new_tokens", "temperature": "temperature",
           "top_p": "top_p", "n": "n", "stop": "stop", "seed": "seed", "frequency_penalty": "frequency_penalty",
           "presence_penalty": "presence_penalty"}
# body fields shardgen does not run, with the values that change nothing (any other value is refused)
NEUTRAL = {"logit_bias": ({},), "stream": (False,),
           "echo": (False,), "best_of": (1,), "suffix": ("",), "tools": ([],), "tool_choice": ("none",)}


def normalize(columns: dict[str, list], errors: list[str | None], positions: tuple[str, int]) -> pa.Table:
    """A chunk of request lines (``FIELDS`` as parsed, and per line what made it unreadable) as (id, prompt, row)."""
    from shardgen.pipeline.stages.read import READ_ERROR, _id_text

    ids, prompts, rows = [], [], []
    name, start = positions
    for i, error in enumerate(errors):
        row_id = _id_text(columns[ID_FIELD][i]) if not error else None
        ids.append(row_id if row_id is not None else f"{name}:{start + i}")
        try:
            if error:
                raise ValueError(f"{name} {error}")
            if row_id is None:
                raise ValueError(f"{name} request {start + i + 1}: custom_id: missing; give every request a custom_id")
            prompt, row = request_row(columns["method"][i], columns["url"][i], columns["body"][i])
        except ValueError as e:
            where = "" if error or row_id is None else f"{name} request {row_id!r}: "
            prompts.append(None)
            rows.append(json.dumps({READ_ERROR: f"{where}{e}"}))
            continue
        prompts.append(prompt)
        rows.append(json.dumps(row, default=str))
    return pa.table({"id": pa.array(ids, pa.string()), "prompt": pa.array(prompts, pa.string()),
                     "row": pa.array(rows, pa.string())})


def request_row(method: object, url: object, body: object) -> tuple[str, dict]:
    """(prompt, per-row columns) of one request; ValueError naming the field that is wrong."""
    if method not in (None, "POST"):
        raise ValueError(f"method: expected POST, got {method!r}")
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise ValueError(f"url: shardgen answers {CHAT_URL} and {COMPLETIONS_URL}, got {url!r}")
    if not isinstance(body, dict):
        raise ValueError(f"body: expected a JSON object, got {type(body).__name__}")
    row: dict = {}
    if url == CHAT_URL:
        messages = body.get("messages")
        if not (isinstance(messages, list) and messages
                and all(isinstance(m, dict) and "role" in m and "content" in m for m in messages)):
            raise ValueError("body.messages: expected a non-empty list of {role, content} messages")
        prompt, row["chat"] = json.dumps(messages), True
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str) or prompt == "":
            raise ValueError("body.prompt: expected one non-empty string (send a list of prompts as one request each)")
    for key, value in body.items():
        if key in RENAMED and value is not None:
            if RENAMED[key] in row:
                raise ValueError(f"body.{key}: give max_tokens or max_completion_tokens, not both")
            row[RENAMED[key]] = value
        elif key in NEUTRAL and value is not None and not _neutral(value, NEUTRAL[key]):
            raise ValueError(f"body.{key}: shardgen does not run {key} (got {value!r}); leave it out")
    row.update(_logprobs(url, body))
    row.update(_response_format(body.get("response_format")))
    return prompt, row


def _response_format(value: object) -> dict:
    """``response_format``: text (nothing to do), ``json_schema`` (its ``schema`` constrains the completion) or
    ``json_object`` (any JSON object)."""
    from shardgen.pipeline.stages.read import plain_json

    if value is None or value == {"type": "text"}:
        return {}
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    schema = value.get("json_schema", {}).get("schema") if kind == "json_schema" else None
    if not isinstance(schema, dict):
        raise ValueError("body.response_format: expected {\"type\": \"text\"}, {\"type\": \"json_object\"} or "
                         "{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\": {...}}}")
    return {"json_schema": json.dumps(plain_json(schema))}


def _neutral(value: object, neutral: tuple) -> bool:
    # JSON numbers arrive as their text (formats.JsonNumber): 0 and 0.0 are both neutral penalties
    try:
        return any(float(value) == n if isinstance(n, int) and not isinstance(n, bool) else value == n
                   for n in neutral)
    except (TypeError, ValueError):
        return False


def _logprobs(url: str, body: dict) -> dict:
    """shardgen's ``logprobs`` K from the request: chat asks with ``logprobs: true`` and ``top_logprobs: K``,
    completions with ``logprobs: K``. shardgen always reports at least one alternative, so K is at least 1."""
    asked = body.get("logprobs")
    if asked is None or asked is False:
        if body.get("top_logprobs") not in (None, 0, "0"):
            raise ValueError("body.top_logprobs: needs logprobs: true")
        return {}
    k = body.get("top_logprobs") if url == CHAT_URL else asked
    if url == CHAT_URL and asked is not True:
        raise ValueError(f"body.logprobs: expected true or false, got {asked!r}")
    try:
        k = int(str(k)) if k is not None else 0
    except ValueError:
        raise ValueError(f"body.{'top_logprobs' if url == CHAT_URL else 'logprobs'}: expected an integer, "
                         f"got {k!r}") from None
    return {"logprobs": max(k, 1)}
