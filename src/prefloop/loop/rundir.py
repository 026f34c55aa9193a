"""One run directory: where every artifact of a run lives, its manifest, and the rules for
starting, resuming, extending and redoing a run in it. The loop, the report, the demo and
the CLI take their paths from `RunDir` only.

    runs/NAME/
      config.yaml  manifest.json  metrics.jsonl
      iter_0/ eval_samples.jsonl eval.json                 (the initial policy)
      iter_t/ samples.jsonl scored.jsonl pairs.jsonl policy/ eval_samples.jsonl eval.json
"""

from __future__ import annotations

import contextlib
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefloop import io
from prefloop.errors import PrefloopError

STAGES = ("sample", "score", "pair", "train", "evaluate", "alignment_tax")

# Every file a run writes: (path relative to the run directory, what it holds). The README's
# artifact table is checked against this list by a test.
ARTIFACTS: tuple[tuple[str, str], ...] = (
    ("config.yaml", "the resolved config the run was started (or last extended / redone) with"),
    ("manifest.json", "config hash, versions, seed; per stage its status, seconds and counts "
                      "(pairing stats, truncation; per train stage the α mode, α at the first "
                      "and last step and its mean, the measured start length, the length target "
                      "and the length guard's attempts: α scale, probe length, ratio to π₀'s)"),
    ("metrics.jsonl", "one row per evaluated iteration (0 = π₀): reward, gold accuracy ± SE, "
                      "mean/median length ± SE, win rate, LC win rate, KL, EOS rate, α, length "
                      "target; with the length guard its trainings, α scale and probe ratio"),
    ("iter_0/eval_samples.jsonl", "π₀'s answers to the eval prompts with score and gold"),
    ("iter_0/eval.json", "π₀'s metrics row"),
    ("iter_t/samples.jsonl", "K samples per prompt from π_{t−1}: text, token ids, lengths, "
                             "finish reason, log-prob, source (policy or reference)"),
    ("iter_t/scored.jsonl", "the samples with their reward (not written by methods that pair "
                            "without scores)"),
    ("iter_t/pairs.jsonl", "the pairs trained on: TRL's column names plus token ids, scores, "
                           "lengths, sampling log-probs"),
    ("iter_t/policy/", "π_t as an HF model directory"),
    ("iter_t/policy/train_log.jsonl", "per optimizer step: loss, rewards, margin, accuracy, "
                                      "lr, α, length estimate"),
    ("iter_t/policy/train_summary.json", "steps, pairs, seconds, truncation, length control"),
    ("iter_t/length_probe.jsonl", "with the length guard (lr_dpo holding π₀'s length): every "
                                  "training attempt's samples on the probe prompts "
                                  "(`attempt`); in iter_0/, π₀'s"),
    ("iter_t/eval_samples.jsonl", "π_t's answers to the eval prompts with score and gold"),
    ("iter_t/eval.json", "π_t's metrics row"),
    ("iter_t/judge.json", "with `eval.judge`: the LLM judge's verdict on π_t against the "
                          "baseline — win rate, LC win rate ± se, counts, tokens, its config"),
    ("iter_t/judgements.jsonl", "with `eval.judge`: one judgement per eval prompt (both "
                                "answers, order(s), preference, the judge's raw answer)"),
    ("iter_t/alpaca_eval/", "with `eval.judge`: model_outputs.json, reference_outputs.json "
                            "and annotations.json in alpaca_eval's formats"),
    ("judge_cache.jsonl", "with `eval.judge`: every judge request's answer, so a resume or "
                          "re-run pays for nothing twice"),
    ("iter_t/alignment_tax.json", "with `alignment_tax.tasks`: lm-evaluation-harness scores of "
                                  "π_t (and of π₀ in iter_0/), their settings and versions"),
    ("alignment_tax_summary.json", "with `alignment_tax.tasks`: every evaluated policy's "
                                   "scores against π₀'s, Δ ± se"),
)
# written only when the config asks for them
OPTIONAL_ARTIFACTS = ("iter_t/length_probe.jsonl", "iter_t/judge.json",
                      "iter_t/judgements.jsonl", "iter_t/alpaca_eval/", "judge_cache.jsonl",
                      "iter_t/alignment_tax.json", "alignment_tax_summary.json")


