"""Loading and saving models and tokenizers: safetensors only, remote code only on request."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from prefloop.errors import PrefloopError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# Weight files that are pickles (loading one runs code): prefloop reads none of them.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def check_source(name_or_path: str) -> None:
    """Refuse a local path that is not an HF model directory, or whose weights are not
    safetensors: `.bin`/`.pt` checkpoints are pickles, and unpickling runs code."""
    import os

    path = Path(name_or_path).expanduser()
    # a hub id is NAME or ORG/NAME; a path whose folder exists here (`tb/nonexist` with a
    # `tb/`) is a local path with a typo, not a hub id to wait 50 s of retries for
    folder_here = "/" in name_or_path and path.parent.is_dir()
    looks_local = (name_or_path.startswith((".", "/", "~")) or path.exists()
                   or name_or_path.count("/") > 1 or folder_here)
    if not looks_local:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            cached = _in_hub_cache(name_or_path)
            if not cached:
                raise PrefloopError(f"{name_or_path}: no such local directory, and the hub is "
                                    "offline (HF_HUB_OFFLINE) with no cached copy")
        return  # a hub id: `from_pretrained(..., use_safetensors=True)` refuses other weights
    if not path.is_dir():
        why = (f" (read as a local path because {path.parent}/ exists here; a hub id "
               "ORG/NAME is looked up when no such folder does)") if folder_here else ""
        raise PrefloopError(f"{name_or_path}: model directory not found{why}")
    if not (path / "config.json").is_file():
        raise PrefloopError(f"{name_or_path}: not a model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        unsafe = sorted(f.name for f in path.iterdir()
                        if f.suffix in PICKLE_SUFFIXES and f.name != "training_args.bin")
        if unsafe:
            raise PrefloopError(
                f"{name_or_path}: weights are loaded only from safetensors files, found "
                f"{', '.join(unsafe)} (pickle-based); convert them, e.g. load once in a trusted "
                "session and save_pretrained(..., safe_serialization=True)"
            )


def _in_hub_cache(repo_id: str) -> bool:
    """Whether the hub cache holds any snapshot of `repo_id` (usable offline)."""
    try:
        from huggingface_hub import scan_cache_dir

        return any(r.repo_id == repo_id for r in scan_cache_dir().repos)
    except Exception:  # no cache directory yet, or an unreadable one: nothing cached
        return False


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """A tokenizer with a pad token (EOS when it has none); remote code only on request."""
    from transformers import AutoTokenizer

    check_source(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as e:
        raise load_error(name_or_path, "tokenizer", e) from None
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

    check_source(name_or_path)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            trust_remote_code=trust_remote_code,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            attn_implementation="sdpa",
        )
    except (OSError, ValueError) as e:
        raise load_error(name_or_path, "model", e) from None
    return model


def load_error(name_or_path: str, what: str, error: Exception) -> PrefloopError:
    """`NAME: cannot load WHAT (first line of the library's reason)`, with the fix for
    models that ship their own code."""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    hint = ""
    if "custom code" in reason or "trust_remote_code" in reason:
        hint = "; it runs code from the model directory: set trust_remote_code: true only if " \
               "you trust it"
    return PrefloopError(f"{name_or_path}: cannot load {what} ({reason}){hint}")


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
