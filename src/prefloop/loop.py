"""The iterative loop (iLR-DPO): sample → score → pair → train → evaluate, T times.

    runs/NAME/
      config.yaml  manifest.json  metrics.jsonl
      iter_0/ eval_samples.jsonl eval.json                 (the initial policy)
      iter_t/ samples.jsonl scored.jsonl pairs.jsonl policy/ eval_samples.jsonl eval.json

Each stage reads the previous stage's artifact and writes its own atomically; the manifest
marks it done (or, for a stage the configuration does without, such as SPIN's scoring,
skipped with the reason). The online methods (SPIN, SPPO, XPO, DICE, RSO) are
configurations of this one loop; their own pieces live in `prefloop.online`. A stage
already done is skipped, so `--resume` after a crash continues where it stopped and
re-running a finished run does nothing. Under `accelerate launch`, sampling,
scoring and evaluation are sharded over processes and training is data-parallel; every
artifact is written by the main process only.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prefloop import faults, io
from prefloop.config import (
    TRUNCATION,
    DataConfig,
    LossConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
    TrainingConfig,
    check_choice,
    config_hash,
    dump_yaml,
    from_dict,
    to_dict,
    validate_loss,
    validate_training,
)
from prefloop.data import load_rows, read_jsonl
from prefloop.errors import PrefloopError, where
from prefloop.online import (
    attach_targets,
    check_method_options,
    iteration_reward,
    merge_reference_samples,
    reference_sampling,
    scores_needed,
    target_text,
)
from prefloop.pairing import PairingConfig
from prefloop.sampling import PromptRecord
from prefloop.stages import Processes, sample_prompts, score_rows

STAGES = ("sample", "score", "pair", "train", "evaluate")


@dataclass
class PromptsConfig:
    path: str = ""
    split: str = "train"
    column: str = "prompt"  # a string or a list of chat messages
    id_column: str = ""  # default: the row number
    per_iteration: int = 0  # size of each iteration's fresh, disjoint slice; 0 = all, every time
    shuffle_seed: int = 0
    limit: int = 0  # use at most this many prompts (0 = all)
    target_column: str = ""  # SPIN: the SFT answer of each prompt (e.g. completion)


@dataclass
class EvalConfig:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(num_samples=1, temperature=0.0)
    )
    gold: str = ""  # optional "module:function" → per-response correctness in [0, 1]
    lc_fit: str = "glm"  # glm | alpacaeval
    reward: RewardConfig | None = None  # the judge of evaluation; default: the run's reward


@dataclass
class RunConfig:
    """`prefloop run`: the iterative loop."""

    name: str = "run"
    run_dir: str = ""  # default: runs/<name>
    policy: str = ""
    trust_remote_code: bool = False
    iterations: int = 3
    seed: int = 0
    reference: str = "previous"  # previous (paper) | initial
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    pairing: PairingConfig = field(default_factory=PairingConfig)
    replay_data: str = ""  # offline preference set mixed in at pairing.replay_fraction
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)  # only the length limits apply
    training: TrainingConfig = field(default_factory=TrainingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def directory(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def validate(self) -> None:
        if not self.policy:
            raise PrefloopError("policy: required (a hub id or a local model directory)")
        if not self.prompts.path:
            raise PrefloopError("prompts.path: required (jsonl, parquet, dataset dir or hub id)")
        if self.iterations < 1:
            raise PrefloopError(f"iterations: must be ≥ 1, got {self.iterations}")
        if self.reference not in ("previous", "initial"):
            raise PrefloopError(f"reference: {self.reference!r} is not previous or initial")
        if self.data.path:
            raise PrefloopError("data.path: not used by the loop (pairs come from sampling); "
                                "set prompts.path instead")
        check_choice("data.truncation", self.data.truncation, TRUNCATION)
        if self.data.max_prompt_length >= self.data.max_length:
            raise PrefloopError("data.max_prompt_length must be smaller than data.max_length")
        validate_training(self.training)
        validate_loss(self.loss)
        self.sampling.validate("sampling")
        self.eval.sampling.validate("eval.sampling")
        self.reward.validate("reward")
        if self.eval.reward is not None:
            self.eval.reward.validate("eval.reward")
        self.pairing.validate()
        # spin pairs each sample with its target, xpo with the reference's sample
        need = 1 if self.pairing.strategy in ("spin", "xpo") else 2
        if self.sampling.num_samples < need:
            raise PrefloopError(f"sampling.num_samples: pairing.strategy "
                                f"{self.pairing.strategy} needs at least {need} per prompt")
        check_method_options(self)
        if self.pairing.replay_fraction > 0 and not self.replay_data:
            raise PrefloopError("replay_data: required when pairing.replay_fraction > 0")
        if self.eval.lc_fit not in ("glm", "alpacaeval"):
            raise PrefloopError(f"eval.lc_fit: {self.eval.lc_fit!r} is not glm or alpacaeval")
        for name in ("per_iteration", "limit"):
            if getattr(self.prompts, name) < 0:
                raise PrefloopError(f"prompts.{name}: must be ≥ 0")


# ---------------------------------------------------------------- prompts


def load_prompts(cfg: PromptsConfig, key: str = "prompts",
                 rows: list[dict] | None = None) -> list[PromptRecord]:
    """The prompt records of `cfg.path` (or of its `rows`, when already read)."""
    if rows is None:
        rows = load_rows(cfg.path, cfg.split)
    if not rows:
        raise PrefloopError(f"{cfg.path}: no prompts")
    records, seen = [], set()
    for i, row in enumerate(rows):
        if cfg.column not in row:
            raise PrefloopError(f"{where(cfg.path, i, cfg.column)}: missing column; row has "
                                f"{sorted(row)} (set {key}.column)")
        prompt = row[cfg.column]
        ok = (isinstance(prompt, str) and prompt.strip()) or (
            isinstance(prompt, list) and prompt and all(
                isinstance(m, dict) and isinstance(m.get("content"), str) for m in prompt))
        if not ok:
            raise PrefloopError(f"{where(cfg.path, i, cfg.column)}: expected a non-empty string "
                                "or a list of chat messages")
        pid = _prompt_id(cfg, row, i)
        if pid in seen:
            raise PrefloopError(f"{where(cfg.path, i, cfg.id_column)}: duplicate prompt id {pid!r}")
        seen.add(pid)
        records.append(PromptRecord(pid, prompt))
    if cfg.limit:
        records = records[: cfg.limit]
    return records


def _prompt_id(cfg: PromptsConfig, row: dict, i: int) -> str:
    if cfg.id_column and cfg.id_column not in row:
        raise PrefloopError(f"{where(cfg.path, i, cfg.id_column)}: missing column; row has "
                            f"{sorted(row)} (set prompts.id_column)")
    return str(row[cfg.id_column]) if cfg.id_column else str(i)


def load_targets(cfg: PromptsConfig, rows: list[dict]) -> dict[str, str]:
    """SPIN's SFT answers: prompt id → the answer text in the row's ``target_column`` (`rows`:
    the prompt set's rows, as `load_prompts` read them)."""
    targets = {}
    for i, row in enumerate(rows):
        if cfg.target_column not in row:
            raise PrefloopError(f"{where(cfg.path, i, cfg.target_column)}: missing column; row "
                                f"has {sorted(row)} (set prompts.target_column)")
        targets[_prompt_id(cfg, row, i)] = target_text(
            row.get(cfg.column), row[cfg.target_column], cfg.path, i, cfg.target_column)
    return targets


def iteration_prompts(all_prompts: list[PromptRecord], cfg: PromptsConfig, iteration: int,
                      iterations: int) -> list[PromptRecord]:
    """Iteration t's slice: disjoint slices of a seeded shuffle, or everything each time."""
    if not cfg.per_iteration:
        return all_prompts
    order = list(range(len(all_prompts)))
    random.Random(cfg.shuffle_seed).shuffle(order)
    need = cfg.per_iteration * iterations
    if need > len(order):
        raise PrefloopError(
            f"prompts.per_iteration: {iterations} disjoint slices of {cfg.per_iteration} need "
            f"{need} prompts but {cfg.path} has {len(order)}"
        )
    chosen = order[(iteration - 1) * cfg.per_iteration : iteration * cfg.per_iteration]
    return [all_prompts[i] for i in sorted(chosen)]


# ---------------------------------------------------------------- manifest


def _versions() -> dict[str, str]:
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

    def done(self, key: str) -> bool:
        return self.data["stages"].get(key, {}).get("status") == "done"

    def mark(self, key: str, **info) -> None:
        self.data["stages"][key] = {"status": "done", **info}
        io.write_json(self.path, self.data)

    def forget_from(self, key: str) -> list[str]:
        """Un-mark `key` and every stage after it; returns what was forgotten."""
        keys = list(self.data["stages"])
        order = sorted(keys, key=stage_order)
        cut = stage_order(key)
        dropped = [k for k in order if stage_order(k) >= cut]
        for k in dropped:
            del self.data["stages"][k]
        io.write_json(self.path, self.data)
        return dropped

    @property
    def finished(self) -> bool:
        return bool(self.data.get("finished"))


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


# ---------------------------------------------------------------- the run


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict]
    stages_run: list[str]
    skipped: list[str]


