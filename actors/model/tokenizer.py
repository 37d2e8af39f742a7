"""The model's tokenizer, from local files only (no download, no remote code)."""

from __future__ import annotations

import json
from pathlib import Path


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load the tokenizer from {model_dir} ({e}); the model directory needs tokenizer.json "
                         f"or the tokenizer files transformers writes") from e


# A tokenizer needs one of these (fast tokenizers' tokenizer.json; SentencePiece; BPE or WordPiece vocabularies).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")


def check_tokenizer_files(model_dir: str | Path, chat: bool = False) -> None:
    """Refuse, from the files alone (no transformers import), a model directory without a tokenizer, or without a
    chat template when ``chat``."""
    model_dir = Path(model_dir)
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{model_dir} has no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); copy them "
                                f"from the original model directory (shardgen quantize copies them)")
    if chat and not has_chat_template(model_dir):
        raise ValueError(f"`chat`: the tokenizer in {model_dir} has no chat template (no chat_template in "
                         f"tokenizer_config.json, no {' or '.join(CHAT_TEMPLATE_FILES)}); drop `chat` to send the "
                         f"prompts as plain text, or add the model's template")


def has_chat_template(model_dir: Path) -> bool:
    if any((model_dir / name).is_file() for name in CHAT_TEMPLATE_FILES):
        return True
    config = model_dir / "tokenizer_config.json"
    try:
        return bool(config.is_file() and json.loads(config.read_text()).get("chat_template"))
    except (OSError, ValueError):
        return False  # transformers names an unreadable tokenizer_config.json when it loads the tokenizer


def eos_token_ids(model_dir: str | Path, config_eos: tuple[int, ...], tokenizer) -> set[int]:
    """EOS ids from config.json, the tokenizer and generation_config.json together."""
    ids = set(config_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(model_dir) / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    return ids