class RunDir:
    """The paths of one run directory. `initial_policy` is π₀ (a hub id or a directory)."""

    def __init__(self, root: str | Path, initial_policy: str = ""):
        self.root = Path(root)
        self.initial_policy = initial_policy

    # -- run-level files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    # -- per iteration
    def iteration(self, t: int) -> Path:
        return self.root / f"iter_{t}"

    def samples(self, t: int) -> Path:
        return self.iteration(t) / "samples.jsonl"

    def scored(self, t: int) -> Path:
        return self.iteration(t) / "scored.jsonl"

    def pairs(self, t: int) -> Path:
        return self.iteration(t) / "pairs.jsonl"

    def policy(self, t: int) -> Path:
        """π_t's model directory (t ≥ 1; π₀ lives wherever the config says, see policy_path)."""
        return self.iteration(t) / "policy"

    def train_log(self, t: int) -> Path:
        return self.policy(t) / "train_log.jsonl"

    def train_summary(self, t: int) -> Path:
        return self.policy(t) / "train_summary.json"

    def length_probe(self, t: int) -> Path:
        return self.iteration(t) / "length_probe.jsonl"

    def eval_samples(self, t: int) -> Path:
        return self.iteration(t) / "eval_samples.jsonl"

    def eval(self, t: int) -> Path:
        return self.iteration(t) / "eval.json"

    def judge(self, t: int) -> Path:
        return self.iteration(t) / "judge.json"

    def judgements(self, t: int) -> Path:
        return self.iteration(t) / "judgements.jsonl"

    def alpaca_eval(self, t: int) -> Path:
        return self.iteration(t) / "alpaca_eval"

    @property
    def judge_cache(self) -> Path:
        return self.root / "judge_cache.jsonl"

    def alignment_tax(self, t: int) -> Path:
        return self.iteration(t) / "alignment_tax.json"

    @property
    def alignment_tax_summary(self) -> Path:
        return self.root / "alignment_tax_summary.json"

    def output(self, t: int, stage: str) -> Path:
        """The file whose presence (with the manifest's mark) says a stage is done."""
        return {"sample": self.samples(t), "score": self.scored(t), "pair": self.pairs(t),
                "train": self.policy(t) / "config.json", "evaluate": self.eval(t),
                "alignment_tax": self.alignment_tax(t)}[stage]

    def stage_extras(self, t: int, stage: str) -> tuple[Path, ...]:
        """What a stage of iteration t writes besides its output under some configs only:
        cleared before the stage runs, so that a redo under a config without them keeps
        none of an earlier run's (the length guard's probe and its waiting attempts; the
        LLM judge's verdict, judgements and alpaca_eval files)."""
        return {"train": (self.length_probe(t), self.policy_attempts(t)),
                "evaluate": (self.judge(t), self.judgements(t), self.alpaca_eval(t)),
                }.get(stage, ())

    def policy_attempts(self, t: int) -> Path:
        """Where the length guard's earlier trainings of π_t wait while it trains again."""
        return self.iteration(t) / ".policy.attempts"

    def policy_path(self, t: int) -> str:
        """π_t as a model path: the configured policy for t = 0, else iter_t/policy."""
        return self.initial_policy if t == 0 else str(self.policy(t))

    def reference_path(self, t: int, reference: str) -> str:
        """Iteration t's reference model: π_{t−1} (``previous``) or π₀ (``initial``)."""
        return self.policy_path(t - 1 if reference == "previous" else 0)

    def iterations_present(self) -> list[int]:
        """The t of every iter_t directory, in order."""
        found = []
        for sub in self.root.iterdir() if self.root.is_dir() else ():
            name = sub.name.removeprefix("iter_")
            if sub.is_dir() and sub.name.startswith("iter_") and name.isdigit():
                found.append(int(name))
        return sorted(found)

    def read_metrics(self) -> list[dict]:
        from prefloop.data import read_jsonl

        return read_jsonl(self.metrics) if self.metrics.is_file() else []

    def write_metrics(self, iterations: int) -> None:
        """metrics.jsonl from every iteration's eval.json (iterations 0..`iterations`), with
        its lm-evaluation-harness scores ({task: {metric: value}}) when it has them."""
        records = []
        for t in range(iterations + 1):
            if not self.eval(t).is_file():
                continue
            record = json.loads(self.eval(t).read_text())
            if self.alignment_tax(t).is_file():
                scores = json.loads(self.alignment_tax(t).read_text()).get("scores", {})
                record["alignment_tax"] = {task: {m: v["value"] for m, v in metrics.items()}
                                           for task, metrics in scores.items()}
            records.append(record)
        io.write_jsonl(self.metrics, records)


# ---------------------------------------------------------------- stages and the manifest


def stage_key(iteration: int, stage: str) -> str:
    return f"iter_{iteration}/{stage}"


def stage_order(key: str) -> tuple[int, int]:
    try:
        it, stage = key.split("/")
        return int(it.removeprefix("iter_")), STAGES.index(stage)
    except ValueError:
        raise PrefloopError(
            f"--redo-from: {key!r} is not ITER/STAGE, e.g. iter_2/train; stages: "
            f"{', '.join(STAGES)}"
        ) from None


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("prefloop", "torch", "transformers", "accelerate", "peft", "datasets"):
        with contextlib.suppress(PackageNotFoundError):
            out[pkg] = version(pkg)
    return out