class Loop:
    """Drives one run directory. Each `_stage_*` method is one stage of one iteration."""

    def __init__(self, cfg: RunConfig, progress: bool = True, echo: Callable = print,
                 overwrite: bool = False):
        self.cfg = cfg
        self.overwrite = overwrite  # write into a non-empty directory that holds no run
        self.dir = cfg.directory
        self.procs = Processes()
        self.progress = progress and self.procs.is_main
        self.echo = echo if self.procs.is_main else (lambda *a, **k: None)
        self.stages_run: list[str] = []
        self.skipped: list[str] = []

    # -- paths
    def it_dir(self, t: int) -> Path:
        return self.dir / f"iter_{t}"

    def policy_path(self, t: int) -> str:
        return self.cfg.policy if t == 0 else str(self.it_dir(t) / "policy")

    def reference_path(self, t: int) -> str:
        """Iteration t's reference model: π_{t−1} (``previous``) or π₀ (``initial``)."""
        return self.policy_path(t - 1 if self.cfg.reference == "previous" else 0)

    # -- setup, resume rules
    def open_manifest(self, resume: bool, redo_from: str | None) -> Manifest:
        cfg, path = self.cfg, self.dir / "manifest.json"
        digest = config_hash(cfg)
        manifest = Manifest.load(path)
        if redo_from:
            it, _ = stage_order(redo_from)
            if it > cfg.iterations:
                raise PrefloopError(f"--redo-from: {redo_from} is past the run's last iteration "
                                    f"({cfg.iterations}); nothing would be redone")
        if manifest is None:
            # every process refuses alike (a raise on the main one alone would leave the
            # others waiting at the barrier)
            if self.dir.is_dir() and any(self.dir.iterdir()) and not self.overwrite:
                raise PrefloopError(
                    f"{self.dir}: exists, is not empty and holds no prefloop run "
                    "(no manifest.json); choose another run_dir, or pass --overwrite to "
                    "write the run among its files")
            self.procs.barrier()  # every process has looked before the main one writes
            if self.procs.is_main:
                try:
                    self.dir.mkdir(parents=True, exist_ok=True)
                    io.write_text(self.dir / "config.yaml", dump_yaml(cfg))
                except OSError as e:
                    raise PrefloopError(f"{self.dir}: cannot write the run directory ({e})") \
                        from None
                manifest = Manifest(path, {
                    "config_hash": digest, "seed": cfg.seed, "versions": _versions(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "stages": {},
                })
                io.write_json(path, manifest.data)
            self.procs.barrier()
            return Manifest.load(path)
        changes, recorded_iterations = self.config_changes()
        extend = cfg.iterations > recorded_iterations
        if changes and not redo_from:
            raise ConfigChanged(
                f"{self.dir}: the config differs from the one this run was started with ("
                + "; ".join(changes) + "); use a new run_dir, or pass --redo-from ITER/STAGE "
                "(e.g. iter_2/train) to redo from that stage")
        if cfg.iterations < recorded_iterations and not redo_from:
            raise ConfigChanged(
                f"iterations: this run has {recorded_iterations}; a run can be extended "
                f"(iterations={recorded_iterations + 1} --resume), not shortened")
        if not (resume or manifest.finished or redo_from or extend):
            raise PrefloopError(
                f"{self.dir}: an unfinished run is already here; pass --resume to continue it"
            )
        self.procs.barrier()
        if self.procs.is_main and (redo_from or extend):
            if redo_from:
                dropped = manifest.forget_from(redo_from)
                self.echo(f"redoing {len(dropped)} stage(s) from {redo_from}")
            else:
                self.echo(f"extending the run from {recorded_iterations} to {cfg.iterations} "
                          "iterations")
            manifest.data.pop("finished", None)
            manifest.data["config_hash"] = digest
            io.write_json(path, manifest.data)
            io.write_text(self.dir / "config.yaml", dump_yaml(cfg))
        self.procs.barrier()
        return Manifest.load(path)

    def config_changes(self) -> tuple[list[str], int]:
        """What differs between the run directory's config.yaml and this config, as
        "key: old → new" (keys that do not change what a stage computes left out), and the
        recorded number of iterations."""
        import yaml

        path = self.dir / "config.yaml"
        if not path.is_file():
            raise PrefloopError(f"{self.dir}: has manifest.json but no config.yaml; the run "
                                "directory is damaged (use a new run_dir)")
        recorded = _flatten(yaml.safe_load(path.read_text()) or {})
        current = _flatten(to_dict(self.cfg))
        changes = [f"{k}: {recorded.get(k, '(unset)')} → {current.get(k, '(unset)')}"
                   for k in sorted(set(recorded) | set(current))
                   if k not in WHERE_NOT_WHAT and recorded.get(k) != current.get(k)]
        return changes, int(recorded.get("iterations", self.cfg.iterations))

    def run(self, resume: bool = False, redo_from: str | None = None) -> RunResult:
        cfg = self.cfg
        # what can be checked without a model fails before anything is written
        check_functions(cfg)
        prompt_rows = load_rows(cfg.prompts.path, cfg.prompts.split)  # read once, for both
        prompts = load_prompts(cfg.prompts, rows=prompt_rows)
        iteration_prompts(prompts, cfg.prompts, cfg.iterations, cfg.iterations)  # enough?
        self.manifest = self.open_manifest(resume, redo_from)
        if self.manifest.finished and not redo_from:
            self.echo(f"{self.dir}: run already complete; nothing to do")
            done = [k for k, v in self.manifest.data["stages"].items()
                    if v.get("status") in ("done", "skipped")]
            return RunResult(self.dir, self.read_metrics(), [], done)
        self.targets = load_targets(cfg.prompts, prompt_rows) if cfg.prompts.target_column \
            else {}
        self.eval_prompts = load_prompts(cfg.eval.prompts, "eval.prompts") \
            if cfg.eval.prompts.path else []
        self.stage(0, "evaluate", self.it_dir(0) / "eval.json", lambda: self.evaluate(0))
        for t in range(1, cfg.iterations + 1):
            d = self.it_dir(t)
            slice_t = iteration_prompts(prompts, cfg.prompts, t, cfg.iterations)
            self.stage(t, "sample", d / "samples.jsonl", lambda t=t, p=slice_t: self.sample(t, p))
            if scores_needed(cfg.pairing.strategy):
                self.stage(t, "score", d / "scored.jsonl", lambda t=t: self.score(t))
            else:
                self.skip_stage(t, "score", f"pairing.strategy {cfg.pairing.strategy} "
                                            "pairs without scores")
            self.stage(t, "pair", d / "pairs.jsonl", lambda t=t: self.pair(t))
            self.stage(t, "train", d / "policy" / "config.json", lambda t=t: self.train(t))
            self.stage(t, "evaluate", d / "eval.json", lambda t=t: self.evaluate(t))
        if self.procs.is_main:
            self.manifest.data["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
            io.write_json(self.manifest.path, self.manifest.data)
        self.procs.barrier()
        return RunResult(self.dir, self.read_metrics(), self.stages_run, self.skipped)

    def stage(self, t: int, name: str, artifact: Path, fn: Callable[[], dict]) -> None:
        key = stage_key(t, name)
        if self.manifest.done(key) and artifact.exists():
            self.skipped.append(key)
            return
        for leftover in artifact.parent.glob(f".{artifact.name}.*"):
            # temporaries of an interrupted attempt (atomic writes never expose them)
            shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
        faults.set_stage(key)
        start = time.perf_counter()
        info = fn() or {}
        faults.point()  # artifact written, stage not yet marked done
        self.procs.barrier()
        if self.procs.is_main:
            self.manifest.mark(key, seconds=round(time.perf_counter() - start, 3),
                               finished=time.strftime("%Y-%m-%dT%H:%M:%S"), **info)
        self.procs.barrier()
        self.manifest = Manifest.load(self.manifest.path)
        self.stages_run.append(key)

    def skip_stage(self, t: int, name: str, reason: str) -> None:
        """A stage this configuration does without: recorded as skipped, with the reason."""
        key = stage_key(t, name)
        self.skipped.append(key)
        if self.manifest.data["stages"].get(key, {}).get("status") == "skipped":
            return
        if self.procs.is_main:
            self.manifest.data["stages"][key] = {"status": "skipped", "reason": reason}
            io.write_json(self.manifest.path, self.manifest.data)
        self.procs.barrier()
        self.manifest = Manifest.load(self.manifest.path)

    # -- stages ------------------------------------------------------------------------------
    def sample(self, t: int, prompts: list[PromptRecord]) -> dict:
        """K samples per prompt from π_{t−1}; XPO adds one from the reference, SPIN the
        targets. Every row says which model drew it (``source``: policy | reference)."""
        cfg = self.cfg
        sampling = SamplingConfig(**{**vars(cfg.sampling), "seed": cfg.sampling.seed + 1000 * t})
        # self-refinement that selects by reward is judged by the run's reward (never the eval's)
        by_reward = sampling.refine.rounds > 0 and sampling.refine.select == "reward"
        judge = cfg.reward if by_reward else None
        rows = sample_prompts(self.policy_path(t - 1), prompts, sampling, self.procs,
                              cfg.trust_remote_code, self.progress, f"iter {t} sample",
                              reward=judge)
        reference_rows = []
        if cfg.pairing.strategy == "xpo":
            reference_rows = sample_prompts(
                self.reference_path(t), prompts, reference_sampling(sampling), self.procs,
                cfg.trust_remote_code, self.progress, f"iter {t} sample reference")
        rows = merge_reference_samples(rows, reference_rows)
        if self.targets:
            from prefloop.models import load_tokenizer

            attach_targets(rows, self.targets,
                           load_tokenizer(self.policy_path(t - 1), cfg.trust_remote_code))
        if self.procs.is_main:
            io.write_jsonl(self.it_dir(t) / "samples.jsonl", rows)
        info = {"rows": len(rows), "prompts": len(prompts)}
        if reference_rows:
            info.update(reference_rows=len(reference_rows), reference=self.reference_path(t))
        return info

    def score(self, t: int) -> dict:
        reward = iteration_reward(self.cfg.reward, t, self.policy_path, self.cfg.reference)
        samples = self.it_dir(t) / "samples.jsonl"
        rows = read_jsonl(samples)
        scores = score_rows(rows, reward, self.procs, self.cfg.trust_remote_code,
                            self.progress, f"iter {t} score", source=str(samples))
        if self.procs.is_main:
            io.write_jsonl(self.it_dir(t) / "scored.jsonl",
                           [{**r, "score": s} for r, s in zip(rows, scores, strict=True)])
        info: dict = {"rows": len(rows)}
        if reward.type == "implicit":
            info["implicit_reward"] = {"model": reward.model, "reference": reward.reference}
        return info

    def pair(self, t: int) -> dict:
        from prefloop.pairing import make_pairs

        cfg = self.cfg
        name = "scored.jsonl" if scores_needed(cfg.pairing.strategy) else "samples.jsonl"
        rows = read_jsonl(self.it_dir(t) / name)
        replay = load_rows(cfg.replay_data) if cfg.replay_data else []
        pairing = PairingConfig(**{**vars(cfg.pairing), "seed": cfg.pairing.seed + t})
        pairs, stats = make_pairs(rows, pairing, replay)
        if not pairs:
            raise PrefloopError(
                f"{self.it_dir(t) / name}: no pairs (all {stats.prompts} prompts tied "
                "or below the margin); raise sampling.temperature or num_samples"
            )
        if self.procs.is_main:
            io.write_jsonl(self.it_dir(t) / "pairs.jsonl", pairs)
            rso = (f", rejection sampling kept {stats.rso_accepted} of "
                   f"{stats.rso_accepted + stats.rso_rejected}"
                   if pairing.rejection_sampling.enabled else "")
            self.echo(f"iter {t}: {stats.pairs} pairs from {stats.prompts} prompts, "
                      f"{stats.ties_dropped} ties dropped{rso}, length gap "
                      f"{stats.mean_length_gap:+.1f} {pairing.length_unit}"
                      + ("" if math.isnan(stats.neutral_alpha) else
                         f" (length-neutral α {stats.neutral_alpha:.3g})"))
        return {"pairing": stats.as_dict()}

    def train(self, t: int) -> dict:
        from prefloop.data import pairs_from_rows
        from prefloop.models import load_tokenizer
        from prefloop.trainer import train_preferences

        cfg = self.cfg
        rows = read_jsonl(self.it_dir(t) / "pairs.jsonl")
        start = self.policy_path(t - 1)
        tok = load_tokenizer(start, cfg.trust_remote_code)
        d = cfg.data
        pairs, stats = pairs_from_rows(rows, tok, d.max_length, d.max_prompt_length,
                                       d.truncation, str(self.it_dir(t) / "pairs.jsonl"))
        previous = cfg.reference == "previous"
        train_cfg = TrainConfig(
            model=start,
            reference="" if previous or t == 1 else cfg.policy,
            # vLLM's log-probs come from other kernels (bf16 on GPUs): one no-grad pass instead
            reuse_sampling_logps=(previous or t == 1) and cfg.sampling.backend == "hf",
            output_dir=str(self.it_dir(t) / "policy"),
            trust_remote_code=cfg.trust_remote_code,
            data=DataConfig(**{**vars(d), "path": str(self.it_dir(t) / "pairs.jsonl")}),
            loss=cfg.loss,
            training=from_dict(TrainingConfig, {**to_dict(cfg.training),
                                                "seed": cfg.training.seed + t}),
        )
        goal = self.length_goal(t) if cfg.loss.alpha_mode == "target" else None
        result = train_preferences(train_cfg, pairs=pairs, progress=self.progress,
                                   length_goal=goal)
        last = result.log[-1]
        info = {"steps": result.steps, "pairs": len(pairs), "truncation": stats.as_dict(),
                "final_loss": last["loss"], "final_accuracy": last["accuracy"],
                "reference_seconds": round(result.reference_seconds, 3)}
        if result.length_control:
            lc = result.length_control  # recorded as: alpha (first step), alpha_last, …
            info.update(alpha=lc["alpha_first"], alpha_last=lc["alpha_last"],
                        alpha_mean=lc["alpha_mean"], alpha_mode=lc["mode"],
                        **{k: lc[k] for k in ("start_length", "target_length") if k in lc})
            unit = cfg.loss.length_unit[:-1]
            text = {"fixed": f"α = {lc['alpha_first']:.4g} per {unit} (fixed)",
                    "first_step": f"α = {lc['alpha_first']:.4g} per {unit} (length-neutral "
                                  "first step)"}
            changing = (f"α {lc['alpha_first']:.4g} → {lc['alpha_last']:.4g} per {unit} (mean "
                        f"{lc['alpha_mean']:.4g}, {lc['mode']})")
            if goal is not None:
                changing += (f"; sampled at {goal.start:.1f} {cfg.loss.length_unit}, "
                             f"target {goal.target:.1f}")
            self.echo(f"iter {t}: " + text.get(lc["mode"], changing))
        return info

    def length_goal(self, t: int):
        """The target mode's start (π_{t−1}'s mean sample length, measured on iteration t's
        samples) and target (`length_control.target`, else π₀'s, from iteration 1's)."""
        from prefloop.length_control import LengthGoal

        def mean_length(it: int) -> float:
            key = "num_chars" if self.cfg.loss.length_unit == "chars" else "num_tokens"
            rows = [r for r in read_jsonl(self.it_dir(it) / "samples.jsonl")
                    if r.get("source", "policy") == "policy"]
            return sum(r[key] for r in rows) / len(rows)

        target = self.cfg.loss.length_control.target or mean_length(1)
        start = mean_length(t)
        if min(start, target) <= 0:
            raise PrefloopError(f"loss.length_control: the sampled answers are empty (mean "
                                f"length {start} {self.cfg.loss.length_unit}, target {target}); "
                                "no length to hold")
        return LengthGoal(start, target)

    def evaluate(self, t: int) -> dict:
        cfg = self.cfg
        if not self.eval_prompts:
            record = {"iteration": t}
            if self.procs.is_main:
                io.write_json(self.it_dir(t) / "eval.json", record)
            return {}
        rows = sample_prompts(self.policy_path(t), self.eval_prompts, cfg.eval.sampling,
                              self.procs, cfg.trust_remote_code, self.progress, f"iter {t} eval")
        scores = score_rows(rows, cfg.eval.reward or cfg.reward, self.procs,
                            cfg.trust_remote_code, self.progress, f"iter {t} eval score")
        for row, score in zip(rows, scores, strict=True):
            row["score"] = score
        if cfg.eval.gold:
            from prefloop.rewards import gold_values

            gold = gold_values(cfg.eval.gold, [r["prompt"] for r in rows],
                               [r["response"] for r in rows])
            for row, g in zip(rows, gold, strict=True):
                row["gold"] = g
        record = {"iteration": t}
        if self.procs.is_main:
            baseline = read_jsonl(self.it_dir(0) / "eval_samples.jsonl") if t else rows
            initial_logps = self.initial_logps(rows) if t else None
            record = evaluate_iteration(t, rows, baseline, initial_logps, cfg.eval.lc_fit)
            trained = self.manifest.data["stages"].get(stage_key(t, "train"), {}) if t else {}
            record.update({k: trained[k] for k in ("alpha", "alpha_last", "alpha_mean")
                           if k in trained})
            if "target_length" in trained:
                record.update(length_target=trained["target_length"],
                              length_target_unit=cfg.loss.length_unit)
            io.write_jsonl(self.it_dir(t) / "eval_samples.jsonl", rows)
            io.write_json(self.it_dir(t) / "eval.json", record)
            self.write_metrics()
            self.echo(format_metrics_row(record, header=t == 0))
            from prefloop.evaluate import EOS_WARNING

            if record["eos_rate"] < EOS_WARNING:
                self.echo(f"iter {t}: warning: {1 - record['eos_rate']:.0%} of the eval answers "
                          f"hit eval.sampling.max_new_tokens ({cfg.eval.sampling.max_new_tokens}"
                          "): their lengths and the KL estimate are of cut answers")
            for warning in record.get("lc_warnings", []):
                self.echo(f"iter {t}: warning: length-controlled win rate: {warning}")
        return {}

    def initial_logps(self, rows: list[dict]) -> list[float] | None:
        """log π₀(y|x) of the current policy's eval samples, for the KL estimate."""
        if any(r.get("logprob") is None for r in rows):
            return None
        from prefloop.logprobs import sequence_logps
        from prefloop.models import load_causal_lm, load_tokenizer

        tok = load_tokenizer(self.cfg.policy, self.cfg.trust_remote_code)
        model = load_causal_lm(self.cfg.policy, self.cfg.trust_remote_code)
        values = sequence_logps(model, [r["prompt_ids"] for r in rows],
                                [r["response_ids"] for r in rows], tok.pad_token_id)
        return values.tolist()

    # -- metrics
    def write_metrics(self) -> None:
        records = []
        for t in range(0, self.cfg.iterations + 1):
            path = self.it_dir(t) / "eval.json"
            if path.is_file():
                records.append(json.loads(path.read_text()))
        io.write_jsonl(self.dir / "metrics.jsonl", records)

    def read_metrics(self) -> list[dict]:
        path = self.dir / "metrics.jsonl"
        return read_jsonl(path) if path.is_file() else []


def evaluate_iteration(t: int, rows: list[dict], baseline: list[dict],
                       initial_logps: list[float] | None, lc_fit: str = "glm") -> dict:
    """Metrics of iteration t's eval samples against the initial policy's (iteration 0)."""
    import numpy as np

    from prefloop.evaluate import (
        kl_estimate,
        length_controlled_win_rate,
        length_stats,
        preferences,
        win_rate,
    )

    scores = np.array([r["score"] for r in rows], dtype=float)
    record: dict = {"iteration": t, "n": len(rows), "mean_reward": float(scores.mean())}
    record.update(length_stats([r["num_tokens"] for r in rows], [r["num_chars"] for r in rows]))
    record["mean_tokens_se"] = prompt_clustered_se(rows, "num_tokens")
    record["mean_chars_se"] = prompt_clustered_se(rows, "num_chars")
    record["eos_rate"] = float(np.mean([r["finish_reason"] == "eos" for r in rows]))
    if any("gold" in r for r in rows):
        record["gold_accuracy"] = float(np.mean([r.get("gold", 0.0) for r in rows]))
        record["gold_accuracy_se"] = prompt_clustered_se(rows, "gold")
    first = {r["prompt_id"]: r for r in baseline if r["sample_index"] == 0}
    mine = [r for r in rows if r["sample_index"] == 0 and r["prompt_id"] in first]
    base = [first[r["prompt_id"]] for r in mine]
    a = np.array([r["score"] for r in mine], dtype=float)
    b = np.array([r["score"] for r in base], dtype=float)
    wr = win_rate(a, b)  # percent
    record.update(win_rate=wr.soft, win_rate_se=wr.soft_se, win_rate_hard=wr.hard,
                  win_rate_hard_se=wr.hard_se)
    lc = length_controlled_win_rate(preferences(a, b, "soft"), [r["num_chars"] for r in mine],
                                    [r["num_chars"] for r in base], fit=lc_fit)
    record["lc_win_rate"] = float(lc.lc)
    if lc.warnings:
        record["lc_warnings"] = list(lc.warnings)
    record["kl"] = None
    if initial_logps is not None:
        kl, kl_se = kl_estimate([r["logprob"] for r in rows], initial_logps)
        record.update(kl=float(kl), kl_se=float(kl_se))
    return record


def prompt_clustered_se(rows: list[dict], key: str) -> float | None:
    """Standard error of the mean of `key` over rows, prompts as the sampling unit: the sd
    of the per-prompt means over √(number of prompts) (with one sample per prompt, the
    usual √(p(1−p)/(n−1)) for a 0/1 value). None with fewer than two prompts."""
    import numpy as np

    by_prompt: dict[str, list[float]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(float(r.get(key, 0.0)))
    if len(by_prompt) < 2:
        return None
    means = np.array([np.mean(v) for v in by_prompt.values()])
    return float(means.std(ddof=1) / np.sqrt(len(means)))


METRIC_COLUMNS = [
    ("iteration", "iter", "{:d}"), ("mean_reward", "reward", "{:+.3f}"),
    ("gold_accuracy", "gold", "{:.1%}"), ("mean_tokens", "tokens", "{:.1f}"),
    ("mean_chars", "chars", "{:.0f}"), ("win_rate", "WR%", "rate"),
    ("lc_win_rate", "LC%", "rate"), ("kl", "KL", "{:.2f}"), ("eos_rate", "EOS%", "{:.0%}"),
]


def format_metrics_row(record: dict, header: bool = False) -> str:
    from prefloop.evaluate import format_rate

    cells = []
    for key, _, fmt in METRIC_COLUMNS:
        value = record.get(key)
        if value is None:
            cells.append("-")
        else:  # a degenerate LC of 1.6e-05 % must not read as 0.0
            cells.append(format_rate(value) if fmt == "rate" else fmt.format(value))
    line = "  ".join(f"{c:>8}" for c in cells)
    if header:
        head = "  ".join(f"{h:>8}" for _, h, _ in METRIC_COLUMNS)
        return head + "\n" + line
    return line


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from a YAML file, or from a run directory (its recorded config.yaml,
    with run_dir set to that directory), plus dotted overrides."""
    from prefloop.config import load_config

    if path is not None and Path(path).is_dir():
        if not (Path(path) / "config.yaml").is_file():
            raise PrefloopError(f"{path}: a directory without config.yaml is not a prefloop "
                                "run directory")
        return load_config(RunConfig, Path(path) / "config.yaml",
                           [f"run_dir={path}", *overrides])
    return load_config(RunConfig, path, list(overrides))


def run(cfg: RunConfig, resume: bool = False, redo_from: str | None = None,
        progress: bool = True, overwrite: bool = False) -> RunResult:
    """Run (or continue) the loop described by `cfg`; returns the metrics per iteration.
    `progress=False` is silent: no bars and no tables (the run's files still record all)."""
    cfg.validate()
    echo = print if progress else (lambda *a, **k: None)
    return Loop(cfg, progress, echo, overwrite).run(resume, redo_from)


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".jsonl", ".json", ".parquet")


def _describe_reward(reward: RewardConfig) -> str:
    if reward.type == "implicit":
        return (f"implicit β·(log π_t−1 − log π_ref), β={reward.beta} "
                f"(iteration 1: {reward.model} vs {reward.reference})")
    return reward.model or reward.function or reward.type


def _describe_pairing(cfg: RunConfig) -> str:
    p = cfg.pairing
    if p.strategy == "spin":
        return f"spin: target ({cfg.prompts.target_column}) vs each sample, no scores"
    text = f"{p.strategy}, length penalty {p.length_penalty}, replay {p.replay_fraction}"
    if p.strategy == "sppo":
        text += f", {p.win_probability} win probabilities"
    if p.rejection_sampling.enabled:
        rso = p.rejection_sampling
        text += f", rejection sampling β={rso.beta} keeps {rso.num_accepted}"
    return text


def check_functions(cfg: RunConfig) -> None:
    """Import the run's Python functions (rewards, gold) so that a wrong name fails now."""
    from prefloop.rewards import import_function

    for key, reward in (("reward", cfg.reward), ("eval.reward", cfg.eval.reward)):
        if reward is not None and reward.type == "function":
            import_function(reward.function, f"{key}.function")
    if cfg.eval.gold:
        import_function(cfg.eval.gold, "eval.gold")


def plan(cfg: RunConfig) -> list[tuple[str, str]]:
    """What `prefloop run` would do, checked without loading or downloading any model."""
    cfg.validate()
    check_functions(cfg)
    eval_reward = cfg.eval.reward or cfg.reward
    for key, path in (("policy", cfg.policy), ("prompts.path", cfg.prompts.path),
                      ("reward.model", cfg.reward.model if cfg.reward.type == "model" else ""),
                      ("reward.reference", cfg.reward.reference
                       if cfg.reward.type == "implicit" else ""),
                      ("eval.reward.model", eval_reward.model
                       if eval_reward.type == "model" else ""),
                      ("eval.prompts.path", cfg.eval.prompts.path),
                      ("replay_data", cfg.replay_data)):
        if path and _looks_local(path) and not Path(path).expanduser().exists():
            raise PrefloopError(f"{key}: {path} does not exist")
    if cfg.prompts.per_iteration and _looks_local(cfg.prompts.path):
        # a local prompt file is cheap to read: too few prompts fail here, not after
        # the first iterations have run
        prompts = load_prompts(cfg.prompts)
        iteration_prompts(prompts, cfg.prompts, cfg.iterations, cfg.iterations)
    mode = cfg.loss.alpha_mode
    params = ", ".join([f"{k}={v}" for k, v in cfg.loss.params.items()]
                       + ([f"alpha={mode}"] if mode not in ("none", "fixed") else []))
    per_iter = cfg.prompts.per_iteration or "all"
    k = cfg.sampling.num_samples
    extra = " + 1 from the reference (xpo)" if cfg.pairing.strategy == "xpo" else ""
    stages = [s for s in STAGES if s != "score" or scores_needed(cfg.pairing.strategy)]
    return [
        ("run directory", str(cfg.directory)),
        ("policy π₀", cfg.policy),
        ("reward", _describe_reward(cfg.reward)),
        ("loss", f"{cfg.loss.name}({params})"),
        ("reference", f"{cfg.reference} policy"),
        ("iterations", str(cfg.iterations)),
        ("prompts per iteration", f"{per_iter} from {cfg.prompts.path}"),
        ("samples per prompt", f"{k}{extra} (temperature {cfg.sampling.temperature}, "
                               f"≤ {cfg.sampling.max_new_tokens} new tokens)"),
        ("pairing", _describe_pairing(cfg)),
        ("eval prompts", cfg.eval.prompts.path or "none"),
        ("eval reward", _describe_reward(eval_reward) if cfg.eval.prompts.path else "none"),
        ("stages", " → ".join(stages) + f" × {cfg.iterations}"),
    ]
