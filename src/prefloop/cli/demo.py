"""`prefloop demo` and `testbed`: the offline verbosity testbed."""

from __future__ import annotations

import argparse

from prefloop.cli.common import print_rows
from prefloop.errors import PrefloopError
from prefloop.quiet import quiet_libraries


def add_parsers(sub: argparse._SubParsersAction) -> None:
    demo = sub.add_parser(
        "demo", help="iDPO vs iLR-DPO on the offline verbosity testbed (CPU, minutes)",
        description="Build (once, cached) the verbosity testbed — a tiny SFT policy and a "
        "length-biased reward model — then run 3 iterations of iterative DPO and of iLR-DPO "
        "from the same SFT policy, evaluate both after every iteration on held-out prompts "
        "(gold accuracy, reward, length, win rates vs SFT) and write an HTML report. "
        "Overrides set demo fields, e.g. alpha=0.05 (a fixed α for iLR-DPO; by default it "
        "is set from each iteration's pairs) iterations=2.",
    )
    demo.add_argument("overrides", nargs="*", help="demo settings, e.g. alpha=0.05 lr=1e-3")
    demo.add_argument("--seeds", nargs="+", metavar="SEED",
                      help="run once per seed (default: 0)")
    demo.add_argument("--out", help="output directory (default: runs/demo)")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(func=_cmd_demo)

    bed = sub.add_parser(
        "testbed", help="write the verbosity testbed (models, data, prompts) to a directory",
        description="The demo's testbed as files: DIR/sft (SFT policy), DIR/base, "
        "DIR/reward_model, DIR/sft.jsonl, DIR/prefs.jsonl, DIR/prompts.jsonl, "
        "DIR/eval_prompts.jsonl — to try any command or recipe offline.",
    )
    bed.add_argument("directory", help="where to write it (must not exist or be empty)")
    bed.add_argument("overrides", nargs="*", help="testbed settings, e.g. seed=1")
    bed.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    bed.set_defaults(func=_cmd_testbed)


def _cmd_demo(args: argparse.Namespace) -> int:
    from prefloop.config import load_config
    from prefloop.demo import COLUMNS, DemoConfig, comparison_rows, run_seeds
    from prefloop.summary import print_grid

    # `--seeds 0 1 alpha=0.05`: argparse gives --seeds the overrides that follow it
    args.overrides += [s for s in args.seeds or [] if "=" in s]
    seeds = [s for s in args.seeds or [] if "=" not in s]
    bad = [s for s in seeds if not s.lstrip("-").isdigit()]
    if bad:
        raise PrefloopError(f"--seeds: {bad[0]!r} is not an integer")
    cfg = load_config(DemoConfig, None, args.overrides)
    if args.out:
        cfg.out_dir = args.out
    quiet_libraries()  # the demo loads dozens of models: keep only prefloop's own bars
    from transformers.utils import logging

    logging.set_verbosity_error()
    seeds = [int(s) for s in seeds] or [cfg.seed]
    results = run_seeds(cfg, seeds, progress=not args.quiet)
    for seed, result in zip(seeds, results, strict=True):
        print_grid(f"prefloop demo, seed {seed}: eval prompts after each iteration",
                   COLUMNS, comparison_rows(result))
        print(f"seed {seed}: the testbed and the story")
        for text, ok in result.checks():
            print(("  ✓ " if ok else "  ✗ ") + text)
        print_rows(f"seed {seed}: files", [
            ("report", str(result.report)),
            ("testbed", f"{result.testbed.directory} ("
             + ("cached" if result.testbed.cached else f"built in {result.testbed.seconds:.0f} s")
             + ")"),
            ("total time", f"{result.seconds:.0f} s"),
        ])
    return 0


def _cmd_testbed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prefloop.config import load_config
    from prefloop.demo import DemoConfig, PromptSets, export_testbed

    cfg = load_config(DemoConfig, None, args.overrides)
    bed = export_testbed(cfg, Path(args.directory), progress=not args.quiet)
    prompts = PromptSets.at(bed.directory)
    print_rows("prefloop testbed", [
        ("SFT policy", str(bed.sft)), ("its base model", str(bed.base)),
        ("reward model", str(bed.reward_model)), ("SFT data", str(bed.sft_data)),
        ("annotated pairs", str(bed.preferences)),
        ("prompts (iterations / eval)", f"{prompts.iteration} / {prompts.eval}"),
    ])
    return 0
