"""`prefloop run`'s configuration: RunConfig and its sections, one `validate()` for the whole
run (every section, then what the sections require of each other), and loading a config
from a YAML file or a run directory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

from prefloop.alignment_tax import TaxConfig
from prefloop.config import (
    DataConfig,
    LossConfig,
    RewardConfig,
    SamplingConfig,
    TrainingConfig,
    check_choice,
)
from prefloop.errors import PrefloopError
from prefloop.judge_config import JudgeConfig
from prefloop.methods import METHOD_LOSSES, METHODS, describe_fields, method
from prefloop.pairing import PairingConfig
from prefloop.prompts import PromptsConfig

REFERENCES = ("previous", "initial")  # π_{t−1} (the paper) or π₀ as iteration t's reference
LC_FITS = ("glm", "alpacaeval")


@dataclass
class EvalConfig:
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(
        default_factory=lambda: SamplingConfig(num_samples=1, temperature=0.0)
    )
    gold: str = ""  # optional "module:function" → per-response correctness in [0, 1]
    lc_fit: str = "glm"  # glm | alpacaeval
    reward: RewardConfig | None = None  # the judge of evaluation; default: the run's reward
    # an LLM judge through an OpenAI-compatible server, besides the reward (prefloop.judge)
    judge: JudgeConfig | None = None
    # what the LLM judge compares each policy with: "" = π₀'s eval answers, or a file of
    # reference answers (alpaca_eval outputs .json, or a responses .jsonl with prompt_id)
    judge_baseline: str = ""

    def validate(self, key: str = "eval") -> None:
        """Its own sections; whether a reward is there to judge is the run's to check."""
        if self.prompts.path:
            self.prompts.validate(f"{key}.prompts")
        self.sampling.validate(f"{key}.sampling")
        if self.reward is not None:
            self.reward.validate(f"{key}.reward")
        check_choice(f"{key}.lc_fit", self.lc_fit, LC_FITS)
        if self.judge is not None:
            if not self.prompts.path:
                raise PrefloopError(f"{key}.judge: needs {key}.prompts.path (the judge "
                                    "compares answers to the eval prompts)")
            self.judge.validate(f"{key}.judge")
        if self.judge_baseline:
            if self.judge is None:
                raise PrefloopError(f"{key}.judge_baseline: set without {key}.judge")
            if not self.judge_baseline.endswith((".json", ".jsonl")):
                raise PrefloopError(f"{key}.judge_baseline: {self.judge_baseline} is not "
                                    "an alpaca_eval outputs .json or a responses .jsonl")


