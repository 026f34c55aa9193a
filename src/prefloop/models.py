"""Loading and saving models and tokenizers: safetensors only, remote code only on request."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prefloop.errors import PrefloopError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _check_source(name_or_path: str) -> None:
    path = Path(name_or_path)
    looks_local = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_local and not (path / "config.json").is_file():
        raise PrefloopError(f"{name_or_path}: not a model directory (no config.json)")


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    _check_source(name_or_path)
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise PrefloopError(f"{name_or_path}: tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(
    name_or_path: str, trust_remote_code: bool = False, dtype: str = "fp32"
) -> nn.Module:
    """A causal LM from a hub id or directory, weights as safetensors only."""
    from transformers import AutoModelForCausalLM

    _check_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            trust_remote_code=trust_remote_code,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            attn_implementation="sdpa",
        )
    except (OSError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrefloopError(f"{name_or_path}: cannot load model ({reason})") from None
    return model


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def export_model(model: nn.Module, tokenizer, directory: str | Path) -> None:
    """Write an HF model directory (merged LoRA, safetensors) plus the tokenizer."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
