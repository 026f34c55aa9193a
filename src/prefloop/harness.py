"""Training plumbing shared by `prefloop train`, `prefloop sft` and `prefloop reward-model`.

Each command owns its data, its forward pass and its loss; everything around them lives
here once, so the three cannot drift apart:

  * `make_accelerator` — one `Accelerator` per run, state reset between in-process runs
  * `training_steps`, `make_optimizer`, `micro_batches` — step count, AdamW + scheduler,
    the deterministic global-batch stream that every process slices the same way
  * `prepare_output` / `finish_output` — the `.NAME.partial` directory and its atomic rename;
    `guard_output` removes it when a run fails, `non_finite_loss` keeps the last good checkpoint
  * `accumulate_pairs` — one optimizer step's micro-batches of pairs: shard, scaled loss,
    backward, gathered per-pair statistics
  * `StepLog`, `progress_bar` — train_log.jsonl, trackers, the tqdm bar
  * `save_checkpoint`, `write_summary` — HF exports and train_summary.json / train_config.yaml
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefloop import batching, faults
from prefloop.config import TrainingConfig, config_hash, dump_yaml
from prefloop.errors import PrefloopError
from prefloop.io import write_error
from prefloop.logprobs import ResponseLogProbs
from prefloop.models import export_model
from prefloop.processes import is_main_process


@dataclass
class RunResult:
    """What `train_sft` and `train_reward_model` return (`train_preferences` has TrainResult)."""

    output_dir: Path
    steps: int
    examples_seen: int
    seconds: float
    log: list[dict] = field(default_factory=list)
    truncation: dict = field(default_factory=dict)
    is_main_process: bool = True
    summary: dict = field(default_factory=dict)

    @property
    def examples_per_second(self) -> float:
        return self.examples_seen / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------- accelerator and optimiser


def make_accelerator(precision: str, report_to: Sequence[str], project_dir: str):
    """An `Accelerator` for this run; works alike in one process and under `accelerate launch`."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not distributed and AcceleratorState._shared_state:
        # one process may train several times (the loop, tests) with different precisions
        AcceleratorState._reset_state()
    return Accelerator(
        # accelerate picks gloo/MULTI_CPU for `accelerate launch` on CPU only when told
        cpu=not torch.cuda.is_available() and distributed,
        mixed_precision="no" if precision == "fp32" else precision,
        log_with=list(report_to) or None,
        project_dir=project_dir,
    )


def training_steps(num_examples: int, global_batch: int, t: TrainingConfig) -> int:
    """Optimizer steps of the run: `max_steps` when set, else ⌈epochs · steps per epoch⌉."""
    per_epoch = batching.steps_per_epoch(num_examples, global_batch, t.grad_accum)
    return t.max_steps or max(1, math.ceil(per_epoch * t.epochs))


