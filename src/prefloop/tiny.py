"""Tiny models and tokenizers built locally from configs (tests, benchmarks, the testbed).

Nothing here downloads anything: a byte-level BPE tokenizer is trained on the caller's
texts and real `transformers` architectures are instantiated with random weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, chat_template: bool = True):
    """Train a byte-level BPE tokenizer on `texts`; `<|end|>` is EOS, `<|pad|>` is padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>", padding_side="right"
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


SIZES: dict[str, dict[str, int]] = {
    # hidden, layers, heads, kv heads, intermediate
    "nano": dict(hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64),
    "micro": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128),
    "small": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
    # SmolLM2-135M's shape
    "smollm2-135m": dict(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536),
}


def model_config(arch: str, vocab_size: int, size: str = "nano", **overrides: Any):
    """A `transformers` config of architecture `arch` (llama, qwen2, gpt2) and preset `size`."""
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    s = SIZES[size]
    common = dict(vocab_size=vocab_size, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
            intermediate_size=s["intermediate"], max_position_embeddings=2048, **common,
        )
    elif arch == "qwen2":
        cfg = Qwen2Config(
            hidden_size=s["hidden"], num_hidden_layers=s["layers"],
            num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
            intermediate_size=s["intermediate"], max_position_embeddings=2048, **common,
        )
    elif arch == "gpt2":
        cfg = GPT2Config(
            n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["intermediate"],
            n_positions=2048, bos_token_id=1, **common,
        )
    else:
        raise ValueError(f"unknown architecture {arch!r}; choose from gpt2, llama, qwen2")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def build_causal_lm(arch: str, tokenizer, size: str = "nano", seed: int = 0, **overrides: Any):
    """A randomly initialised causal LM whose special-token ids match `tokenizer`."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = model_config(arch, len(tokenizer), size, **overrides)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


def save_pretrained_pair(model, tokenizer, directory: str | Path) -> Path:
    """Save model (safetensors) and tokenizer side by side, as `from_pretrained` expects."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


_FILLER = [
    "Let me explain this step by step.",
    "This is a common kind of question.",
    "Adding numbers means counting on from the first one.",
    "I hope this answer helps you.",
    "Remember to check your work carefully.",
    "Numbers can be added in any order.",
    "We start with the first number and add the second.",
    "The result is a whole number.",
]


def synthetic_preferences(n: int, seed: int = 0, chat: bool = False, max_filler: int = 4):
    """Addition questions: chosen is correct, rejected is wrong; both padded with filler
    sentences of random count so that lengths vary. Rows in TRL's preference format."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
        prompt = f"What is {a} plus {b}?"

        def answer(value: int, a: int = a, b: int = b) -> str:
            filler = " ".join(rng.sample(_FILLER, rng.randint(0, max_filler)))
            return (filler + " " if filler else "") + f"{a} plus {b} is {value}."

        chosen, rejected = answer(a + b), answer(wrong)
        if chat:
            rows.append({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
            })
        else:
            rows.append({"prompt": prompt + "\n", "chosen": chosen, "rejected": rejected})
    return rows


def synthetic_corpus(n: int = 400, seed: int = 0) -> list[str]:
    """Texts to train a tokenizer that covers `synthetic_preferences`."""
    rows = synthetic_preferences(n, seed)
    return [r["prompt"] + r["chosen"] + " " + r["rejected"] for r in rows] + _FILLER


def build_reward_model(arch: str, tokenizer, size: str = "nano", seed: int = 0):
    """A randomly initialised sequence-classification reward model (one output)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    cfg = model_config(arch, len(tokenizer), size, num_labels=1)
    cfg.pad_token_id = tokenizer.pad_token_id
    cfg.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(cfg, attn_implementation="sdpa")
