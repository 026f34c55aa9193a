"""Helpers shared by several command families: tables, input checks, reward options."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prefloop.errors import PrefloopError, where

if TYPE_CHECKING:
    from prefloop.config import RewardConfig

OVERRIDES_HELP = ("dotted overrides (every key and its default: prefloop config --kind KIND), "
                  "e.g. training.lr=1e-6 loss.name=dpo loss.beta=0.05")


def print_rows(title: str, rows: Iterable[tuple[str, object]]) -> None:
    from prefloop.summary import print_table

    print_table(title, rows)


def require_fields(rows: list[dict], path: str, fields: tuple[str, ...]) -> None:
    """One clear error naming the file, row and field when a row lacks a field."""
    if not rows:
        raise PrefloopError(f"{path}: no rows")
    for i, row in enumerate(rows):
        for f in fields:
            if f not in row:
                raise PrefloopError(f"{where(path, i, f)}: missing")


def check_response_values(rows: list[dict], path: str, scores: bool = True) -> None:
    """A response row's `response` is text and its `score`, when it has one (and `scores`),
    a finite number: one line naming the file, line and field otherwise."""
    import math

    for i, row in enumerate(rows):
        if not isinstance(row.get("response"), str):
            raise PrefloopError(f"{where(path, i, 'response')}: expected text, got "
                                f"{row.get('response')!r}")
        value = row.get("score")
        if scores and "score" in row and (isinstance(value, bool)
                                          or not isinstance(value, int | float)
                                          or not math.isfinite(value)):
            raise PrefloopError(f"{where(path, i, 'score')}: expected a finite number, got "
                                f"{value!r} (or pass --rescore)")


def add_reward_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--reward-model", help="sequence-classification reward model")
    p.add_argument("--reward-function", help="a Python function, module:function")


def reward_config(args: argparse.Namespace) -> RewardConfig:
    """The reward of --reward-model / --reward-function (exactly one of them)."""
    from prefloop.config import RewardConfig

    if bool(args.reward_model) == bool(args.reward_function):
        raise PrefloopError("give exactly one of --reward-model and --reward-function")
    if args.reward_model:
        return RewardConfig(type="model", model=args.reward_model, batch_size=args.batch_size)
    return RewardConfig(type="function", function=args.reward_function)


def close_process_group(succeeded: bool) -> None:
    """Tear down torch.distributed before the interpreter exits. Left to interpreter shutdown,
    gloo's threads can be destroyed while joinable and abort the process ("terminate called
    without an active exception") after the command itself succeeded. After a success every
    process meets once first, so none tears down what another still uses; after a failure
    the others may never arrive, so there is no meeting."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    if succeeded:
        dist.barrier()
    dist.destroy_process_group()