def make_optimizer(params: list[nn.Parameter], t: TrainingConfig, total_steps: int):
    """AdamW over `params` and the `t.scheduler` schedule with ⌊warmup_ratio · steps⌋ warm-up.

    The scheduler is deliberately not passed through `accelerator.prepare`: prepared, it
    would advance once per process per step.
    """
    from transformers import get_scheduler

    # the fused kernel does the whole update in one pass over each tensor instead of a
    # dozen element-wise ops: the same AdamW up to float rounding, ~3x faster on a CPU
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params
    )
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=t.adam_betas,
                                  weight_decay=t.weight_decay, fused=fused or None)
    scheduler = get_scheduler(t.scheduler, optimizer,
                              num_warmup_steps=int(t.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def micro_batches(
    lengths: Sequence[int], global_batch: int, t: TrainingConfig
) -> Iterator[tuple[int, list[int]]]:
    """Endless (epoch, global micro-batch indices, pairs in its optimizer step) stream, the
    same on every process.

    Batches are planned per optimizer step (`global_batch × grad_accum` items) and then cut
    into `grad_accum` micro-batches, so accumulation sees exactly the items one bigger batch
    would. A last step too small to give every micro-batch of every process an item joins
    the step before it.
    """
    step_size = global_batch * t.grad_accum
    n_proc = global_batch // t.batch_size
    if len(lengths) < t.grad_accum * n_proc:
        raise PrefloopError(
            f"{len(lengths)} training items cannot give each of {n_proc} process(es) × "
            f"{t.grad_accum} micro-batches one item; lower training.grad_accum"
        )
    epoch = 0
    while True:
        steps = batching.epoch_batches(lengths, step_size, t.seed, epoch, t.group_by_length)
        if len(steps) > 1 and len(steps[-1]) < t.grad_accum * n_proc:
            steps[-2] = steps[-2] + steps.pop()
        for step in steps:
            for k in range(t.grad_accum):
                yield epoch, batching.shard(step, k, t.grad_accum), len(step)
        epoch += 1


# ---------------------------------------------------------------- output directory


def partial_path(output_dir: str | Path) -> Path:
    """`DIR/.NAME.partial`: where a run writes until it has finished."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.partial"


def prepare_output(output_dir: str | Path, main: bool) -> Path:
    """The `.NAME.partial` sibling that collects the run's files until `finish_output`
    (a stale one from a killed run is replaced). An unwritable location is a one-line error."""
    partial = partial_path(output_dir)
    if main:
        try:
            if partial.exists():
                shutil.rmtree(partial)
            partial.mkdir(parents=True)
        except OSError as e:
            raise write_error(output_dir, e) from None
    return partial


def refuse_existing_output(output_dir: str | Path, overwrite: bool) -> None:
    """A command's output directory must not hold anything yet, unless the user asked to
    replace it (`--overwrite`): checked before any model is loaded."""
    out = Path(output_dir)
    if overwrite or not out.exists():
        return
    if out.is_file() or any(out.iterdir()):
        raise PrefloopError(f"output_dir: {out} exists and is not empty; pass --overwrite to "
                            "replace it, or choose another output_dir (nothing was written)")


def finish_output(partial: Path, output_dir: str | Path) -> Path:
    """Move the finished partial directory over `output_dir` (main process only)."""
    output_dir = Path(output_dir)
    try:
        if output_dir.exists():
            shutil.rmtree(output_dir)
        partial.rename(output_dir)
    except OSError as e:
        raise write_error(output_dir, e) from None
    return output_dir


def guard_output(train: Callable) -> Callable:
    """Decorate `train(cfg, ...)`: when the run fails for any reason (bad data, a full disk,
    Ctrl-C) its `.NAME.partial` directory is removed, so no half-written model is left next
    to `cfg.output_dir`, and an OSError becomes a one-line `PrefloopError`."""

    @functools.wraps(train)
    def guarded(cfg: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return train(cfg, *args, **kwargs)
        except BaseException as e:
            partial = partial_path(cfg.output_dir)
            if is_main_process() and partial.exists():
                shutil.rmtree(partial, ignore_errors=True)
            if isinstance(e, OSError):
                reason = e.strerror or str(e) or type(e).__name__
                raise PrefloopError(f"{e.filename or cfg.output_dir}: {reason}; nothing written "
                                    f"to {cfg.output_dir}") from None
            raise

    return guarded


def non_finite_loss(loss: Tensor, step: int, micro: int, rows: Sequence[int], partial: Path,
                    output_dir: str | Path, model: str, main: bool) -> PrefloopError:
    """The error for a non-finite loss, raised before its backward pass, so no update used it.

    It names the optimizer step, the micro-batch and the data rows in it, and says what is
    left: the newest intermediate checkpoint (`training.save_every`), moved out of the
    partial directory to `DIR/NAME.checkpoint-K` where it survives `guard_output`, or
    nothing at all, the input model being untouched.
    """
    output_dir = Path(output_dir)
    checkpoints = sorted(partial.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    if checkpoints:
        last = checkpoints[-1]
        kept = output_dir.parent / f"{output_dir.name}.{last.name}"
        if main:
            if kept.exists():
                shutil.rmtree(kept)
            last.rename(kept)
        left = f"last good checkpoint (step {last.name.split('-')[1]}) kept at {kept}"
    else:
        left = (f"no checkpoint was due (training.save_every), so nothing is written to "
                f"{output_dir} and the input model {model} is untouched")
    value = loss.detach().float().item()
    return PrefloopError(
        f"non-finite loss ({value}) at optimizer step {step}, micro-batch {micro}, data rows "
        f"{list(rows)}; {left}"
    )


def accumulate_pairs(
    accelerator, wrapped: nn.Module, stream: Iterator, grad_accum: int, items: Sequence,
    forward: Callable[[list[int]], tuple[Tensor, Tensor]], sums: dict[str, float],
    step: int, partial: Path, output_dir: str | Path, model: str,
    per_pair: list[Tensor] | None = None,
) -> tuple[int, int]:
    """The micro-batches of one optimizer step over pairs; returns (epoch, pairs in the step).

    `forward(idx)` gives the per-pair losses (b,) and per-pair statistics (b, ≥ len(sums))
    of this process's shard `idx`; the losses' sum is scaled so that DDP's mean over
    processes and the sum over micro-batches give the mean over every pair of the optimizer
    step. The statistics are gathered over processes; their first len(sums) columns are
    added column by column to `sums`, and the whole rows appended to `per_pair` if given
    (the same on every process).
    """
    n_proc = accelerator.num_processes
    step_pairs = 0
    for micro in range(grad_accum):
        epoch, global_idx, step_size = next(stream)
        idx = batching.shard(global_idx, accelerator.process_index, n_proc)
        sync = micro == grad_accum - 1
        ctx = contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)
        with ctx, accelerator.autocast():
            losses, stats = forward(idx)
            loss = losses.sum() * (n_proc / step_size)
            if not torch.isfinite(loss):
                raise non_finite_loss(loss, step, micro, [items[i].row for i in idx], partial,
                                      output_dir, model, accelerator.is_main_process)
            accelerator.backward(loss)
        if n_proc > 1:
            # shards may differ by one pair: pad to equal length with NaN rows for the
            # gather, then drop them (a row's first column is its loss, never NaN here)
            padded = accelerator.pad_across_processes(stats, dim=0, pad_index=float("nan"))
            stats = accelerator.gather(padded)
            stats = stats[~torch.isnan(stats[:, 0])]
        for key, v in zip(sums, stats[:, : len(sums)].sum(0).tolist(), strict=True):
            sums[key] += v
        if per_pair is not None:
            per_pair.append(stats)
        step_pairs += stats.shape[0]
    return epoch, step_pairs


def unwrapped_model(accelerator, wrapped: nn.Module) -> nn.Module:
    """The HF model inside accelerate's wrappers (and inside `ResponseLogProbs`)."""
    model = accelerator.unwrap_model(wrapped)
    return model.model if isinstance(model, ResponseLogProbs) else model


def save_checkpoint(accelerator, wrapped: nn.Module, tokenizer, directory: Path,
                    lora: bool) -> None:
    """An intermediate HF export; with LoRA the merge happens on a copy so training goes on."""
    model = unwrapped_model(accelerator, wrapped)
    export_model(copy.deepcopy(model) if lora else model, tokenizer, directory)


def write_summary(partial: Path, summary: dict, cfg: Any) -> None:
    """train_summary.json plus the resolved config as train_config.yaml."""
    (partial / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (partial / "train_config.yaml").write_text(dump_yaml(cfg))


# ---------------------------------------------------------------- the training run


class TrainingRun:
    """The skeleton every trainer shares (`prefloop train`, `sft`, `reward-model`): the
    accelerator and seed, the model made trainable (gradient checkpointing, LoRA), AdamW and
    its schedule, the partial output directory, the step loop with clipping, logging,
    progress and checkpoints, and the export. A trainer supplies only what differs: its
    model and data, one optimizer step's micro-batches → loss (`step`), and its summary.

        run = TrainingRun(cfg, "prefloop-sft", "sft", progress)   # accelerator, seed
        ... load the tokenizer, the data, the model ...
        run.start(model, tokenizer, lengths, wrap=..., lora=...)  # optimizer, output
        run.loop(step, before_update, after_update)               # the optimizer steps
        run.finish(summary, tokenizer)                            # export, atomically
    """

    def __init__(self, cfg: Any, tracker: str, desc: str, progress: bool):
        from accelerate.utils import set_seed

        self.cfg, self.t = cfg, cfg.training
        self.tracker, self.desc = tracker, desc
        self.accelerator = make_accelerator(self.t.precision, cfg.report_to, cfg.output_dir)
        self.main = self.accelerator.is_main_process
        self.n_proc = self.accelerator.num_processes
        self.device = self.accelerator.device
        self.progress = progress and self.main
        self.log: StepLog | None = None
        set_seed(self.t.seed)

    def start(self, model: nn.Module, tokenizer: Any, lengths: Sequence[int],
              wrap: Callable[[nn.Module], nn.Module] | None = None,
              lora: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module:
        """Make `model` trainable, plan `lengths` items into optimizer steps, build the
        optimizer and the partial output directory; returns the model (LoRA-wrapped when
        asked) whose `params` train. `self.wrapped` is what the step calls; `tokenizer` is
        saved with every checkpoint."""
        from prefloop.models import count_parameters

        t = self.t
        self.tokenizer = tokenizer
        if t.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if t.lora.enabled:
            model = lora(model)
        model.train()
        self.model = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.global_batch = t.batch_size * self.n_proc
        self.total_steps = training_steps(len(lengths), self.global_batch, t)
        self.optimizer, self.scheduler = make_optimizer(self.params, t, self.total_steps)
        self.wrapped, self.optimizer = self.accelerator.prepare(
            wrap(model) if wrap else model, self.optimizer)
        self.trainable_parameters, self.total_parameters = count_parameters(model)
        if self.cfg.report_to:
            self.accelerator.init_trackers(self.tracker,
                                           config={"config_hash": config_hash(self.cfg)})
        self.partial = prepare_output(self.cfg.output_dir, self.main)
        self.accelerator.wait_for_everyone()
        self.log = StepLog(self.partial / "train_log.jsonl", self.accelerator, t.log_every,
                           self.total_steps, bool(self.cfg.report_to))
        self.stream = micro_batches(lengths, self.global_batch, t)
        return model

    def loop(self, step: Callable[[int], tuple[dict, int, int]],
             before_update: Callable[[], Any] | None = None,
             after_update: Callable[[dict, Any], None] | None = None,
             count: str = "pairs",
             shown: dict[str, str] | None = None) -> float:
        """Run every optimizer step; returns the seconds spent.

        `step(k)` does optimizer step k's micro-batches (forward, backward) and returns its
        record (the step's statistics), its epoch and the number of items it trained on.
        `before_update()` runs after clipping, just before the update (its result goes to
        `after_update(record, it)`, which runs after the update and may add to the record).
        Each record then gets step, epoch, lr (the rate the update used), grad_norm, the
        running item count under `count`, and seconds. The progress bar shows `shown`
        ({label: record key}; default loss and accuracy).
        """
        shown = shown if shown is not None else {"loss": "loss", "acc": "accuracy"}
        t, accelerator = self.t, self.accelerator
        bar = progress_bar(self.total_steps, self.progress, self.desc)
        self.items_seen, start = 0, time.perf_counter()
        for k in range(1, self.total_steps + 1):
            record, epoch, items = step(k)
            grad_norm = accelerator.clip_grad_norm_(self.params, t.max_grad_norm)
            lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
            held = before_update() if before_update else None
            self.optimizer.step()
            if after_update:
                after_update(record, held)
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.items_seen += items
            faults.point()
            record.update({"step": k, "epoch": epoch, "lr": lr, "grad_norm": float(grad_norm),
                           count: self.items_seen, "seconds": time.perf_counter() - start})
            self.log.add(record)
            if bar is not None:
                bar.set_postfix({label: f"{record[key]:.4f}" if key == "loss"
                                 else f"{record[key]:.2f}" for label, key in shown.items()})
                bar.update(1)
            if t.save_every and k % t.save_every == 0 and k < self.total_steps and self.main:
                save_checkpoint(accelerator, self.wrapped, self.tokenizer,
                                self.partial / f"checkpoint-{k}", t.lora.enabled)
        if bar is not None:
            bar.close()
        self.seconds = time.perf_counter() - start
        return self.seconds

    def unwrapped(self) -> nn.Module:
        return unwrapped_model(self.accelerator, self.wrapped)

    def finish(self, summary: dict, tokenizer: Any, model: nn.Module | None = None) -> Path:
        """Export the trained model (`model`, default the unwrapped one) with `tokenizer`,
        write train_summary.json / train_config.yaml, and move the partial directory over
        the output directory (main process only); every process waits for it."""
        self.accelerator.wait_for_everyone()
        if self.main:
            export_model(model if model is not None else self.unwrapped(), tokenizer,
                         self.partial)
            write_summary(self.partial, summary, self.cfg)
            finish_output(self.partial, self.cfg.output_dir)
        self.accelerator.wait_for_everyone()
        if self.cfg.report_to:
            self.accelerator.end_training()
        return Path(self.cfg.output_dir)


# ---------------------------------------------------------------- logging


class StepLog:
    """Per-step records: kept in memory, appended to train_log.jsonl every `every` steps
    (and at the last step) by the main process, and sent to accelerate's trackers."""

    def __init__(self, path: Path, accelerator, every: int, total_steps: int, trackers: bool):
        self.path, self.accelerator = path, accelerator
        self.every, self.total_steps, self.trackers = every, total_steps, trackers
        self.records: list[dict] = []

    def add(self, record: dict) -> None:
        self.records.append(record)
        step = record["step"]
        if not self.accelerator.is_main_process:
            return
        if step % self.every == 0 or step == self.total_steps:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.trackers:
                self.accelerator.log({k: v for k, v in record.items() if k != "step"},
                                     step=step)


def progress_bar(total: int, enabled: bool, desc: str = "train"):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------- sharded no-grad passes


@torch.no_grad()
def map_pairs(model: nn.Module, items: Sequence, batch_size: int, accelerator,
              score_batch: Callable[[list], tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) values of every pair from `score_batch(pairs) -> (B,), (B,)`,
    computed without grad in length order, spread over processes and gathered on all."""
    from accelerate.utils import gather_object

    n_proc = accelerator.num_processes if accelerator else 1
    rank = accelerator.process_index if accelerator else 0
    was_training = model.training
    model.eval()
    order = sorted(range(len(items)), key=lambda i: items[i].length)[rank::n_proc]
    local: list[tuple[int, float, float]] = []
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        chosen, rejected = score_batch([items[i] for i in idx])
        local += list(zip(idx, chosen.float().tolist(), rejected.float().tolist(), strict=True))
    model.train(was_training)
    rows = gather_object(local) if n_proc > 1 else local
    chosen, rejected = torch.zeros(len(items)), torch.zeros(len(items))
    for i, c, r in rows:
        chosen[i], rejected[i] = c, r
    return chosen, rejected
