"""Model ids (``org/name``) resolved through the local Hugging Face cache, offline: the directory that
``transformers`` would load with ``HF_HUB_OFFLINE=1``. Nothing is downloaded; a model that is not in the cache is
refused with where shardgen looked and how to fetch it."""

from __future__ import annotations

import re
from pathlib import Path

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str | Path, cache_dir: str | Path | None = None) -> Path:
    """``model`` itself when it is a path that exists or does not look like a Hub id; else the cached snapshot of
    that id (``cache_dir``: the hub cache; None: ``HF_HUB_CACHE``, or ``HF_HOME``/hub, as huggingface_hub reads
    them)."""
    path = Path(model)
    if path.exists() or not REPO_ID.match(str(model)):
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import LocalEntryNotFoundError

    where = cache_dir or HF_HUB_CACHE
    try:
        return Path(snapshot_download(str(model), local_files_only=True, cache_dir=cache_dir))
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"`model` {model} is not a directory, and not a model in the local Hugging Face cache ({where}; set by "
            f"HF_HUB_CACHE or HF_HOME). Fetch it on a machine that reaches the Hub with `hf download {model}` (the "
            f"cache must be on storage every node sees), or pass the model's directory") from None
