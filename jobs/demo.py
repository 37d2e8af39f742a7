"""The embedded default of ``shardgen run``: a small Llama-shaped plain int4 model (random weights, fixed seed)
with a byte-level tokenizer, and a prompt set. Built deterministically on first use; no download."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

DEMO_VERSION = "v1"
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 264, "hidden_size": 256,
    "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 257, "eos_token_id": 256, "torch_dtype": "bfloat16",
}
SPECIAL = ["<|endoftext|>", "<|begin_of_text|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
TOPICS = ["a binary search", "a web server", "the weather", "a sorting function", "Ray clusters", "int4 weights",
          "a cache", "tensor parallelism", "a parser", "the ocean"]
STARTS = ["def solve(", "Once upon a time", "The quick brown fox", "SELECT * FROM", "import torch\n",
          "Q: What is", "# TODO:", "Dear team,", "class Node:", "In 2026,"]


def demo_assets(cache_dir: Path) -> tuple[Path, Path]:
    """(model directory, prompts file) of the demo, building them under ``cache_dir`` if missing."""
    root = cache_dir / f"demo-{DEMO_VERSION}"
    model, prompts = root / "model", root / "prompts.jsonl"
    if not (root / "READY").exists():
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".building-"))
        _build_model(tmp / "model")
        _write_prompts(tmp / "prompts.jsonl")
        (tmp / "READY").write_text(DEMO_VERSION)
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
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


def _build_model(directory: Path) -> None:
    import torch

    from actors import int4
    from actors.checkpoint import PlannedTensor, save_checkpoint
    from actors.config import QuantConfig

    c = DEMO_CONFIG
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = c["num_key_value_heads"] * h // c["num_attention_heads"]
    gen = torch.Generator().manual_seed(20261125)

    def rand(*shape: int, std: float = 0.08) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)

    group = 64
    plan = [PlannedTensor.of("model.embed_tokens.weight", rand(v, h, std=1.0))]
    for n in range(layers):
        p = f"model.layers.{n}"
        plan += [PlannedTensor.of(f"{p}.input_layernorm.weight", torch.ones(h, dtype=torch.bfloat16)),
                 PlannedTensor.of(f"{p}.post_attention_layernorm.weight", torch.ones(h, dtype=torch.bfloat16))]
        for name, shape in [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
                            ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
                            ("mlp.down_proj", (h, i))]:
            plan.append(PlannedTensor.of(f"{p}.{name}.weight", int4.quantize(rand(*shape), group)))
    plan += [PlannedTensor.of("model.norm.weight", torch.ones(h, dtype=torch.bfloat16)),
             PlannedTensor.of("lm_head.weight", rand(v, h))]
    save_checkpoint(directory, plan)
    config = dict(c, quantization_config=QuantConfig(group).to_hf_dict())
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": c["eos_token_id"]}) + "\n")
    build_byte_tokenizer(directory)


def _write_prompts(path: Path, count: int = 200) -> None:
    with open(path, "w") as f:
        for n in range(count):
            prompt = f"{STARTS[n % len(STARTS)]} {TOPICS[(n // len(STARTS)) % len(TOPICS)]}"
            f.write(json.dumps({"id": f"demo-{n:04d}", "prompt": prompt, "max_new_tokens": 16 + (n * 7) % 33}) + "\n")
