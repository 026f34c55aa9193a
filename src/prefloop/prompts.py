"""Prompt sets: the records the loop, `prefloop sample|best-of-n|evaluate` and distillation
sample from, each iteration's slice of them, and SPIN's targets."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from prefloop.data import load_rows
from prefloop.errors import PrefloopError, where
from prefloop.sampling import PromptRecord


@dataclass
class PromptsConfig:
    path: str = ""
    split: str = "train"
    column: str = "prompt"  # a string or a list of chat messages
    id_column: str = ""  # default: the row number
    per_iteration: int = 0  # size of each iteration's fresh, disjoint slice; 0 = all, every time
    shuffle_seed: int = 0
    limit: int = 0  # use at most this many prompts (0 = all)
    target_column: str = ""  # SPIN: the SFT answer of each prompt (e.g. completion)
    # a plain-text prompt becomes one user message, so the model's chat template applies
    # (an instruction-tuned policy sampled on raw text answers as a base model would)
    chat: bool = False

    def validate(self, key: str = "prompts") -> None:
        if not self.path:
            raise PrefloopError(f"{key}.path: required (jsonl, parquet, dataset dir or hub id)")
        for name in ("per_iteration", "limit"):
            if getattr(self, name) < 0:
                raise PrefloopError(f"{key}.{name}: must be ≥ 0")


def load_prompts(cfg: PromptsConfig, key: str = "prompts",
                 rows: list[dict] | None = None) -> list[PromptRecord]:
    """The prompt records of `cfg.path` (or of its `rows`, when already read)."""
    if rows is None:
        rows = load_rows(cfg.path, cfg.split)
    if not rows:
        raise PrefloopError(f"{cfg.path}: no prompts")
    records, seen = [], set()
    for i, row in enumerate(rows):
        if cfg.column not in row:
            raise PrefloopError(f"{where(cfg.path, i, cfg.column)}: missing column; row has "
                                f"{sorted(row)} (set {key}.column)")
        prompt = row[cfg.column]
        ok = (isinstance(prompt, str) and prompt.strip()) or (
            isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt))
        if not ok:
            raise PrefloopError(f"{where(cfg.path, i, cfg.column)}: expected a non-empty string "
                                "or a list of chat messages")
        if cfg.chat and isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        pid = _prompt_id(cfg, row, i)
        if pid in seen:
            raise PrefloopError(f"{where(cfg.path, i, cfg.id_column)}: duplicate prompt id {pid!r}")
        seen.add(pid)
        records.append(PromptRecord(pid, prompt))
    if cfg.limit:
        records = records[: cfg.limit]
    return records


def _prompt_id(cfg: PromptsConfig, row: dict, i: int) -> str:
    if cfg.id_column and cfg.id_column not in row:
        raise PrefloopError(f"{where(cfg.path, i, cfg.id_column)}: missing column; row has "
                            f"{sorted(row)} (set prompts.id_column)")
    return str(row[cfg.id_column]) if cfg.id_column else str(i)


def iteration_prompts(all_prompts: list[PromptRecord], cfg: PromptsConfig, iteration: int,
                      iterations: int) -> list[PromptRecord]:
    """Iteration t's slice: disjoint slices of a seeded shuffle, or everything each time."""
    if not cfg.per_iteration:
        return all_prompts
    order = list(range(len(all_prompts)))
    random.Random(cfg.shuffle_seed).shuffle(order)
    need = cfg.per_iteration * iterations
    if need > len(order):
        raise PrefloopError(
            f"prompts.per_iteration: {iterations} disjoint slices of {cfg.per_iteration} need "
            f"{need} prompts but {cfg.path} has {len(order)}"
        )
    chosen = order[(iteration - 1) * cfg.per_iteration : iteration * cfg.per_iteration]
    return [all_prompts[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- SPIN targets


def load_targets(cfg: PromptsConfig, rows: list[dict]) -> dict[str, str]:
    """SPIN's SFT answers: prompt id → the answer text in the row's ``target_column`` (`rows`:
    the prompt set's rows, as `load_prompts` read them)."""
    targets = {}
    for i, row in enumerate(rows):
        if cfg.target_column not in row:
            raise PrefloopError(f"{where(cfg.path, i, cfg.target_column)}: missing column; row "
                                f"has {sorted(row)} (set prompts.target_column)")
        targets[_prompt_id(cfg, row, i)] = target_text(
            row.get(cfg.column), row[cfg.target_column], cfg.path, i, cfg.target_column)
    return targets


def target_text(prompt: Any, value: Any, source: str, row: int, column: str) -> str:
    """A SPIN target from the prompt set's ``target_column``: a string, or a conversation
    (TRL's completion messages, or a whole chat such as UltraChat's ``messages`` that starts
    with the prompt), of which the first assistant turn after the prompt is the answer."""
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in value
    ):
        asked = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        turns = value[len(asked):] if value[: len(asked)] == asked else value
        for message in turns:
            if message.get("role") == "assistant" and message["content"].strip():
                return message["content"]
    raise PrefloopError(f"{where(source, row, column)}: expected the SFT answer as a non-empty "
                        "string or chat messages with an assistant turn (prompts.target_column)")
