"""The `prefloop` command: parses arguments, calls library functions, prints. No logic."""

from __future__ import annotations

import argparse
import sys

from prefloop.errors import PrefloopError

OVERRIDES_HELP = "dotted overrides, e.g. training.lr=1e-6 loss.name=dpo loss.beta=0.05"


def _cmd_train(args: argparse.Namespace) -> int:
    from prefloop.config import TrainConfig, load_config
    from prefloop.summary import print_table
    from prefloop.trainer import train_preferences

    cfg = load_config(TrainConfig, args.config, args.overrides)
    result = train_preferences(cfg, progress=not args.quiet)
    if not result.is_main_process:
        return 0
    first, last = result.log[0], result.log[-1]
    print_table("prefloop train", [
        ("model", cfg.model),
        ("loss", cfg.loss.name),
        ("steps", result.steps),
        ("pairs seen", result.pairs_seen),
        ("pairs/s", result.pairs_per_second),
        ("loss first → last", f"{first['loss']:.4f} → {last['loss']:.4f}"),
        ("accuracy first → last", f"{first['accuracy']:.2f} → {last['accuracy']:.2f}"),
        ("margin last", last["margin"]),
        ("truncated prompts / responses / skipped",
         "{prompts_truncated} / {responses_truncated} / {skipped}".format(**result.truncation)
         if result.truncation else "-"),
        ("output", str(result.output_dir)),
    ])
    return 0


def _cmd_losses(args: argparse.Namespace) -> int:
    from prefloop.losses import LOSSES
    from prefloop.summary import print_table

    print_table("registered losses", [
        (name, f"{', '.join(f'{k}={v}' for k, v in spec.defaults.items())}   [{spec.paper}]"
               + ("   (no reference)" if spec.reference_free else ""))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefloop",
        description="Iterative length-regularised preference optimisation for small LMs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train", help="offline preference training (DPO family) on a preference dataset",
        description="Train a causal LM on prompt/chosen/rejected pairs with any registered "
        "loss. Run under `accelerate launch --num_processes N` for data parallelism.",
    )
    train.add_argument("config", nargs="?", help="YAML config (see `prefloop config`)")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=_cmd_train)

    losses = sub.add_parser("losses", help="list the registered losses and their parameters")
    losses.set_defaults(func=_cmd_losses)

    config = sub.add_parser(
        "config", help="print the resolved training config (defaults, file, overrides)"
    )
    config.add_argument("config", nargs="?", help="YAML config")
    config.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    config.set_defaults(func=_cmd_config)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"prefloop {version('prefloop')}"
    except PackageNotFoundError:
        return "prefloop (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # overrides may come after options (`train cfg.yaml -q training.lr=1e-6`)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(unknown or extra)}")
    if extra:
        args.overrides.extend(extra)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    # train CONFIG k=v: a first positional containing "=" is an override, not a file
    if getattr(args, "config", None) and "=" in args.config:
        args.overrides.insert(0, args.config)
        args.config = None
    try:
        return args.func(args)
    except PrefloopError as e:
        print(f"prefloop: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("prefloop: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
