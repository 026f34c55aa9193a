"""`prefloop demo`: the paper's experiment in the offline verbosity testbed.

  1. build (cached): tokenizer → random Llama → SFT policy; random Llama → reward model
     trained on length-biased annotator labels; iteration and eval prompt sets
  2. from the same SFT policy, T iterations of iDPO (loss `dpo`) and iLR-DPO (`lr_dpo`)
  3. compare: gold accuracy, proxy reward, length, win rate and LC win rate vs SFT;
     a table on screen, plots and an HTML report overlaying both runs
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from prefloop import testbed
from prefloop.errors import PrefloopError
from prefloop.io import write_jsonl
from prefloop.length_control import LENGTH_BAND


@dataclass
class DemoConfig:
    seed: int = 0
    out_dir: str = "runs/demo"
    cache_dir: str = ""  # default: ~/.cache/prefloop/testbed
    iterations: int = 3
    # testbed build
    vocab_size: int = 512
    policy_size: str = "micro"
    rm_size: str = "micro"
    sft_examples: int = 2000
    sft_epochs: float = 20.0
    sft_lr: float = 2e-3
    rm_pairs: int = 4000
    # 10 epochs left seed 1's reward model still learning (training loss falling in its last
    # epoch) and scoring a wrong answer above the right one of the same word count in 14% of
    # pairs; `testbed.reward_correctness` of seeds 0–4: 76.6–96.9% at 10, 90.9–99.6% at 20
    rm_epochs: float = 20.0
    rm_lr: float = 1e-3
    rm_on_policy_share: float = 0.5  # share of RM pairs sampled from the SFT policy
    annotator_w_correct: float = 3.0
    annotator_w_length: float = 0.03
    # loop
    prompts_per_iteration: int = 512
    eval_prompts: int = 500
    eval_temperature: float = 1.0  # the policy as it samples, not its greedy mode
    eval_samples: int = 4  # per eval prompt: one standard error of gold ≤ 1.5 points
    num_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    beta: float = 0.1
    # the loops' training seed (batch order, dropout); None: `seed`. Another value trains
    # the same testbed's loops again, to see how much one training run's draw moves them
    training_seed: int | None = None
    # lr_dpo's fixed per-token length margin; None: chosen by `alpha_mode`
    alpha: float | None = None
    # how lr_dpo's α is chosen when `alpha` is not given (loss.length_control.mode): target
    # (held at SFT's length), per_step, first_step
    alpha_mode: str = "target"
    lr: float = 2e-4
    batch_size: int = 16
    epochs: float = 2.0
    # run name → its loss keys (`loss.*` of the loop), plus optionally `pairing: {…}` (the
    # loop's `pairing.*`, e.g. {length_penalty: auto}: length control at pair selection)
    runs: dict[str, dict] = field(default_factory=lambda: {
        "idpo": {"name": "dpo"},
        "ilr-dpo": {"name": "lr_dpo"},
    })
    # the loop's `length_guard` keys for the runs it applies to (lr_dpo holding SFT's
    # length), e.g. {attempts: 0} to run without it
    length_guard: dict = field(default_factory=dict)

    def validate(self) -> None:
        from prefloop.losses import LOSSES
        from prefloop.tiny import SIZES

        for key in ("policy_size", "rm_size"):
            if getattr(self, key) not in SIZES:
                raise PrefloopError(f"{key}: {getattr(self, key)!r} is not one of "
                                    f"{', '.join(SIZES)}")
        for key in ("iterations", "sft_examples", "rm_pairs", "prompts_per_iteration",
                    "eval_prompts", "eval_samples", "num_samples", "max_new_tokens",
                    "batch_size"):
            if getattr(self, key) < 1:
                raise PrefloopError(f"{key}: must be ≥ 1, got {getattr(self, key)}")
        if not 0 <= self.rm_on_policy_share <= 1:
            raise PrefloopError(f"rm_on_policy_share: must be in [0, 1], got "
                                f"{self.rm_on_policy_share}")
        if self.num_samples < 2:
            raise PrefloopError("num_samples: pairing needs ≥ 2 samples per prompt")
        from prefloop.config import ALPHA_MODES, check_choice

        check_choice("alpha_mode", self.alpha_mode, ALPHA_MODES)
        if self.alpha is not None and self.alpha < 0:
            raise PrefloopError(f"alpha: must be ≥ 0 (or null: automatic), got {self.alpha}")
        if self.length_guard:
            from prefloop.config import from_dict
            from prefloop.loop.config import LengthGuardConfig

            from_dict(LengthGuardConfig, self.length_guard, "length_guard.").validate()
        for name, loss in self.runs.items():
            if loss.get("name") not in LOSSES:
                raise PrefloopError(f"runs.{name}.name: {loss.get('name')!r} is not a "
                                    f"registered loss ({', '.join(sorted(LOSSES))})")
            if "pairing" in loss:
                from prefloop.config import from_dict
                from prefloop.pairing import PairingConfig

                if not isinstance(loss["pairing"], dict):
                    raise PrefloopError(f"runs.{name}.pairing: expected a mapping of the "
                                        f"loop's pairing keys, got {loss['pairing']!r}")
                key = f"runs.{name}.pairing"
                from_dict(PairingConfig, loss["pairing"], f"{key}.").validate(key)

    def build_key(self) -> str:
        """Hash of what the cached models depend on (prompt sets are cheap and not cached)."""
        text = json.dumps({"recipe": TESTBED_RECIPE, **{k: getattr(self, k) for k in MODEL_KEYS}},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# Raised whenever the code that builds the testbed changes what it builds (2: SFT weighs
# every completion token of an epoch alike), so that no cache of an older build is reused.
TESTBED_RECIPE = 2
# The fields the testbed's models (SFT policy, reward model) are built from.
MODEL_KEYS = ("seed", "vocab_size", "policy_size", "rm_size", "sft_examples", "sft_epochs",
              "sft_lr", "rm_pairs", "rm_epochs", "rm_lr", "rm_on_policy_share",
              "annotator_w_correct", "annotator_w_length", "max_new_tokens")


@dataclass
class Testbed:
    directory: Path
    base: Path  # the untrained policy the SFT started from
    sft: Path
    reward_model: Path
    sft_data: Path  # prompt/completion rows the SFT policy was taught on
    preferences: Path  # the annotator's pairs the reward model was trained on
    seconds: float  # build time (0 when it came from the cache)
    cached: bool


def _paths(d: Path, seconds: float = 0.0, cached: bool = True) -> Testbed:
    return Testbed(d, d / "base", d / "sft", d / "reward_model", d / "sft.jsonl",
                   d / "prefs.jsonl", seconds, cached)


def cache_root(cfg: DemoConfig) -> Path:
    return Path(cfg.cache_dir or Path.home() / ".cache" / "prefloop" / "testbed")


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """The testbed's models are too small to gain from intra-op threads, and the thread count
    changes floating-point summation order: with one thread the demo's numbers are the same
    on every machine of the same CPU family, whatever its core count."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_testbed(cfg: DemoConfig, progress: bool = True, echo=print) -> Testbed:
    """Tokenizer, SFT policy and reward model, built once per `build_key` and cached.

    Concurrent builders of the same key wait on a file lock; the build goes to a temporary
    directory renamed into place when complete, so the cache never holds a half-built bed.
    """
    root = cache_root(cfg)
    root.mkdir(parents=True, exist_ok=True)
    d = root / cfg.build_key()
    if (d / "built.json").is_file():
        return _paths(d)
    with open(root / f"{d.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if (d / "built.json").is_file():  # built by another process while we waited
                return _paths(d)
            start = time.perf_counter()
            echo(f"building the testbed in {d} (once; later runs reuse it)")
            tmp = root / f".{d.name}.partial"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            with one_torch_thread():
                _build_models(cfg, _paths(tmp), progress, echo)
            seconds = time.perf_counter() - start
            (tmp / "built.json").write_text(json.dumps({"config": asdict(cfg),
                                                        "seconds": seconds}))
            shutil.rmtree(d, ignore_errors=True)
            tmp.rename(d)
            return _paths(d, seconds, cached=False)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_models(cfg: DemoConfig, bed: Testbed, progress: bool, echo) -> None:
    from prefloop.config import from_dict
    from prefloop.reward_training import RewardModelConfig, train_reward_model
    from prefloop.sft import SFTConfig, train_sft
    from prefloop.tiny import build_causal_lm, save_pretrained_pair, train_tokenizer

    d = bed.directory
    tok = train_tokenizer(testbed.corpus(cfg.seed), cfg.vocab_size)
    save_pretrained_pair(build_causal_lm("llama", tok, cfg.policy_size, seed=cfg.seed), tok,
                         bed.base)
    save_pretrained_pair(build_causal_lm("llama", tok, cfg.rm_size, seed=cfg.seed + 1), tok,
                         d / "rm_base")

    echo("  SFT policy on concise/verbose, correct/wrong answers")
    sft_rows = testbed.sft_rows(cfg.sft_examples, cfg.seed + 1)
    write_jsonl(bed.sft_data, sft_rows)
    sft_cfg = from_dict(SFTConfig, {
        "model": str(bed.base), "output_dir": str(bed.sft),
        "data": {"path": str(bed.sft_data), "max_length": 256, "max_prompt_length": 64},
        "training": {"lr": cfg.sft_lr, "batch_size": 32, "epochs": cfg.sft_epochs,
                     "warmup_ratio": 0.05, "scheduler": "cosine", "seed": cfg.seed,
                     "max_grad_norm": 1.0},
    })
    train_sft(sft_cfg, rows=sft_rows, progress=progress)

    echo("  reward model on length-biased annotator labels")
    annotator = testbed.Annotator(cfg.annotator_w_correct, cfg.annotator_w_length)
    pairs = _reward_model_pairs(cfg, bed, annotator, progress)
    write_jsonl(bed.preferences, pairs)
    rm_cfg = from_dict(RewardModelConfig, {
        "model": str(d / "rm_base"), "output_dir": str(bed.reward_model),
        "data": {"path": str(bed.preferences)},
        "training": {"lr": cfg.rm_lr, "batch_size": 32, "epochs": cfg.rm_epochs,
                     "warmup_ratio": 0.05, "scheduler": "cosine", "seed": cfg.seed},
    })
    train_reward_model(rm_cfg, rows=pairs, progress=progress)


def _reward_model_pairs(cfg: DemoConfig, bed: Testbed, annotator: testbed.Annotator,
                        progress: bool) -> list[dict]:
    """Annotator-labelled pairs: a share written by the task's generator (correctness-only,
    length-only and mixed contrasts) and the rest sampled from the SFT policy, so that the
    reward model has seen the policy's own outputs."""
    from prefloop.config import SamplingConfig
    from prefloop.sampling import PromptRecord
    from prefloop.workers import sample_prompts

    on_policy = round(cfg.rm_pairs * cfg.rm_on_policy_share)
    pairs = testbed.annotated_pairs(cfg.rm_pairs - on_policy, cfg.seed + 2, annotator)
    if on_policy:
        prompts = [PromptRecord(row["id"], row["prompt"])
                   for row in testbed.prompt_rows(on_policy, cfg.seed + 30)]
        samples = sample_prompts(str(bed.sft), prompts, SamplingConfig(
            num_samples=2, temperature=1.0, max_new_tokens=cfg.max_new_tokens, batch_size=64,
            seed=cfg.seed + 3, record_logprobs=False), progress=progress,
            desc="SFT samples for the reward model")
        pairs += testbed.label_samples(samples, cfg.seed + 4, annotator)
    return pairs


@dataclass
class PromptSets:
    iteration: Path  # prompts_per_iteration × iterations rows, sliced by the loop
    eval: Path

    @classmethod
    def at(cls, directory: Path) -> PromptSets:
        return cls(directory / "prompts.jsonl", directory / "eval_prompts.jsonl")


def write_prompt_sets(cfg: DemoConfig, directory: Path) -> PromptSets:
    """The iteration and eval prompt sets (seeded, disjoint draws from the task)."""
    sets = PromptSets.at(directory)
    write_jsonl(sets.iteration,
                testbed.prompt_rows(cfg.prompts_per_iteration * cfg.iterations, cfg.seed + 10))
    write_jsonl(sets.eval, testbed.prompt_rows(cfg.eval_prompts, cfg.seed + 20))
    return sets


def export_testbed(cfg: DemoConfig, directory: Path, progress: bool = True,
                   echo=print) -> Testbed:
    """`prefloop testbed DIR`: the built testbed copied to DIR, with its prompt sets."""
    if directory.exists() and any(directory.iterdir()):
        raise PrefloopError(f"{directory}: exists and is not empty")
    bed = build_testbed(cfg, progress, echo)
    tmp = directory.with_name(f".{directory.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(bed.directory, tmp, ignore=shutil.ignore_patterns("rm_base"))
    write_prompt_sets(cfg, tmp)
    if directory.exists():
        directory.rmdir()
    tmp.rename(directory)
    return _paths(directory, bed.seconds, bed.cached)


def length_margin(cfg: DemoConfig, loss: dict) -> dict:
    """lr_dpo's α: the run's own (`runs.NAME.alpha` or its length_control), else the demo's
    fixed value, else the demo's `alpha_mode`."""
    if loss["name"] != "lr_dpo" or {"alpha", "auto_alpha", "length_control"} & set(loss):
        return {}
    if cfg.alpha is not None:
        return {"alpha": cfg.alpha, "length_control": {"mode": "fixed"}}
    return {"length_control": {"mode": cfg.alpha_mode}}


def run_config(cfg: DemoConfig, bed: Testbed, prompts: PromptSets, run_dir: Path,
               loss: dict):
    from prefloop.config import from_dict
    from prefloop.loop import RunConfig

    loss = dict(loss)
    pairing = loss.pop("pairing", {})
    run_cfg = from_dict(RunConfig, {
        "name": run_dir.name,
        "pairing": pairing,
        "run_dir": str(run_dir),
        "policy": str(bed.sft),
        "iterations": cfg.iterations,
        "seed": cfg.seed,
        "prompts": {"path": str(prompts.iteration), "id_column": "id",
                    "per_iteration": cfg.prompts_per_iteration},
        "sampling": {"num_samples": cfg.num_samples, "temperature": cfg.temperature,
                     "max_new_tokens": cfg.max_new_tokens, "batch_size": 64,
                     "seed": cfg.seed},
        "reward": {"type": "model", "model": str(bed.reward_model), "batch_size": 64},
        "loss": {"beta": cfg.beta, **length_margin(cfg, loss), **loss},
        "data": {"max_length": 256, "max_prompt_length": 64},
        "training": {"lr": cfg.lr, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                     "warmup_ratio": 0.1,
                     "seed": cfg.seed if cfg.training_seed is None else cfg.training_seed},
        "eval": {"prompts": {"path": str(prompts.eval), "id_column": "id"},
                 "sampling": {"num_samples": cfg.eval_samples,
                              "temperature": cfg.eval_temperature,
                              "max_new_tokens": cfg.max_new_tokens, "batch_size": 64,
                              "seed": cfg.seed + 1},
                 "gold": "prefloop.testbed:gold"},
    })
    if cfg.length_guard and run_cfg.length_guard_applies:
        from prefloop.loop.config import LengthGuardConfig

        run_cfg.length_guard = from_dict(LengthGuardConfig, cfg.length_guard, "length_guard.")
    return run_cfg


@dataclass
class DemoResult:
    testbed: Testbed
    metrics: dict[str, list[dict]]  # run name → one record per iteration (0 = SFT)
    report: Path
    seconds: float

    @cached_property
    def reward_right(self) -> testbed.RightOverWrong:
        """The testbed reward model's `testbed.reward_correctness`, measured on first use
        (the extra trainings of `demo_tables.py --trainings` never ask for it)."""
        return reward_right(self.testbed.reward_model)

    def checks(self) -> list[tuple[str, bool]]:
        """The testbed's checks (on the first run's SFT samples and the reward model),
        then the story's."""
        first_run = self.report.parent / next(iter(self.metrics))
        return (StartingPoint.of(first_run, self.reward_right).checks()
                + Outcome.of(self.metrics).checks())


def run_demo(cfg: DemoConfig, progress: bool = True, echo=print) -> DemoResult:
    """Build (or reuse) the testbed, run every loss in `cfg.runs` from the same SFT policy,
    and write an HTML report overlaying the runs. An interrupted demo resumes."""
    from prefloop.loop import ConfigChanged, run
    from prefloop.report import write_report

    start = time.perf_counter()
    bed = build_testbed(cfg, progress, echo)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = write_prompt_sets(cfg, out)
    metrics = {}
    for name, loss in cfg.runs.items():
        echo(f"\n== {name}: {cfg.iterations} iterations with loss {loss['name']} ==")
        run_cfg = run_config(cfg, bed, prompts, out / name, loss)
        run_cfg.validate()
        with one_torch_thread():
            try:
                metrics[name] = run(run_cfg, resume=True, progress=progress, echo=echo).metrics
            except ConfigChanged:
                raise PrefloopError(
                    f"{out / name}: holds a demo run made with other settings (or an earlier "
                    f"prefloop); give another --out, or delete {out}") from None
    report = write_report([out / name for name in cfg.runs], out / "report.html")
    return DemoResult(bed, metrics, report, time.perf_counter() - start)


COLUMNS = ("", "gold %", "reward", "tokens", "× SFT", "chars", "win rate", "LC win rate", "α")


def comparison_rows(result: DemoResult) -> list[list[str]]:
    """One row per (run, iteration) after the SFT start; columns as in `COLUMNS`."""
    outcome = Outcome.of(result.metrics)
    rows = []
    for name, records in result.metrics.items():
        for m in records:
            if m["iteration"] == 0 and rows:
                continue
            label = "SFT" if m["iteration"] == 0 else f"{name} t={m['iteration']}"
            gold, gold_se = _gold(m)
            tokens, tokens_se = _tokens(m)
            ratio, ratio_se = outcome.ratio(m)
            alpha = "" if m.get("alpha") is None else (
                f"{m['alpha']:.3f}" if m.get("alpha_last") in (None, m["alpha"])
                else f"{m['alpha']:.3f}→{m['alpha_last']:.3f}")
            rows.append([
                label, f"{gold:.1f} ± {gold_se:.1f}", f"{m['mean_reward']:+.2f}",
                f"{tokens:.1f} ± {tokens_se:.1f}", f"{ratio:.2f} ± {ratio_se:.2f}",
                f"{m['mean_chars']:.0f}", f"{m['win_rate']:.1f}", f"{m['lc_win_rate']:.1f}",
                alpha,
            ])
    return rows


@dataclass
class StartingPoint:
    """What the testbed is made of: measured on the SFT policy's eval samples and, when
    the reward model is given, on a fixed right/wrong probe of it."""

    gold: float  # percent
    length_cv: float  # coefficient of variation of the response length in tokens
    # Spearman correlation of reward-model score with length among responses of equal gold
    # quality (correct ones, wrong ones): the proxy reward's length bias
    spearman_correct: float
    spearman_wrong: float
    # Within one prompt: of two of the SFT policy's samples (iteration 1's) that are equally
    # correct and differ in length, the share where the reward model scores the longer one
    # higher (0.5 = no length bias), and how many such pairs there are. Unlike the Spearman
    # above, differences between prompts do not enter.
    longer_preferred: float
    same_gold_pairs: int
    # the reward model's `testbed.reward_correctness` (None when not measured)
    reward_right: testbed.RightOverWrong | None = None

    @classmethod
    def of(cls, run_dir: Path, right: testbed.RightOverWrong | None = None) -> StartingPoint:
        """From a demo run's files, with the reward model's right/wrong probe when given
        (`reward_right`)."""
        from scipy.stats import spearmanr

        from prefloop.data import read_jsonl
        from prefloop.loop.rundir import RunDir

        rows = read_jsonl(RunDir(run_dir).eval_samples(0))
        tokens = np.array([r["num_tokens"] for r in rows], dtype=float)

        def rho(gold: float) -> float:
            group = [r for r in rows if r["gold"] == gold]
            if len(group) < 3:
                return float("nan")
            return float(spearmanr([r["num_tokens"] for r in group],
                                   [r["score"] for r in group])[0])

        scored = RunDir(run_dir).scored(1)
        share, n = longer_preferred(read_jsonl(scored)) if scored.is_file() else (np.nan, 0)
        return cls(gold=100 * float(np.mean([r["gold"] for r in rows])),
                   length_cv=float(tokens.std() / tokens.mean()), spearman_correct=rho(1.0),
                   spearman_wrong=rho(0.0), longer_preferred=share, same_gold_pairs=n,
                   reward_right=right)

    def checks(self) -> list[tuple[str, bool]]:
        return [
            (f"SFT gold accuracy in [20, 80]% ({self.gold:.1f}%)", 20 <= self.gold <= 80),
            (f"SFT length CV ≥ 0.3 ({self.length_cv:.2f})", self.length_cv >= 0.3),
            ("reward–length Spearman ≥ 0.3 at equal gold (correct "
             f"{self.spearman_correct:.2f}, wrong {self.spearman_wrong:.2f})",
             min(self.spearman_correct, self.spearman_wrong) >= 0.3),
        ] + ([] if not self.same_gold_pairs else [
            ("reward prefers the longer of two same-gold answers to one prompt > 50% "
             f"({100 * self.longer_preferred:.0f}% of {self.same_gold_pairs} pairs)",
             self.longer_preferred > 0.5),
        ]) + ([] if self.reward_right is None else [
            ("reward scores the right answer above a wrong one of the same word count in "
             f"≥ 90% of pairs ({100 * self.reward_right.pair_share:.1f}% of "
             f"{self.reward_right.pairs}; above every wrong one in "
             f"{100 * self.reward_right.first_share:.0f}% of {self.reward_right.cases} "
             "question × length cases, not checked)", self.reward_right.pair_share >= 0.9),
        ])


def reward_right(reward_model: Path) -> testbed.RightOverWrong:
    """`testbed.reward_correctness` of a reward model (on one thread, as the demo runs)."""
    from prefloop.rewards import RewardModelScorer

    with one_torch_thread():
        return testbed.reward_correctness(
            RewardModelScorer(str(reward_model), batch_size=64).score)


def longer_preferred(rows: Sequence[dict]) -> tuple[float, int]:
    """(share, count) of same-prompt pairs of scored samples with equal gold correctness and
    different token lengths in which the longer sample has the higher score (a tie counts
    half)."""
    from itertools import combinations

    by_prompt: dict[str, list[tuple[int, float, bool]]] = {}
    gold = testbed.gold([r["prompt"] for r in rows], [r["response"] for r in rows])
    for r, g in zip(rows, gold, strict=True):
        by_prompt.setdefault(r["prompt_id"], []).append((r["num_tokens"], r["score"], g))
    wins = n = 0
    for samples in by_prompt.values():
        for (la, sa, ga), (lb, sb, gb) in combinations(samples, 2):
            if ga != gb or la == lb:
                continue
            n += 1
            wins += 0.5 if sa == sb else float((sa > sb) == (la > lb))
    return (wins / n if n else float("nan")), n


# The story's thresholds (issue: "length that holds"): iDPO at least this much longer than
# SFT at the last iteration; iLR-DPO within this band of SFT's length at every iteration, and
# at least this many gold points over SFT, and no more than this many below iDPO.
IDPO_MIN_GROWTH = 1.4
GOLD_GAIN = 8.0
GOLD_SLACK = 2.0


@dataclass
class Outcome:
    """The demo's claims for one seed, computed from its metrics; every value carries one
    standard error (prompts as the unit) where the metrics have it."""

    sft_gold: tuple[float, float]  # percent, its standard error
    sft_tokens: tuple[float, float]
    runs: dict[str, list[dict]]  # run → metric records of iterations 1..T

    @classmethod
    def of(cls, metrics: dict[str, list[dict]]) -> Outcome:
        first = next(iter(metrics.values()))[0]
        return cls(_gold(first), _tokens(first),
                   {name: [r for r in recs if r["iteration"] > 0] or recs[-1:]
                    for name, recs in metrics.items()})

    @property
    def final(self) -> dict[str, tuple[float, float]]:
        """run → (gold %, mean tokens) after the last iteration."""
        return {name: (_gold(recs[-1])[0], recs[-1]["mean_tokens"])
                for name, recs in self.runs.items()}

    def ratio(self, record: dict) -> tuple[float, float]:
        """A record's mean length over SFT's, with the standard error of the ratio."""
        (a, se_a), (b, se_b) = _tokens(record), self.sft_tokens
        return a / b, a / b * math.hypot(se_a / a, se_b / b)

    def checks(self, plain: str = "idpo", regularised: str = "ilr-dpo") -> list[tuple[str, bool]]:
        """The testbed's story as pass/fail lines: iDPO gets longer, iLR-DPO gets better
        and stays in the length band at every iteration. A line about a run the demo did
        not make (`runs=` without it) is left out."""
        def shown(value_se: tuple[float, float], fmt: str) -> tuple[float, str]:
            value, se = value_se
            return value, f"{value:{fmt}}±{se:{fmt}}"

        growth = ratios = gold_r = gold_p = None
        if plain in self.runs:
            last = self.runs[plain][-1]
            ratio, text = shown(self.ratio(last), ".2f")
            growth, gold_p = (ratio, text + "×"), shown(_gold(last), ".1f")
        if regularised in self.runs:
            with_se = [self.ratio(r) for r in self.runs[regularised]]
            ratios = ([r for r, _ in with_se],
                      ", ".join(shown(x, ".2f")[1] for x in with_se) + "×")
            gold_r = shown(_gold(self.runs[regularised][-1]), ".1f")
        return _claims(plain, regularised, shown(self.sft_gold, ".1f"), growth, ratios,
                       gold_r, gold_p)


def _claims(plain: str, regularised: str, sft_gold: tuple[float, str],
            growth: tuple[float, str] | None, ratios: tuple[list[float], str] | None,
            gold_r: tuple[float, str] | None, gold_p: tuple[float, str] | None,
            mean: str = "", band_scope: str = "", gold_r_values: str = ""
            ) -> list[tuple[str, bool]]:
    """The story's claims as pass/fail lines, each value with the text that shows it: iDPO
    grows by `growth`, iLR-DPO's length `ratios` stay in the band, its gold beats SFT's and
    is not below iDPO's by more than the slack. A claim whose values are None is left out;
    `mean` and `band_scope` name what the values are taken over, and `gold_r_values` (the
    values a mean is of) follows iLR-DPO's gold in its claim against SFT."""
    lines = []
    if growth is not None:
        lines.append((f"{plain} length ≥ {IDPO_MIN_GROWTH}× SFT{mean} ({growth[1]})",
                      growth[0] >= IDPO_MIN_GROWTH))
    if ratios is not None:
        lines.append((f"{regularised} length within ±{LENGTH_BAND:.0%} of SFT at every "
                      f"iteration{band_scope} ({ratios[1]})",
                      all(abs(r - 1) <= LENGTH_BAND for r in ratios[0])))
    if gold_r is not None:
        lines.append((f"{regularised} gold ≥ SFT + {GOLD_GAIN:g}{mean} ({gold_r[1]}"
                      f"{gold_r_values} vs {sft_gold[1]})", gold_r[0] >= sft_gold[0] + GOLD_GAIN))
        if gold_p is not None:
            lines.append((f"{regularised} gold ≥ {plain} − {GOLD_SLACK:g}"
                          f"{mean.replace('mean', 'means')} ({gold_r[1]} vs {gold_p[1]})",
                          gold_r[0] >= gold_p[0] - GOLD_SLACK))
    return lines


def training_seed(seed: int, k: int) -> int:
    """The training seed of seed `seed`'s k-th training of its loops (k = 0: `seed` itself),
    for claims over several trainings (`over_trainings`)."""
    return seed + 1000 * k


def over_trainings(outcomes: Sequence[Outcome], plain: str = "idpo",
                   regularised: str = "ilr-dpo") -> list[tuple[str, bool]]:
    """The story's claims over several trainings of one seed's loops (the same SFT policy,
    reward and prompts; only the training seed differs): iDPO's mean length ratio and both
    runs' mean gold at the last iteration, ± the standard error of the mean over the
    trainings; the length band must hold in every training at every iteration.

    One training's gold moves by several points with the training seed alone (on the
    testbed, over ten trainings of one seed iDPO's at t = 3 ranged over up to 20 points,
    iLR-DPO's over up to 17), far more than the evaluation's standard error of ~1.2, so a
    comparison of two single trainings mostly compares their draws.

    Raises:
        ValueError: with fewer than two outcomes, or one without both runs.
    """
    from prefloop.evaluate import mean_se

    if len(outcomes) < 2:
        raise ValueError("over_trainings: needs ≥ 2 trainings")
    if any({plain, regularised} - set(o.runs) for o in outcomes):
        raise ValueError(f"over_trainings: every outcome needs the runs {plain} and "
                         f"{regularised}")

    def pooled(values: list[float]) -> tuple[float, float, str]:
        return *mean_se(values), ", ".join(f"{v:.1f}" for v in values)

    sft_gold = outcomes[0].sft_gold[0]
    growth, growth_se, _ = pooled([o.ratio(o.runs[plain][-1])[0] for o in outcomes])
    gold_p, se_p, shown_p = pooled([_gold(o.runs[plain][-1])[0] for o in outcomes])
    gold_r, se_r, shown_r = pooled([_gold(o.runs[regularised][-1])[0] for o in outcomes])
    ratios = [o.ratio(r)[0] for o in outcomes for r in o.runs[regularised]]
    return _claims(plain, regularised, (sft_gold, f"{sft_gold:.1f}"),
                   (growth, f"{growth:.2f}±{growth_se:.2f}×"),
                   (ratios, f"{min(ratios):.2f}–{max(ratios):.2f}×"),
                   (gold_r, f"{gold_r:.1f}±{se_r:.1f}"),
                   (gold_p, f"{gold_p:.1f}±{se_p:.1f} [{shown_p}]"),
                   mean=f", mean of {len(outcomes)} trainings", band_scope=" of every training",
                   gold_r_values=f" [{shown_r}]")


def _gold(record: dict) -> tuple[float, float]:
    return 100 * record["gold_accuracy"], 100 * (record.get("gold_accuracy_se") or 0.0)


def _tokens(record: dict) -> tuple[float, float]:
    return record["mean_tokens"], record.get("mean_tokens_se") or 0.0


def run_seeds(cfg: DemoConfig, seeds: Sequence[int], progress: bool = True,
              echo=print) -> list[DemoResult]:
    """The demo once per seed (testbed, prompts and sampling all reseeded), each in
    `out_dir/seed-S` when there are several seeds."""
    results = []
    for seed in seeds:
        out = Path(cfg.out_dir) / f"seed-{seed}" if len(seeds) > 1 else Path(cfg.out_dir)
        if len(seeds) > 1:
            echo(f"\n######## seed {seed} ########")
        results.append(run_demo(replace(cfg, seed=seed, out_dir=str(out)), progress, echo))
    return results