class Manifest:
    """manifest.json: the config hash, versions, seeds, and each stage's status and timing."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def load(cls, path: Path) -> Manifest | None:
        if not path.is_file():
            return None
        return cls(path, json.loads(path.read_text()))

    def status(self, key: str) -> str | None:
        return self.data["stages"].get(key, {}).get("status")

    def done(self, key: str) -> bool:
        return self.status(key) == "done"

    def stage(self, key: str) -> dict[str, Any]:
        return self.data["stages"].get(key, {})

    def mark(self, key: str, **info: Any) -> None:
        self.data["stages"][key] = {"status": "done", **info}
        self.save()

    def mark_skipped(self, key: str, reason: str) -> None:
        self.data["stages"][key] = {"status": "skipped", "reason": reason}
        self.save()

    def forget_from(self, key: str) -> list[str]:
        """Un-mark `key` and every stage after it; returns what was forgotten."""
        cut = stage_order(key)
        dropped = [k for k in sorted(self.data["stages"], key=stage_order)
                   if stage_order(k) >= cut]
        for k in dropped:
            del self.data["stages"][k]
        self.save()
        return dropped

    @property
    def finished(self) -> bool:
        return bool(self.data.get("finished"))

    def finish(self) -> None:
        self.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        self.save()

    def completed(self) -> list[str]:
        """Stages done or skipped, in the manifest's order."""
        return [k for k, v in self.data["stages"].items()
                if v.get("status") in ("done", "skipped")]

    def save(self) -> None:
        io.write_json(self.path, self.data)


# ---------------------------------------------------------------- start, resume, redo


class ConfigChanged(PrefloopError):
    """A run directory started with another config than the one given now."""


# Config keys that say where a run lives or how long it goes on, not what its stages compute:
# they may differ between the recorded config and a resumed one.
WHERE_NOT_WHAT = ("name", "run_dir", "iterations")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# Options added with a default that changes what a run computes: a recorded config that
# lacks one was run with the value here (the behaviour before the option existed), not with
# today's default. Continuing such a run keeps that value (load_run_config fills it in), and
# today's default counts as a change.
LEGACY_VALUES = {"length_guard.attempts": 0}
# The same for a loss's parameters, per loss: a parameter added with a default that changes
# what the loss computes. A run of that loss records today's value in its config.yaml
# (`recorded_config`), so that a later change of the default is seen too. Only these are
# filled in, not every parameter of the loss: a recorded `alpha` would turn lr_dpo's length
# control to the fixed mode when the run continues from its directory.
LEGACY_LOSS_PARAMS = {"lr_dpo": {"lam": 0.0}}  # the chosen-response anchor (DPOP's λ)


def recorded_config(cfg: Any) -> dict:
    """The config as a run directory records it: `to_dict(cfg)` with the loss's
    `LEGACY_LOSS_PARAMS` at their values in force (given, else the loss's default)."""
    from prefloop.config import to_dict
    from prefloop.losses import LOSSES

    out = to_dict(cfg)
    loss = out.get("loss")
    if isinstance(loss, dict) and loss.get("name") in LEGACY_LOSS_PARAMS:
        defaults = LOSSES[loss["name"]].defaults
        for param in LEGACY_LOSS_PARAMS[loss["name"]]:
            loss.setdefault(param, defaults[param])
    return out