@dataclass
class LengthGuardConfig:
    """`length_guard`: lr_dpo's target mode (holding π₀'s length) checked on measured
    length. After training π_t the loop samples it on `prompts` of the run's prompts
    (`samples` each, the run's sampling settings; a fixed, seeded set, π₀ sampled on it
    once); when its mean length is more than `band` off π₀'s there, π_t is trained again
    from the same pairs with more (or less) α, at most `attempts` trainings in all, and the
    closest is kept (prefloop.length_control, "the length guard")."""

    attempts: int = 3  # trainings of one iteration at most; 1 = measure only; 0 = off
    band: float = 0.05  # accepted |L̄_probe(π_t) / L̄_probe(π₀) − 1|
    prompts: int = 256
    samples: int = 4  # per probe prompt

    def validate(self, key: str = "length_guard") -> None:
        if self.attempts < 0:
            raise PrefloopError(f"{key}.attempts: must be ≥ 0 (0 = off), got {self.attempts}")
        if not 0 < self.band < 1:
            raise PrefloopError(f"{key}.band: must be in (0, 1), got {self.band}")
        for name in ("prompts", "samples"):
            if getattr(self, name) < 1:
                raise PrefloopError(f"{key}.{name}: must be ≥ 1, got {getattr(self, name)}")


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
    # lm-evaluation-harness on chosen iterations' policies (off while `tasks` is empty)
    alignment_tax: TaxConfig = field(default_factory=TaxConfig)
    # lr_dpo's held length checked by sampling (applies to length_control.mode target
    # holding π₀'s length; inactive otherwise)
    length_guard: LengthGuardConfig = field(default_factory=LengthGuardConfig)

    @property
    def directory(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    @property
    def length_guard_applies(self) -> bool:
        """The guard holds π₀'s length: lr_dpo's target mode without a user-given target
        (which is approached over iterations, not held)."""
        return (self.loss.alpha_mode == "target"
                and not self.loss.length_control.target)

    @property
    def guarded(self) -> bool:
        return self.length_guard_applies and self.length_guard.attempts > 0

    def validate(self) -> None:
        """Every section, then the method's needs (an option that does not apply raises)."""
        if not self.policy:
            raise PrefloopError("policy: required (a hub id or a local model directory)")
        self.prompts.validate("prompts")
        if self.iterations < 1:
            raise PrefloopError(f"iterations: must be ≥ 1, got {self.iterations}")
        check_choice("reference", self.reference, REFERENCES)
        if self.data.path:
            raise PrefloopError("data.path: not used by the loop (pairs come from sampling); "
                                "set prompts.path instead")
        for key in ("split", "prompt_column", "chosen_column", "rejected_column"):
            if getattr(self.data, key) != getattr(DataConfig, key):
                raise PrefloopError(f"data.{key}: not used by the loop (it writes its own "
                                    "pairs); only data.max_length, data.max_prompt_length and "
                                    "data.truncation apply")
        self.data.validate("data")
        self.training.validate("training")
        self.loss.validate("loss")
        self.sampling.validate("sampling")
        self.reward.validate("reward")
        self.pairing.validate("pairing")
        self.eval.validate("eval")
        if self.pairing.replay_fraction > 0 and not self.replay_data:
            raise PrefloopError("replay_data: required when pairing.replay_fraction > 0")
        self._validate_alignment_tax()
        self._validate_length_guard()
        self._validate_method()

    def _validate_length_guard(self) -> None:
        self.length_guard.validate("length_guard")
        if self.length_guard_applies:
            return
        default = LengthGuardConfig()
        changed = [f.name for f in fields(default)
                   if getattr(self.length_guard, f.name) != getattr(default, f.name)]
        if changed and self.length_guard.attempts != 0:  # saying "off" is always fine
            why = ("a user-given loss.length_control.target is approached over iterations, "
                   "not held" if self.loss.alpha_mode == "target" else
                   f"loss {self.loss.name} with α mode {self.loss.alpha_mode!r} holds no "
                   "length (the guard checks lr_dpo's length_control.mode target)")
            raise PrefloopError(f"length_guard.{changed[0]}: does not apply: {why}")

    def _validate_alignment_tax(self) -> None:
        tax = self.alignment_tax
        if tax.tasks:
            tax.validate("alignment_tax")
            if isinstance(tax.iterations, list) and max(tax.iterations) > self.iterations:
                raise PrefloopError(f"alignment_tax.iterations: {max(tax.iterations)} is past "
                                    f"the run's last iteration ({self.iterations})")
            return
        changed = [f.name for f in fields(TaxConfig)
                   if getattr(tax, f.name) != getattr(TaxConfig(), f.name)]
        if changed:
            raise PrefloopError(f"alignment_tax.{changed[0]}: set without alignment_tax.tasks "
                                "(the step runs only with tasks)")

    def _validate_method(self) -> None:
        """What the pairing strategy's method (prefloop.methods) requires of the others."""
        strategy, loss = self.pairing.strategy, self.loss.name
        m = method(strategy)
        if self.sampling.num_samples < m.min_samples:
            raise PrefloopError(f"sampling.num_samples: pairing.strategy {strategy} needs at "
                                f"least {m.min_samples} per prompt")
        if m.targets and not self.prompts.target_column:
            raise PrefloopError(f"prompts.target_column: pairing.strategy {strategy} needs the "
                                "SFT target of every prompt (e.g. completion)")
        if self.prompts.target_column and not m.targets:
            users = [s for s, x in METHODS.items() if x.targets]
            raise PrefloopError(f"prompts.target_column: only pairing.strategy "
                                f"{', '.join(users)} uses targets")
        if self.reward.type == "none" and m.scored:
            raise PrefloopError(f"reward.type: none leaves nothing to score; pairing.strategy "
                                f"{strategy} needs a reward")
        eval_reward = self.eval.reward or self.reward
        if self.eval.prompts.path and eval_reward.type == "none":
            raise PrefloopError("eval.reward: evaluation needs a reward model or function "
                                "(set eval.reward, or leave eval.prompts.path empty)")
        owner = METHOD_LOSSES.get(loss)
        if owner is not None and owner.strategy != strategy:
            raise PrefloopError(f"loss.name: {loss} reads what pairing.strategy "
                                f"{owner.strategy} writes; set pairing.strategy: "
                                f"{owner.strategy}")
        if m.loss and loss != m.loss:
            raise PrefloopError(f"pairing.strategy: {strategy} writes {describe_fields(m)} that "
                                f"loss {loss!r} ignores; use best_vs_worst, or loss.name: "
                                f"{m.loss}")
        if m.pair_fields and self.pairing.replay_fraction > 0:
            raise PrefloopError(f"pairing.replay_fraction: replayed pairs carry no "
                                f"{describe_fields(m)} for loss {loss}; set it to 0")
        if self.reward.type == "implicit" and self.reward.model != self.policy:
            raise PrefloopError("reward.model: the loop's implicit reward (DICE) is the policy's "
                                f"own; set reward.model to policy ({self.policy})")


def load_run_config(path: str | None, overrides: Sequence[str] = ()) -> RunConfig:
    """A run config from a YAML file, or from a run directory (its recorded config.yaml,
    with run_dir set to that directory), plus dotted overrides."""
    from prefloop.config import load_config

    if path is not None and Path(path).is_dir():
        if not (Path(path) / "config.yaml").is_file():
            raise PrefloopError(f"{path}: a directory without config.yaml is not a prefloop "
                                "run directory")
        from prefloop.loop.rundir import legacy_overrides

        recorded = Path(path) / "config.yaml"
        return load_config(RunConfig, recorded,
                           [f"run_dir={path}", *legacy_overrides(recorded), *overrides])
    return load_config(RunConfig, path, list(overrides))


def check_functions(cfg: RunConfig) -> None:
    """Import the run's Python functions (rewards, gold) so that a wrong name fails now."""
    from prefloop.rewards import import_function

    for key, reward in (("reward", cfg.reward), ("eval.reward", cfg.eval.reward)):
        if reward is not None and reward.type == "function":
            import_function(reward.function, f"{key}.function")
    if cfg.eval.gold:
        import_function(cfg.eval.gold, "eval.gold")


# files of which a model directory's tokenizer needs at least one
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "vocab.txt", "spiece.model")


def check_inputs(cfg: RunConfig) -> None:
    """What the stages will read, checked before any is run (and by --dry-run): the judge's
    reference answers, the alignment-tax task names, and a local policy's tokenizer."""
    path = cfg.eval.judge_baseline
    if path and not Path(path).is_file():
        raise PrefloopError(f"eval.judge_baseline: {path}: file not found")
    if cfg.alignment_tax.tasks:
        from prefloop.alignment_tax import check_tasks, task_manager

        check_tasks(cfg.alignment_tax.tasks, task_manager(cfg.alignment_tax.include_path))
    policy = Path(cfg.policy).expanduser()
    # the files, not the tokenizer: loading transformers here would slow every start
    if policy.is_dir() and not any((policy / f).is_file() for f in TOKENIZER_FILES):
        raise PrefloopError(f"policy: {policy} has no tokenizer files ({', '.join(TOKENIZER_FILES)}"
                            "); save the tokenizer with the model (tokenizer.save_pretrained)")
