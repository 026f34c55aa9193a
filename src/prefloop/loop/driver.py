"""The iteration loop: evaluate π₀, then T × (sample → score → pair → train → evaluate).

A stage already done is skipped, so `--resume` after a crash continues where it stopped and
re-running a finished run does nothing; a stage the method does without (SPIN's scoring) is
recorded as skipped with the reason. Under `accelerate launch`, sampling, scoring and
evaluation are sharded over processes and training is data-parallel; every artifact is
written by the main process only.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from prefloop import faults
from prefloop.data import load_rows
from prefloop.loop import stages
from prefloop.loop.config import check_functions, check_inputs
from prefloop.loop.context import Context
from prefloop.loop.rundir import Manifest, check_open, open_run, stage_key
from prefloop.methods import method
from prefloop.prompts import iteration_prompts, load_prompts, load_targets


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict]
    stages_run: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    main: bool = True  # this process is the main one (the one that prints and writes)


def drive(ctx: Context, resume: bool = False, redo_from: str | None = None,
          overwrite: bool = False) -> RunResult:
    """Run (or continue) the loop of `ctx.cfg` in `ctx.run`."""
    cfg, run = ctx.cfg, ctx.run
    check_functions(cfg)  # what can be checked without a model fails before anything is written
    # the run directory's rules first: a finished run is only re-read, a refused one fails
    # before its prompts are read
    if check_open(run, cfg, resume, redo_from, overwrite) == "complete":
        ctx.echo(f"{run.root}: run already complete; nothing to do")
        return RunResult(run.root, run.read_metrics(), [],
                         Manifest.load(run.manifest).completed(), ctx.procs.is_main)
    check_inputs(cfg)
    prompt_rows = load_rows(cfg.prompts.path, cfg.prompts.split)  # read once, for both
    prompts = load_prompts(cfg.prompts, rows=prompt_rows)
    iteration_prompts(prompts, cfg.prompts, cfg.iterations, cfg.iterations)  # enough?
    ctx.manifest = open_run(run, cfg, ctx.procs, resume, redo_from, overwrite, ctx.echo)
    ctx.targets = load_targets(cfg.prompts, prompt_rows) if cfg.prompts.target_column else {}
    ctx.eval_prompts = load_prompts(cfg.eval.prompts, "eval.prompts") \
        if cfg.eval.prompts.path else []
    if cfg.guarded:
        ctx.probe_prompts = stages.probe_prompts(prompts, cfg.length_guard.prompts, cfg.seed,
                                                 stages.recorded_probe_ids(run))
    result = RunResult(run.root, [], main=ctx.procs.is_main)
    scored = method(cfg.pairing.strategy).scored

    def stage(t: int, name: str, fn: Callable[[], dict]) -> None:
        _run_stage(ctx, result, t, name, fn)

    stage(0, "evaluate", lambda: stages.evaluate(ctx, 0))
    for t in range(1, cfg.iterations + 1):
        slice_t = iteration_prompts(prompts, cfg.prompts, t, cfg.iterations)
        stage(t, "sample", lambda t=t, p=slice_t: stages.sample(ctx, t, p))
        if scored:
            stage(t, "score", lambda t=t: stages.score(ctx, t))
        else:
            _skip_stage(ctx, result, t, "score",
                        f"pairing.strategy {cfg.pairing.strategy} pairs without scores")
        stage(t, "pair", lambda t=t: stages.pair(ctx, t))
        stage(t, "train", lambda t=t: stages.train(ctx, t))
        stage(t, "evaluate", lambda t=t: stages.evaluate(ctx, t))
        if stages.taxed(cfg, t):
            stage(t, "alignment_tax", lambda t=t: stages.alignment_tax(ctx, t))
    if ctx.procs.is_main:
        ctx.manifest.finish()
    ctx.procs.barrier()
    result.metrics = run.read_metrics()
    return result


def _run_stage(ctx: Context, result: RunResult, t: int, name: str,
               fn: Callable[[], dict]) -> None:
    key, artifact = stage_key(t, name), ctx.run.output(t, name)
    if ctx.manifest.done(key) and artifact.exists():
        result.skipped.append(key)
        return
    if ctx.procs.is_main:
        # temporaries of an interrupted attempt (atomic writes never expose them), and what
        # an earlier run of this stage wrote under another config
        for leftover in [*artifact.parent.glob(f".{artifact.name}.*"),
                         *ctx.run.stage_extras(t, name)]:
            if leftover.is_dir():
                shutil.rmtree(leftover)
            elif leftover.exists():
                leftover.unlink()
    ctx.procs.barrier()
    faults.set_stage(key)
    start = time.perf_counter()
    info = fn() or {}
    faults.point()  # artifact written, stage not yet marked done
    ctx.procs.barrier()
    if ctx.procs.is_main:
        ctx.manifest.mark(key, seconds=round(time.perf_counter() - start, 3),
                          finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **info)
    ctx.procs.barrier()
    ctx.manifest = Manifest.load(ctx.run.manifest)
    result.stages_run.append(key)


def _skip_stage(ctx: Context, result: RunResult, t: int, name: str, reason: str) -> None:
    """A stage this configuration does without: recorded as skipped, with the reason."""
    key = stage_key(t, name)
    result.skipped.append(key)
    if ctx.manifest.status(key) == "skipped":
        return
    if ctx.procs.is_main:
        ctx.manifest.mark_skipped(key, reason)
    ctx.procs.barrier()
    ctx.manifest = Manifest.load(ctx.run.manifest)
