"""The README's demo tables, made by running the demo: markdown on stdout.

    python scripts/demo_tables.py                         # seeds 0 1 2, the demo's defaults
    python scripts/demo_tables.py --seeds 0 1 2 lr=1e-4   # any DemoConfig key=value
    python scripts/demo_tables.py --out runs/readme-lr1e-4 lr=1e-4
    python scripts/demo_tables.py --trainings 3           # + 2 more trainings per seed

Runs (or resumes: finished runs are only re-read) `prefloop demo` once per seed in
`--out/seed-S` and prints one summary row per seed, then seed by seed the per-iteration
table. The same numbers `prefloop demo` prints, in the README's layout. With
`--trainings N`, each seed's loops are also trained N − 1 more times on the same testbed
(training seeds S + 1000, S + 2000, …, in `--out/seed-S-train-K`), and a last table gives
the claims over the N trainings (`prefloop.demo.over_trainings`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _iterations(results) -> tuple[int, str]:
    """The last iteration of the demos' runs, and "1, 2, …, T" for the headers."""
    last = max(r["iteration"] for recs in results[0].metrics.values() for r in recs)
    return last, ", ".join(str(t) for t in range(1, last + 1))


def summary_rows(results, seeds) -> list[str]:
    from prefloop.demo import Outcome

    last, every = _iterations(results)
    lines = [
        f"| seed | SFT gold % / tokens | reward: right ≻ wrong | iDPO t={last} gold % / × SFT "
        f"| iLR-DPO gold % t={last} | iLR-DPO × SFT t={every} | α mean per iteration | "
        "checks met |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for seed, result in zip(seeds, results, strict=True):
        out = Outcome.of(result.metrics)
        idpo, ilr = out.runs["idpo"], out.runs["ilr-dpo"]
        gold_p, se_p = 100 * idpo[-1]["gold_accuracy"], 100 * idpo[-1]["gold_accuracy_se"]
        gold_r, se_r = 100 * ilr[-1]["gold_accuracy"], 100 * ilr[-1]["gold_accuracy_se"]
        ratio_p, _ = out.ratio(idpo[-1])
        ratios = ", ".join(f"{out.ratio(r)[0]:.2f}" for r in ilr)
        alphas = ", ".join(f"{r.get('alpha_mean', r.get('alpha', float('nan'))):.3f}"
                           for r in ilr)
        checks = out.checks()
        met = sum(ok for _, ok in checks)
        missed = "; ".join(text.split(" (")[0] for text, ok in checks if not ok)
        lines.append(
            f"| {seed} | {out.sft_gold[0]:.1f} ± {out.sft_gold[1]:.1f} / "
            f"{out.sft_tokens[0]:.1f} | {reward_right(result)} | "
            f"{gold_p:.1f} ± {se_p:.1f} / ×{ratio_p:.2f} | "
            f"{gold_r:.1f} ± {se_r:.1f} | {ratios} | {alphas} | {met}/4"
            + (f" (✗ {missed})" if missed else "") + " |")
    return lines


def reward_right(result) -> str:
    """The testbed reward model's right-over-wrong share at equal word count
    (`testbed.reward_correctness`; the testbed check beside the story's)."""
    return f"{100 * result.reward_right.pair_share:.1f} %"


def run_rows(results, seeds) -> list[str]:
    """One row per (run, seed): length over SFT's at every iteration, gold at the last, the
    mean α of each iteration: for comparing runs of one demo (`runs=...`)."""
    from prefloop.demo import LENGTH_BAND, Outcome

    last, every = _iterations(results)
    lines = [f"| run | seed | × SFT length t={every} | in ±10 % at every t | "
             f"gold % t={last} (SFT) | α mean per iteration |", "|---|---|---|---|---|---|"]
    names = list(results[0].metrics)
    for name in names:
        for seed, result in zip(seeds, results, strict=True):
            out = Outcome.of(result.metrics)
            recs = out.runs[name]
            ratios = [out.ratio(r)[0] for r in recs]
            gold, se = 100 * recs[-1]["gold_accuracy"], 100 * recs[-1]["gold_accuracy_se"]
            alphas = ", ".join(f"{r['alpha_mean']:.3f}" if "alpha_mean" in r else
                               (f"{r['alpha']:.3f}" if "alpha" in r else "–") for r in recs)
            band = all(abs(r - 1) <= LENGTH_BAND for r in ratios)
            lines.append(f"| {name} | {seed} | {', '.join(f'{r:.2f}' for r in ratios)} | "
                         f"{'✓' if band else '✗'} | {gold:.1f} ± {se:.1f} "
                         f"({out.sft_gold[0]:.1f}) | {alphas} |")
    return lines


def training_rows(per_seed: dict[int, list]) -> list[str]:
    """One row per seed (each training's gold at the last iteration), then the claims over
    the trainings as a list, seed by seed."""
    from prefloop.demo import Outcome, over_trainings, training_seed

    last, _ = _iterations(next(iter(per_seed.values())))
    lines = [f"| seed | training seeds | iDPO gold % t={last} | iLR-DPO gold % t={last} | "
             "iLR-DPO × SFT, every t | checks met over the trainings |",
             "|---|---|---|---|---|---|"]
    notes = []
    outcomes = {seed: [Outcome.of(r.metrics) for r in results]
                for seed, results in per_seed.items()}
    for seed, outs in outcomes.items():
        golds = {name: ", ".join(f"{100 * o.runs[name][-1]['gold_accuracy']:.1f}"
                                 for o in outs) for name in ("idpo", "ilr-dpo")}
        ratios = [o.ratio(r)[0] for o in outs for r in o.runs["ilr-dpo"]]
        checks = over_trainings(outs)
        missed = "; ".join(text.split(" (")[0] for text, ok in checks if not ok)
        seeds = ", ".join(str(training_seed(seed, k)) for k in range(len(outs)))
        lines.append(f"| {seed} | {seeds} | {golds['idpo']} | {golds['ilr-dpo']} | "
                     f"{min(ratios):.2f}–{max(ratios):.2f} | {sum(ok for _, ok in checks)}/4"
                     + (f" (✗ {missed})" if missed else "") + " |")
        notes += [f"- seed {seed}: {'✓' if ok else '✗'} {text}" for text, ok in checks]
    return [*lines, "", *notes, paired_gap(outcomes, last)]


def paired_gap(outcomes: dict[int, list], last: int) -> str:
    """iLR-DPO's gold minus iDPO's at every iteration, over every seed's trainings
    (`outcomes`: seed → its trainings' `Outcome`s), each training's two runs paired (same
    testbed, prompts and training seed): mean ± its standard error, and how many trainings
    iLR-DPO ends behind. At t = 1 both runs train on the same pairs, so the difference there
    is the loss's alone."""
    from statistics import mean

    from prefloop.evaluate import mean_se

    outs = [o for seed_outs in outcomes.values() for o in seed_outs]
    parts = []
    for t in range(1, last + 1):
        gold = {name: [100 * o.runs[name][t - 1]["gold_accuracy"] for o in outs]
                for name in ("idpo", "ilr-dpo")}
        gaps = [r - p for r, p in zip(gold["ilr-dpo"], gold["idpo"], strict=True)]
        gap, gap_se = mean_se(gaps)
        parts.append(f"t={t} {gap:+.1f} ± {gap_se:.1f} "
                     f"({mean(gold['ilr-dpo']):.1f} vs {mean(gold['idpo']):.1f}, behind in "
                     f"{sum(g < 0 for g in gaps)})")
    return (f"- all {len(outcomes)} seeds × {len(outs) // len(outcomes)} trainings, iLR-DPO "
            f"gold − iDPO's paired by training: {'; '.join(parts)}")


def iteration_rows(result) -> list[str]:
    from prefloop.demo import COLUMNS, comparison_rows

    lines = ["| " + " | ".join(c or "run" for c in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(result)]
    return lines


def training_dir(out: str, seed: int, k: int) -> Path:
    """Where seed `seed`'s k-th training of its loops runs (k = 0: the seed's own demo)."""
    return Path(out) / (f"seed-{seed}-train-{k}" if k else f"seed-{seed}")


def main(argv: list[str] | None = None) -> int:
    from dataclasses import replace

    from prefloop.config import load_config
    from prefloop.demo import DemoConfig, run_demo, training_seed

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/readme", help="one directory per seed inside")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    parser.add_argument("--by-run", action="store_true",
                        help="one row per run and seed (for demos with several lr_dpo runs)")
    parser.add_argument("--trainings", type=int, default=1, metavar="N",
                        help="train each seed's loops N times (training seeds S, S+1000, …) "
                             "and add the claims over the N trainings")
    parser.add_argument("overrides", nargs="*", help="DemoConfig key=value")
    args = parser.parse_args(argv)
    if args.trainings < 1:
        parser.error("--trainings: must be ≥ 1")
    if args.by_run and args.trainings > 1:
        parser.error("--trainings: not with --by-run (its table has one training per seed)")
    cfg = load_config(DemoConfig, None, args.overrides)
    if args.trainings > 1 and cfg.training_seed is not None:
        parser.error("--trainings: not with training_seed=… (the trainings' seeds are S, "
                     "S + 1000, …)")
    cfg.out_dir = args.out
    if not args.progress:
        from transformers.utils import logging

        from prefloop.quiet import quiet_libraries

        quiet_libraries()
        logging.set_verbosity_error()
    start = time.perf_counter()
    per_seed = {seed: [] for seed in args.seeds}
    for k in range(args.trainings):
        for seed in args.seeds:
            per_seed[seed].append(run_demo(replace(
                cfg, seed=seed, training_seed=training_seed(seed, k) if k else cfg.training_seed,
                out_dir=str(training_dir(args.out, seed, k))),
                progress=args.progress, echo=lambda *a, **k: None))
    results = [per_seed[seed][0] for seed in args.seeds]
    trainings = f" --trainings {args.trainings}" if args.trainings > 1 else ""
    print(f"<!-- python scripts/demo_tables.py --seeds {' '.join(map(str, args.seeds))} "
          f"--out {args.out}{trainings} {' '.join(args.overrides)}; "
          f"{time.perf_counter() - start:.0f} s -->")
    if args.by_run:
        print("\n".join(run_rows(results, args.seeds)))
        return 0
    print("\n".join(summary_rows(results, args.seeds)))
    for seed, result in zip(args.seeds, results, strict=True):
        print(f"\nseed {seed}:\n")
        print("\n".join(iteration_rows(result)))
    if args.trainings > 1:
        print(f"\nover {args.trainings} trainings of each seed's loops:\n")
        print("\n".join(training_rows(per_seed)))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
