"""`prefloop alignment-tax`: lm-evaluation-harness scores of a run's policies against π₀."""

from __future__ import annotations

import argparse

from prefloop.errors import PrefloopError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "alignment-tax",
        help="lm-evaluation-harness scores of a run's policies and their change from π₀",
        description="Run lm-evaluation-harness (lm_eval) on a run's initial policy π₀ and "
        "chosen iterations' policies; print each task's metrics, π_t − π₀ and standard "
        "errors (Δ's paired by document where the metric is a mean over documents, else "
        "marked independent). Writes RUN/iter_t/alignment_tax.json per policy and "
        "RUN/alignment_tax_summary.json; a policy whose file has the same settings (and "
        "per-document values) is not evaluated again. Needs: pip install "
        "'prefloop[lm-eval]'.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of `prefloop run`")
    p.add_argument("--tasks", required=True, metavar="T1,T2",
                   help="lm_eval task or group names, comma-separated (e.g. arc_easy,hellaswag; "
                   "list them with `lm-eval ls tasks`)")
    p.add_argument("--iterations", default="last", metavar="0,3|last|all",
                   help="iterations whose policy is evaluated: comma-separated numbers, last "
                   "(the last trained policy; the default) or all; π₀ (iteration 0, the "
                   "baseline) is always evaluated")
    p.add_argument("--limit", type=float, metavar="N",
                   help="score only the first N documents of each task (a number below 1: "
                   "that fraction); for quick checks, the scores are then not comparable with "
                   "published ones")
    p.add_argument("--num-fewshot", type=int, metavar="K",
                   help="few-shot examples per prompt (default: each task's own)")
    p.add_argument("--include-path", metavar="DIR",
                   help="a directory of your own lm_eval task YAML files")
    p.add_argument("--batch-size", default="8", metavar="B",
                   help="lm_eval's batch size: a number or auto (default 8)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="let models run code from their directory (only if you trust it)")
    p.add_argument("--overwrite", action="store_true",
                   help="evaluate again even policies whose result file has these settings")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_alignment_tax)


def _iterations(text: str) -> list[int] | str:
    if text in ("last", "all"):
        return text
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PrefloopError(f"--iterations: {text!r} is not comma-separated numbers, last or "
                            "all") from None


def _cmd_alignment_tax(args: argparse.Namespace) -> int:
    from prefloop.alignment_tax import (
        TaxConfig,
        evaluate_run,
        format_delta,
        shown_rows,
    )
    from prefloop.loop.rundir import RunDir
    from prefloop.summary import print_grid

    limit = args.limit
    if limit is not None and limit >= 1 and float(limit).is_integer():
        limit = int(limit)
    batch = args.batch_size
    if batch != "auto":
        try:
            batch = int(batch)
        except ValueError:
            raise PrefloopError(f"--batch-size: {batch!r} is not a number or auto") from None
    cfg = TaxConfig(tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
                    iterations=_iterations(args.iterations), limit=limit,
                    num_fewshot=args.num_fewshot, batch_size=batch,
                    include_path=args.include_path or "", device=args.device,
                    trust_remote_code=args.trust_remote_code)
    cfg.validate("--")
    # its notes (kept, evaluated again, why) are a few lines: printed even with -q, which
    # is set whenever stderr is not a terminal (logs should say what was reused)
    summary = evaluate_run(cfg, args.run_dir, overwrite=args.overwrite, echo=print)
    # scores without their standard errors (in the files), so that the table fits 80 columns
    rows = [(r["task"], r["metric"], str(r["iteration"]), f"{r['baseline']:.4f}",
             f"{r['value']:.4f}", format_delta(r)) for r in shown_rows(summary["rows"])]
    print_grid(f"prefloop alignment-tax: {RunDir(args.run_dir).alignment_tax_summary}",
               ["task", "metric", "t", "π₀", "π_t", "Δ ± se"], rows)
    return 0