def _config_text(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(recorded_config(cfg), sort_keys=False)


def _legacy(recorded: dict) -> dict:
    """The `LEGACY_VALUES` and `LEGACY_LOSS_PARAMS` keys (flat) that a recorded config lacks,
    with the values its run was made with."""
    from prefloop.config import LossConfig

    name = recorded.get("loss.name", LossConfig.name)
    values = {**LEGACY_VALUES,
              **{f"loss.{k}": v for k, v in LEGACY_LOSS_PARAMS.get(name, {}).items()}}
    return {k: v for k, v in values.items() if k not in recorded}


def legacy_overrides(config_path: Path) -> list[str]:
    """`key=value` for every `LEGACY_VALUES` key (and `LEGACY_LOSS_PARAMS` parameter of its
    loss) the recorded config at `config_path` lacks: what continuing that run as it was
    needs on top of today's defaults."""
    import yaml

    recorded = _flatten(yaml.safe_load(config_path.read_text()) or {})
    return [f"{k}={v}" for k, v in _legacy(recorded).items()]


def config_changes(run: RunDir, cfg: Any) -> tuple[list[str], int]:
    """What differs between the run directory's config.yaml and `cfg`, as "key: old → new"
    (keys that do not change what a stage computes left out), and the recorded number of
    iterations. A key the recorded config lacks (an option added to prefloop after the run
    started) is no change while it keeps its default, which is the behaviour from before
    the option existed, or while it has its `LEGACY_VALUES` value where the default is not."""
    import yaml

    from prefloop.config import to_dict

    if not run.config.is_file():
        raise PrefloopError(f"{run.root}: has manifest.json but no config.yaml; the run "
                            "directory is damaged (use a new run_dir)")
    recorded = _flatten(yaml.safe_load(run.config.read_text()) or {})
    recorded.update(_legacy(recorded))
    current = _flatten(recorded_config(cfg))
    defaults = _flatten(to_dict(type(cfg)()))
    recorded.update({k: defaults[k] for k in current if k not in recorded and k in defaults})
    changes = [f"{k}: {recorded.get(k, '(unset)')} → {current.get(k, '(unset)')}"
               for k in sorted(set(recorded) | set(current))
               if k not in WHERE_NOT_WHAT and recorded.get(k) != current.get(k)]
    return changes, int(recorded.get("iterations", cfg.iterations))


def check_open(run: RunDir, cfg: Any, resume: bool, redo_from: str | None,
               overwrite: bool) -> str:
    """What opening `run` for `cfg` would do — "start", "continue", "complete", "extend" or
    "redo" — or the error it would refuse with; reads only, writes nothing (so `--dry-run`
    refuses what the run would refuse)."""
    if redo_from:
        it, _ = stage_order(redo_from)
        if it > cfg.iterations:
            raise PrefloopError(f"--redo-from: {redo_from} is past the run's last iteration "
                                f"({cfg.iterations}); nothing would be redone")
    manifest = Manifest.load(run.manifest)
    if manifest is None:
        if run.root.is_dir() and any(run.root.iterdir()) and not overwrite:
            raise PrefloopError(
                f"{run.root}: exists, is not empty and holds no prefloop run "
                "(no manifest.json); choose another run_dir, or pass --overwrite to "
                "write the run among its files")
        return "start"
    changes, recorded_iterations = config_changes(run, cfg)
    if changes and not redo_from:
        raise ConfigChanged(
            f"{run.root}: the config differs from the one this run was started with ("
            + "; ".join(changes) + "); use a new run_dir, or pass --redo-from ITER/STAGE "
            "(e.g. iter_2/train) to redo from that stage")
    if cfg.iterations < recorded_iterations and not redo_from:
        raise ConfigChanged(
            f"iterations: this run has {recorded_iterations}; a run can be extended "
            f"(iterations={recorded_iterations + 1} --resume), not shortened")
    extend = cfg.iterations > recorded_iterations
    if not (resume or manifest.finished or redo_from or extend):
        raise PrefloopError(
            f"{run.root}: an unfinished run is already here; pass --resume to continue it"
        )
    if redo_from:
        return "redo"
    if extend:
        return "extend"
    return "complete" if manifest.finished else "continue"


def open_run(run: RunDir, cfg: Any, procs: Any, resume: bool, redo_from: str | None,
             overwrite: bool, echo: Callable[[str], None]) -> Manifest:
    """The run's manifest, after the rules (`check_open`): a new directory is started
    (refused when it holds other files, unless `overwrite`); an existing run continues only
    with the same config (`resume`, or a finished one re-read), is extended (more
    `iterations`), or is redone from a stage (`redo_from`, which may change the config).
    Every process checks alike; the main one writes."""
    from prefloop.config import config_hash

    digest = config_hash(cfg)
    # every process refuses alike (a raise on the main one alone would leave the others
    # waiting at the barrier)
    what = check_open(run, cfg, resume, redo_from, overwrite)
    if what == "start":
        procs.barrier()  # every process has looked before the main one writes
        if procs.is_main:
            try:
                run.root.mkdir(parents=True, exist_ok=True)
                io.write_text(run.config, _config_text(cfg))
            except OSError as e:
                raise PrefloopError(f"{run.root}: cannot write the run directory ({e})") \
                    from None
            Manifest(run.manifest, {
                "config_hash": digest, "seed": cfg.seed, "versions": library_versions(),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {},
            }).save()
        procs.barrier()
        return Manifest.load(run.manifest)
    manifest = Manifest.load(run.manifest)
    procs.barrier()
    if procs.is_main and what in ("redo", "extend"):
        if what == "redo":
            dropped = manifest.forget_from(redo_from)
            echo(f"redoing {len(dropped)} stage(s) from {redo_from}")
        else:
            _, recorded_iterations = config_changes(run, cfg)
            echo(f"extending the run from {recorded_iterations} to {cfg.iterations} "
                 "iterations")
        manifest.data.pop("finished", None)
        manifest.data["config_hash"] = digest
        manifest.save()
        io.write_text(run.config, _config_text(cfg))
    procs.barrier()
    return Manifest.load(run.manifest)
