"""`prefloop losses` and `config`: what is registered, what a config resolves to."""

from __future__ import annotations

import argparse

from prefloop.cli.common import OVERRIDES_HELP


def add_parsers(sub: argparse._SubParsersAction) -> None:
    losses = sub.add_parser("losses", help="list the registered losses and their parameters")
    losses.set_defaults(func=_cmd_losses)

    config = sub.add_parser(
        "config", help="print a resolved config of any command: every key with its default, "
        "then the file's values and the overrides",
        description="Print the config a command would run with. Without a file: every key "
        "of that kind of config and its default. The kind is inferred from the file's keys "
        f"(train when several fit); --kind chooses it: {', '.join(CONFIG_KINDS)}.",
    )
    config.add_argument("config", nargs="?", help="YAML config (or a run directory)")
    config.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    config.add_argument("--kind", choices=list(CONFIG_KINDS),
                        help="which command's config (default: inferred, else train)")
    config.set_defaults(func=_cmd_config)


def _cmd_losses(args: argparse.Namespace) -> int:
    from prefloop.losses import LOSSES
    from prefloop.summary import print_table

    print_table("registered losses", [
        (name, f"{', '.join(f'{k}={v}' for k, v in spec.defaults.items())}   [{spec.paper}]"
               + ("   (no reference)" if spec.reference_free else "")
               + ("   (α held at a length target unless loss.alpha is set: "
                  "loss.length_control)" if name == "lr_dpo" else ""))
        for name, spec in sorted(LOSSES.items())
    ])
    return 0


# The commands whose config `prefloop config --kind KIND` resolves, in the order of
# `_config_classes`.
CONFIG_KINDS = ("train", "run", "sft", "reward-model", "distill", "merge", "demo")


def _config_classes() -> dict[str, type]:
    """Each kind's config class, imported only when `prefloop config` runs."""
    from prefloop.config import TrainConfig
    from prefloop.demo import DemoConfig
    from prefloop.distill import DistillConfig
    from prefloop.loop import RunConfig
    from prefloop.merge import MergeConfig
    from prefloop.reward_training import RewardModelConfig
    from prefloop.sft import SFTConfig

    classes = (TrainConfig, RunConfig, SFTConfig, RewardModelConfig, DistillConfig,
               MergeConfig, DemoConfig)
    return dict(zip(CONFIG_KINDS, classes, strict=True))


def _config_class(kind: str) -> type:
    return _config_classes()[kind]


def _infer_kind(path: str | None, overrides: list[str]) -> str:
    """The kind whose config knows the most top-level keys of the file and the overrides
    (the first in CONFIG_KINDS order among equals: train), so that a misspelt key is
    reported against the config it was meant for."""
    import dataclasses
    from pathlib import Path

    import yaml

    from prefloop.config import merge, parse_overrides

    raw: dict = {}
    if path is not None and Path(path).is_dir():
        return "run"
    if path is not None and Path(path).is_file():
        loaded = yaml.safe_load(Path(path).read_text())
        raw = loaded if isinstance(loaded, dict) else {}
    raw = merge(raw, parse_overrides(overrides))
    def unknown(kind: str) -> int:
        return len(set(raw) - {f.name for f in dataclasses.fields(_config_class(kind))})

    return min(CONFIG_KINDS, key=unknown)  # min keeps the first of equals


def _cmd_config(args: argparse.Namespace) -> int:
    from prefloop.config import dump_yaml, from_dict, load_config

    kind = args.kind or _infer_kind(args.config, args.overrides)
    cls = _config_class(kind)
    if args.config is None and not args.overrides:
        print(f"# prefloop {kind}: every key and its default", flush=True)
        print(dump_yaml(from_dict(cls, {})), end="")
        return 0
    if kind == "run":
        from prefloop.loop import load_run_config

        cfg = load_run_config(args.config, args.overrides)
    else:
        cfg = load_config(cls, args.config, args.overrides)
    print(dump_yaml(cfg), end="")
    return 0
