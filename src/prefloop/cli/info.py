"""`prefloop losses` and `config`: what is registered, what a config resolves to."""

from __future__ import annotations

import argparse

from prefloop.cli.common import OVERRIDES_HELP


def add_parsers(sub: argparse._SubParsersAction) -> None:
    losses = sub.add_parser("losses", help="list the registered losses and their parameters")
    losses.set_defaults(func=_cmd_losses)

    config = sub.add_parser(
        "config", help="print the resolved training config (defaults, file, overrides)"
    )
    config.add_argument("config", nargs="?", help="YAML config")
    config.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
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


def _cmd_config(args: argparse.Namespace) -> int:
    from prefloop.config import TrainConfig, dump_yaml, from_dict, load_config

    if args.config is None and not args.overrides:
        print(dump_yaml(from_dict(TrainConfig, {})), end="")
        return 0
    print(dump_yaml(load_config(TrainConfig, args.config, args.overrides)), end="")
    return 0
