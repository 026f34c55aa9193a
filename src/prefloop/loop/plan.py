"""`prefloop run --dry-run`: what a run would do, checked without loading any model."""

from __future__ import annotations

from pathlib import Path

from prefloop.config import RewardConfig
from prefloop.errors import PrefloopError
from prefloop.loop.config import RunConfig, check_functions, check_inputs
from prefloop.loop.rundir import STAGES, RunDir, check_open
from prefloop.methods import method
from prefloop.prompts import iteration_prompts, load_prompts


def plan(cfg: RunConfig, resume: bool = False, redo_from: str | None = None,
         overwrite: bool = False) -> list[tuple[str, str]]:
    """What `prefloop run` would do, checked without loading or downloading any model: what
    the run would refuse (the config, its files and functions, the run directory's state
    for these flags) is refused here."""
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
    check_inputs(cfg)
    what = check_open(RunDir(cfg.directory, cfg.policy), cfg, resume, redo_from, overwrite)
    m = method(cfg.pairing.strategy)
    mode = cfg.loss.alpha_mode
    params = ", ".join([f"{k}={v}" for k, v in cfg.loss.params.items()]
                       + ([f"alpha={mode}"] if mode not in ("none", "fixed") else []))
    per_iter = cfg.prompts.per_iteration or "all"
    extra = (f" + {m.reference_samples} from the reference ({m.strategy})"
             if m.reference_samples else "")
    stages = [s for s in STAGES if (s != "score" or m.scored) and s != "alignment_tax"]
    return [
        ("run directory", f"{cfg.directory} ({OPENING[what]})"),
        ("policy π₀", cfg.policy),
        ("method", m.name),
        ("reward", _describe_reward(cfg.reward)),
        ("loss", f"{cfg.loss.name}({params})"),
        ("reference", f"{cfg.reference} policy"),
        ("iterations", str(cfg.iterations)),
        ("prompts per iteration", f"{per_iter} from {cfg.prompts.path}"),
        ("samples per prompt", f"{cfg.sampling.num_samples}{extra} (temperature "
                               f"{cfg.sampling.temperature}, ≤ {cfg.sampling.max_new_tokens} "
                               "new tokens)"),
        ("pairing", _describe_pairing(cfg)),
        ("eval prompts", cfg.eval.prompts.path or "none"),
        ("eval reward", _describe_reward(eval_reward) if cfg.eval.prompts.path else "none"),
        ("stages", " → ".join(stages) + f" × {cfg.iterations}"),
        ("length guard", _describe_guard(cfg)),
        ("LLM judge", _describe_judge(cfg)),
        ("alignment tax", _describe_tax(cfg)),
    ]


OPENING = {"start": "new", "continue": "resumed", "complete": "finished: nothing to do",
           "extend": "extended", "redo": "redone from the given stage"}


def _describe_guard(cfg: RunConfig) -> str:
    g = cfg.length_guard
    if not cfg.length_guard_applies:
        return "does not apply (lr_dpo holding π₀'s length only)"
    if not cfg.guarded:
        return "off (length_guard.attempts=0)"
    if g.attempts == 1:
        return (f"π_t's length on {g.prompts} prompts × {g.samples} samples measured against "
                "π₀'s, never retrained (length_guard.attempts=1)")
    return (f"π_t's length on {g.prompts} prompts × {g.samples} samples within "
            f"±{100 * g.band:g}% of π₀'s, ≤ {g.attempts} trainings per iteration")


def _describe_judge(cfg: RunConfig) -> str:
    judge = cfg.eval.judge
    if judge is None:
        return "none (eval.judge)"
    against = cfg.eval.judge_baseline or "π₀'s eval answers"
    return f"{judge.model} at {judge.resolved_base_url() or 'api.openai.com'}, against {against}"


def _describe_tax(cfg: RunConfig) -> str:
    tax = cfg.alignment_tax
    if not tax.tasks:
        return "off (alignment_tax.tasks)"
    which = {"last": f"iteration {cfg.iterations}", "all": "every iteration"}.get(
        tax.iterations if isinstance(tax.iterations, str) else "",
        f"iterations {', '.join(map(str, tax.iterations))}")
    return f"lm_eval {', '.join(tax.tasks)} on π₀ and {which}"


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".jsonl", ".json", ".parquet")


def _describe_reward(reward: RewardConfig) -> str:
    if reward.type == "implicit":
        return (f"implicit β·(log π_t−1 − log π_ref), β={reward.beta} "
                f"(iteration 1: {reward.model} vs {reward.reference})")
    return reward.model or reward.function or reward.type


def _describe_pairing(cfg: RunConfig) -> str:
    p, m = cfg.pairing, method(cfg.pairing.strategy)
    if not m.scored:
        return f"{p.strategy}: target ({cfg.prompts.target_column}) vs each sample, no scores"
    text = f"{p.strategy}, length penalty {p.length_penalty}, replay {p.replay_fraction}"
    if "win_probabilities" in m.pair_fields:
        text += f", {p.win_probability} win probabilities"
    if p.rejection_sampling.enabled:
        rso = p.rejection_sampling
        text += f", rejection sampling β={rso.beta} keeps {rso.num_accepted}"
    return text
