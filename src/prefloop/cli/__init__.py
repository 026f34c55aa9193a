"""The `prefloop` command: parses arguments, calls library functions, prints. No logic.

Each module here owns one family of sub-commands, their options next to their handlers;
`build_parser` assembles them in the order `prefloop --help` lists them.
"""

from __future__ import annotations

import argparse
import sys

from prefloop.cli import demo, derive, evaluation, info, stages, tax, training
from prefloop.cli.common import close_process_group
from prefloop.errors import PrefloopError
from prefloop.quiet import quiet_libraries


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prefloop",
        description="Iterative length-regularised preference optimisation for small LMs.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    # registration order is the order `prefloop --help` lists the commands in
    for family in (training, stages, evaluation, tax, demo, derive, info):
        family.add_parsers(sub)
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
    if hasattr(args, "quiet") and not sys.stderr.isatty():
        args.quiet = True  # progress bars only on a terminal, not in logs and pipes
    if getattr(args, "quiet", False):
        quiet_libraries()
    succeeded = False
    try:
        code = args.func(args)
        succeeded = True
        return code
    except PrefloopError as e:
        print(f"prefloop: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the user named, or a full disk, outside any stage's checks
        reason = e.strerror or str(e) or type(e).__name__
        print(f"prefloop: error: {e.filename or ''}{': ' if e.filename else ''}{reason}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"prefloop: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        close_process_group(succeeded)

