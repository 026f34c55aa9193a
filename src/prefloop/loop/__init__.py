"""The iterative loop (iLR-DPO): sample → score → pair → train → evaluate, T times.

    config.py    RunConfig and its sections; one validate() for the whole run
    rundir.py    RunDir: every artifact path, the manifest, the start/resume/redo rules
    context.py   what the stages share (processes, kept reward model, progress, output)
    stages.py    sample / score / pair / train / evaluate
    metrics.py   one record per evaluated iteration, and its printed row
    driver.py    the iteration loop
    plan.py      --dry-run

Which online method needs what lives in `prefloop.methods`.
"""

from __future__ import annotations

from collections.abc import Callable

from prefloop.loop.config import EvalConfig, RunConfig, load_run_config
from prefloop.loop.context import Context, silent
from prefloop.loop.driver import RunResult, drive
from prefloop.loop.plan import plan
from prefloop.loop.rundir import ConfigChanged, RunDir
from prefloop.prompts import PromptsConfig

__all__ = ["ConfigChanged", "EvalConfig", "PromptsConfig", "RunConfig", "RunDir", "RunResult",
           "load_run_config", "plan", "run"]


def run(cfg: RunConfig, resume: bool = False, redo_from: str | None = None,
        progress: bool = True, overwrite: bool = False,
        echo: Callable[..., None] | None = None) -> RunResult:
    """Run (or continue) the loop described by `cfg`; returns the metrics per iteration.
    `progress=False` is silent: no bars (the Hugging Face libraries' included, from then on in
    this process) and no tables (the run's files still record all);
    `echo` takes the loop's lines instead of print. `overwrite` lets a new run write into a
    non-empty directory that holds no run."""
    cfg.validate()
    if not progress:
        from prefloop.quiet import quiet_libraries

        quiet_libraries()  # nor the Hugging Face libraries' own bars
    ctx = Context(cfg, RunDir(cfg.directory, cfg.policy), progress=progress,
                  echo=echo or (print if progress else silent))
    return drive(ctx, resume, redo_from, overwrite)
