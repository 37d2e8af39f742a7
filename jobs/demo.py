"""The embedded default of ``shardgen run`` (a trained plain int4 model shipped in ``jobs/demo_model``), and the
byte-level tokenizer the tests build for their own tiny models."""

from __future__ import annotations

from pathlib import Path

SPECIAL = ["<|endoftext|>", "<|begin_of_text|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
DEMO_DIR = Path(__file__).resolve().with_name("demo_model")


def demo_assets() -> tuple[Path, Path]:
    """(model directory, prompts file) of the embedded demo: a small Llama trained on the Python standard library
    (``scripts/train_demo_model.py``), quantized to plain int4 (G=128) by ``shardgen quantize``, and the first
    two lines of 200 held-out functions as prompts."""
    model, prompts = DEMO_DIR / "model", DEMO_DIR / "prompts.jsonl"
    if not (model / "config.json").is_file() or not prompts.is_file():
        raise FileNotFoundError(f"the embedded demo is missing from {DEMO_DIR}; reinstall shardgen")
    return model, prompts


def _byte_vocab() -> dict[str, int]:
    """GPT-2's byte-to-unicode table: every byte gets a printable character, so byte-level BPE has 256 base tokens."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return {chars[b]: b for b in range(256)}


def build_byte_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (256 byte tokens, 4 specials, a chat template) saved in transformers format."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab=_byte_vocab(), merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL[0], bos_token=SPECIAL[1], pad_token=SPECIAL[0])
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)
