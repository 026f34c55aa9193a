"""The loop's stages: sample, score, pair, train, evaluate. Each reads the previous stage's
artifact, writes its own (main process only, atomically) and returns what the manifest
records. What a method needs comes from its row in `prefloop.methods`; no stage compares
method names.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

from prefloop import io
from prefloop.config import (
    DataConfig,
    RefineConfig,
    RewardConfig,
    SamplingConfig,
    TrainConfig,
    TrainingConfig,
    from_dict,
    to_dict,
)
from prefloop.data import load_rows, read_jsonl
from prefloop.errors import PrefloopError
from prefloop.loop.context import Context
from prefloop.loop.metrics import evaluate_iteration, format_metrics_row
from prefloop.loop.rundir import RunDir, stage_key
from prefloop.methods import method
from prefloop.pairing import LENGTH_UNITS, PairingConfig
from prefloop.sampling import PromptRecord
from prefloop.workers import sample_prompts, score_rows

# The reference's samples draw from their own seed stream: policy samples of iteration t use
# sampling.seed + 1000·t, the reference's sampling.seed + 1000·t + REFERENCE_SEED_OFFSET.
REFERENCE_SEED_OFFSET = 500


# ---------------------------------------------------------------- sample


def sample(ctx: Context, t: int, prompts: list[PromptRecord]) -> dict:
    """K samples per prompt from π_{t−1}; a method that needs them adds the reference's
    samples and the SFT targets. Every row says which model drew it (``source``)."""
    cfg, run = ctx.cfg, ctx.run
    m = method(cfg.pairing.strategy)
    sampling = replace(cfg.sampling, seed=cfg.sampling.seed + 1000 * t)
    # self-refinement that selects by reward is judged by the run's reward (never the eval's)
    by_reward = sampling.refine.rounds > 0 and sampling.refine.select == "reward"
    rows = sample_prompts(run.policy_path(t - 1), prompts, sampling, ctx.procs,
                          cfg.trust_remote_code, ctx.progress, f"iter {t} sample",
                          reward=cfg.reward if by_reward else None)
    reference_rows = []
    if m.reference_samples:
        reference_rows = sample_prompts(
            run.reference_path(t, cfg.reference), prompts,
            reference_sampling(sampling, m.reference_samples), ctx.procs,
            cfg.trust_remote_code, ctx.progress, f"iter {t} sample reference")
    rows = merge_reference_samples(rows, reference_rows)
    if m.targets:
        from prefloop.models import load_tokenizer

        attach_targets(rows, ctx.targets,
                       load_tokenizer(run.policy_path(t - 1), cfg.trust_remote_code))
    if ctx.procs.is_main:
        io.write_jsonl(run.samples(t), rows)
    info = {"rows": len(rows), "prompts": len(prompts)}
    if reference_rows:
        info.update(reference_rows=len(reference_rows),
                    reference=run.reference_path(t, cfg.reference))
    return info


def reference_sampling(sampling: SamplingConfig, count: int) -> SamplingConfig:
    """The config of the reference's draw (XPO's ỹ): `count` plain samples per prompt (no
    self-refinement), on their own seed stream."""
    return replace(sampling, num_samples=count, seed=sampling.seed + REFERENCE_SEED_OFFSET,
                   refine=RefineConfig())


def merge_reference_samples(policy_rows: list[dict], reference_rows: list[dict]) -> list[dict]:
    """Policy samples then, per prompt, the reference's, tagged ``source`` policy|reference.

    Reference samples are renumbered after the policy's (``sample_index`` K, K+1, …) so
    each (prompt_id, sample_index) stays unique; rows keep the prompt order.
    """
    count: dict[str, int] = {}
    for row in policy_rows:
        row["source"] = "policy"
        count[row["prompt_id"]] = count.get(row["prompt_id"], 0) + 1
    by_prompt: dict[str, list[dict]] = {}
    for row in reference_rows:
        pid = row["prompt_id"]
        row["source"] = "reference"
        row["sample_index"] = count.get(pid, 0)
        count[pid] = row["sample_index"] + 1
        by_prompt.setdefault(pid, []).append(row)
    out: list[dict] = []
    for i, row in enumerate(policy_rows):
        out.append(row)
        last = i + 1 == len(policy_rows) or policy_rows[i + 1]["prompt_id"] != row["prompt_id"]
        if last:
            out += by_prompt.pop(row["prompt_id"], [])
    for rows in by_prompt.values():  # prompts the policy gave no sample (none in practice)
        out += rows
    return out


def attach_targets(rows: list[dict], targets: dict[str, str], tokenizer) -> None:
    """Give every sample row its prompt's SFT target: ``target``, ``target_ids`` (the
    response tokens, EOS included, exactly as training tokenises a response) and
    ``target_chars``. SPIN pairs the target (y_w) with the sample (y_l)."""
    from prefloop.data import render_prompt_response

    texts: dict[str, str] = {}  # prompt id → the rendered target, one per prompt
    for row in rows:
        pid = row["prompt_id"]
        if pid not in targets:
            raise PrefloopError(f"prompt {pid!r}: no SFT target (prompts.target_column)")
        if pid not in texts:
            texts[pid] = render_prompt_response(tokenizer, row["prompt"], targets[pid])[1]
    # one batched tokenizer call for every prompt's target
    ids = tokenizer(list(texts.values()), add_special_tokens=False)["input_ids"] if texts else []
    encoded = dict(zip(texts, ids, strict=True))
    for row in rows:
        pid = row["prompt_id"]
        row["target"] = targets[pid]
        row["target_ids"] = encoded[pid]
        row["target_chars"] = len(targets[pid])


# ---------------------------------------------------------------- score


def score(ctx: Context, t: int) -> dict:
    cfg, run = ctx.cfg, ctx.run
    reward = iteration_reward(cfg.reward, t, run, cfg.reference)
    rows = read_jsonl(run.samples(t))
    scores = score_rows(rows, reward, ctx.procs, cfg.trust_remote_code, ctx.progress,
                        f"iter {t} score", source=str(run.samples(t)), scorers=ctx.scorers)
    if ctx.procs.is_main:
        io.write_jsonl(run.scored(t),
                       [{**r, "score": s} for r, s in zip(rows, scores, strict=True)])
    info: dict = {"rows": len(rows)}
    if reward.type == "implicit":
        info["implicit_reward"] = {"model": reward.model, "reference": reward.reference}
    return info


def iteration_reward(reward: RewardConfig, t: int, run: RunDir, reference: str) -> RewardConfig:
    """The scorer of iteration t. For ``type: implicit`` (DICE) it is the implicit reward
    ``β·(log π_{t−1}(y|x) − log π_ref,t−1(y|x))`` of the policy that samples, against the
    reference it was trained with: iteration 1 uses the configured ``reward.reference``
    (π₀'s own DPO reference); later ones the reference of iteration t−1 (π_{t−2} for
    ``reference: previous``, π₀ for ``initial``). Other reward types are returned as is.
    """
    if reward.type != "implicit":
        return reward
    ref = reward.reference if t == 1 else run.reference_path(t - 1, reference)
    return replace(reward, model=run.policy_path(t - 1), reference=ref)


# ---------------------------------------------------------------- pair


def pair(ctx: Context, t: int) -> dict:
    from prefloop.pairing import make_pairs

    cfg, run = ctx.cfg, ctx.run
    source = run.scored(t) if method(cfg.pairing.strategy).scored else run.samples(t)
    rows = read_jsonl(source)
    replay = load_rows(cfg.replay_data) if cfg.replay_data else []
    pairing = PairingConfig(**{**vars(cfg.pairing), "seed": cfg.pairing.seed + t})
    pairs, stats = make_pairs(rows, pairing, replay, source=str(source),
                              replay_source=cfg.replay_data)
    if not pairs:
        raise PrefloopError(f"{source}: no pairs (all {stats.prompts} prompts tied or below "
                            "the margin); raise sampling.temperature or num_samples")
    if ctx.procs.is_main:
        io.write_jsonl(run.pairs(t), pairs)
        rso = (f", rejection sampling kept {stats.rso_accepted} of "
               f"{stats.rso_accepted + stats.rso_rejected}"
               if pairing.rejection_sampling.enabled else "")
        ctx.echo(f"iter {t}: {stats.pairs} pairs from {stats.prompts} prompts, "
                 f"{stats.ties_dropped} ties dropped{rso}, length gap "
                 f"{stats.mean_length_gap:+.1f} {pairing.length_unit}"
                 + ("" if math.isnan(stats.neutral_alpha) else
                    f" (length-neutral α {stats.neutral_alpha:.3g})"))
    return {"pairing": stats.as_dict()}


# ---------------------------------------------------------------- train


def train(ctx: Context, t: int) -> dict:
    """π_t from π_{t−1} on iteration t's pairs; under the length guard (`length_guard`), as
    many trainings as it takes to bring π_t's measured length into its band (or the
    closest of `length_guard.attempts`)."""
    from prefloop.data import pairs_from_rows
    from prefloop.models import load_tokenizer
    from prefloop.trainer import train_preferences

    cfg, run = ctx.cfg, ctx.run
    rows = read_jsonl(run.pairs(t))
    start = run.policy_path(t - 1)
    tok = load_tokenizer(start, cfg.trust_remote_code)
    d = cfg.data
    pairs, stats = pairs_from_rows(rows, tok, d.max_length, d.max_prompt_length,
                                   d.truncation, str(run.pairs(t)))
    # the sampler's log-probs are π_{t−1}'s: the reference's when it is π_{t−1}; vLLM's come
    # from other kernels (bf16 on GPUs), so with it one no-grad pass instead
    sampled_by_reference = cfg.reference == "previous" or t == 1
    train_cfg = TrainConfig(
        model=start,
        reference="" if sampled_by_reference else run.policy_path(0),
        reuse_sampling_logps=sampled_by_reference and cfg.sampling.backend == "hf",
        output_dir=str(run.policy(t)),
        trust_remote_code=cfg.trust_remote_code,
        data=DataConfig(**{**vars(d), "path": str(run.pairs(t))}),
        loss=cfg.loss,
        training=from_dict(TrainingConfig, {**to_dict(cfg.training),
                                            "seed": cfg.training.seed + t}),
    )
    goal = length_goal(ctx, t) if cfg.loss.alpha_mode == "target" else None
    guard_info: dict = {}
    if cfg.guarded:
        result, guard_info = guarded_training(ctx, t, train_cfg, pairs, goal)
    else:
        result = train_preferences(train_cfg, pairs=pairs, progress=ctx.progress,
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
        if not guard_info:
            ctx.echo(f"iter {t}: " + _describe_alpha(lc, cfg.loss.length_unit, goal))
    if guard_info:
        info["length_guard"] = guard_info
    return info


# ---------------------------------------------------------------- the length guard

# The probe's samples draw from their own seed stream, the same for every policy (so that
# π_t's and π₀'s probes are drawn alike): sampling.seed + PROBE_SEED_OFFSET.
PROBE_SEED_OFFSET = 250


def probe_prompts(prompts: list[PromptRecord], count: int, seed: int,
                  recorded: list[str] = ()) -> list[PromptRecord]:
    """The length guard's probe: `count` of the run's prompts (all when there are fewer),
    drawn with `seed`, in the prompts' order. Once drawn it stays fixed: `recorded` (the
    prompt ids of π₀'s probe on disk) is kept while it has `count` prompts that are all
    still there, so that a run extended over a grown prompt file keeps its probe."""
    import random

    by_id = {p.prompt_id: p for p in prompts}
    if recorded and len(recorded) == count and all(i in by_id for i in recorded):
        return [by_id[i] for i in recorded]
    if count >= len(prompts):
        return list(prompts)
    keep = sorted(random.Random(seed).sample(range(len(prompts)), count))
    return [prompts[i] for i in keep]


def recorded_probe_ids(run: RunDir) -> list[str]:
    """The prompt ids of π₀'s probe on disk, in order (none before the first guarded
    iteration)."""
    path = run.length_probe(0)
    ids = [r["prompt_id"] for r in read_jsonl(path)] if path.is_file() else []
    return list(dict.fromkeys(ids))


def probe_sampling(cfg) -> SamplingConfig:
    """The probe's sampling: the run's settings without self-refinement (π₀'s probe is
    plain sampling too), `length_guard.samples` per prompt (at most `num_beams` under beam
    search), one seed for every policy."""
    samples = cfg.length_guard.samples
    if cfg.sampling.num_beams > 1:
        samples = min(samples, cfg.sampling.num_beams)
    return replace(cfg.sampling, num_samples=samples, refine=RefineConfig(),
                   seed=cfg.sampling.seed + PROBE_SEED_OFFSET)


def probe(ctx: Context, policy: str | Path, desc: str) -> list[dict]:
    """The probe's samples from `policy`."""
    return sample_prompts(str(policy), ctx.probe_prompts, probe_sampling(ctx.cfg), ctx.procs,
                          ctx.cfg.trust_remote_code, ctx.progress, desc)


def mean_length(rows: list[dict], unit: str) -> float:
    """The sample rows' mean length in `unit` (tokens | chars); 0 without rows."""
    key = LENGTH_UNITS[unit]
    return sum(r[key] for r in rows) / len(rows) if rows else 0.0


def probe_length(rows: list[dict], unit: str, what: str) -> float:
    """The probe's mean length (> 0, else a PrefloopError naming `what`)."""
    mean = mean_length(rows, unit)
    if mean <= 0:
        raise PrefloopError(f"length_guard: {what}'s answers on the probe are empty (mean "
                            f"length 0 {unit}); no length to compare")
    return mean


def initial_probe_length(ctx: Context) -> float:
    """π₀'s mean length on the probe: sampled once into iter_0/length_probe.jsonl, every
    row stamped with the settings it was drawn with (π₀, the probe's sampling and prompts),
    and sampled again when those change (a redo with other settings)."""
    import hashlib
    import json

    cfg, run = ctx.cfg, ctx.run
    path = run.length_probe(0)
    settings = hashlib.sha256(json.dumps(
        {"policy": cfg.policy, "sampling": to_dict(probe_sampling(cfg)),
         "prompts": [p.prompt_id for p in ctx.probe_prompts]}, sort_keys=True,
        default=str).encode()).hexdigest()[:16]
    rows = read_jsonl(path) if path.is_file() else []
    if not rows or any(r.get("settings") != settings for r in rows):
        rows = [{**r, "settings": settings}
                for r in probe(ctx, run.policy_path(0), "π₀ length probe")]
        if ctx.procs.is_main:
            io.write_jsonl(path, rows)
        ctx.procs.barrier()
    return probe_length(rows, cfg.loss.length_unit, "π₀")


def guarded_training(ctx: Context, t: int, train_cfg: TrainConfig, pairs: list,
                     goal) -> tuple:
    """Train π_t into iter_t/policy, measure its length on the probe, and train again with
    α's scale moved (`length_control.next_scale`) while it is outside the band; keep the
    attempt in the band, else the closest to π₀'s length. Earlier attempts wait in
    iter_t/.policy.attempts/ (removed once one is kept, and before a resume of an
    interrupted stage, which trains them again); every attempt's probe goes into
    iter_t/length_probe.jsonl. A retry that fails (a non-finite loss at a larger α, say)
    ends the search with the attempts before it. Returns the kept attempt's TrainResult
    and what the manifest records."""
    import shutil

    from prefloop.length_control import kept_attempt, next_scale
    from prefloop.trainer import train_preferences

    cfg, run = ctx.cfg, ctx.run
    guard, unit = cfg.length_guard, cfg.loss.length_unit
    initial = initial_probe_length(ctx)
    previous = ctx.manifest.stage(stage_key(t - 1, "train")).get("length_guard", {}) \
        if t > 1 else {}
    scale = float(previous.get("scale", 1.0))
    # an interrupted stage's attempts were cleared before it ran (RunDir.stage_extras)
    policy, attempts_dir = run.policy(t), run.policy_attempts(t)
    tried: list[dict] = []
    results, probe_rows, failed, stopped = [], [], None, None
    for a in range(guard.attempts):
        if a:  # the previous attempt waits aside while this one trains into iter_t/policy
            if ctx.procs.is_main:
                attempts_dir.mkdir(exist_ok=True)
                policy.rename(attempts_dir / str(a - 1))
            ctx.procs.barrier()
        try:
            result = train_preferences(train_cfg, pairs=pairs, progress=ctx.progress,
                                       length_goal=replace(goal, scale=scale))
            probe_start = time.perf_counter()
            rows = probe(ctx, policy, f"iter {t} length probe")
            length = probe_length(rows, unit, f"π_{t}")
        except PrefloopError as e:
            if not a:
                raise
            failed = {"scale": scale, "error": str(e)}
            ctx.echo(f"iter {t}: training again with α scale {scale:.3g} failed ({e}); "
                     "keeping the closest of the trainings before it")
            break
        lc = result.length_control
        tried.append({"scale": scale, "length": length, "ratio": length / initial,
                      "alpha_first": lc["alpha_first"], "alpha_mean": lc["alpha_mean"],
                      "train_seconds": round(result.seconds, 3),
                      "probe_seconds": round(time.perf_counter() - probe_start, 3)})
        results.append(result)
        probe_rows += [{**r, "attempt": a} for r in rows]
        band = f"±{100 * guard.band:g}%"
        text = (f"iter {t}: " + _describe_alpha(lc, unit, goal) + f"; probe {length:.1f} "
                f"{unit} = ×{length / initial:.3f} π₀'s ({initial:.1f})")
        if abs(length / initial - 1) <= guard.band:
            ctx.echo(f"{text}, within {band}")
            break
        if a + 1 == guard.attempts:
            ctx.echo(f"{text}, outside {band} after {guard.attempts} trainings: keeping the "
                     "closest")
            break
        if lc["root_max"] == 0:
            # s enters α = max(0, s·c·root + λ) only through root (and λ's floor −s·c·root):
            # with the root 0 at every step (winners no longer than losers on the balance,
            # e.g. pairs shaped by pairing.length_penalty) no scale trains anything else
            stopped = "root_zero"
            ctx.echo(f"{text}, outside {band}, but the length-neutral root was 0 at every "
                     "step, so α's scale cannot move the length: keeping this training")
            break
        scale = next_scale([(x["scale"], x["ratio"]) for x in tried])
        ctx.echo(f"{text}, outside {band}: training again with α scale {scale:.3g}")
    kept = kept_attempt([x["ratio"] for x in tried], guard.band)
    if ctx.procs.is_main:
        io.write_jsonl(run.length_probe(t), probe_rows)
        in_place = len(tried) - 1 if failed is None else None  # the one in iter_t/policy
        if kept != in_place:
            if policy.exists():
                shutil.rmtree(policy)
            (attempts_dir / str(kept)).rename(policy)
        if attempts_dir.exists():
            shutil.rmtree(attempts_dir)
    ctx.procs.barrier()
    info = {"band": guard.band, "initial_length": initial, "attempts": tried, "kept": kept,
            **{k: tried[kept][k] for k in ("scale", "length", "ratio")},
            "in_band": abs(tried[kept]["ratio"] - 1) <= guard.band}
    if failed is not None:
        info["failed"] = failed
    if stopped is not None:
        info["stopped"] = stopped
    return results[kept], info


def _describe_alpha(lc: dict, length_unit: str, goal) -> str:
    unit = length_unit[:-1]
    fixed = {"fixed": f"α = {lc['alpha_first']:.4g} per {unit} (fixed)",
             "first_step": f"α = {lc['alpha_first']:.4g} per {unit} (length-neutral first "
                           "step)"}
    if lc["mode"] in fixed:
        return fixed[lc["mode"]]
    text = (f"α {lc['alpha_first']:.4g} → {lc['alpha_last']:.4g} per {unit} (mean "
            f"{lc['alpha_mean']:.4g}, {lc['mode']})")
    if goal is not None:
        text += f"; sampled at {goal.start:.1f} {length_unit}, target {goal.target:.1f}"
    return text


def length_goal(ctx: Context, t: int):
    """The target mode's start (π_{t−1}'s mean sample length, measured on iteration t's
    samples) and target (`length_control.target`, else π₀'s, from iteration 1's)."""
    from prefloop.length_control import LengthGoal

    unit = ctx.cfg.loss.length_unit

    def sampled(it: int) -> float:
        return mean_length([r for r in read_jsonl(ctx.run.samples(it))
                            if r.get("source", "policy") == "policy"], unit)

    target = ctx.cfg.loss.length_control.target or sampled(1)
    start = sampled(t)
    if min(start, target) <= 0:
        raise PrefloopError(f"loss.length_control: the sampled answers are empty (mean "
                            f"length {start} {unit}, target {target}); no length to hold")
    return LengthGoal(start, target)


# ---------------------------------------------------------------- evaluate


def evaluate(ctx: Context, t: int) -> dict:
    cfg, run = ctx.cfg, ctx.run
    if not ctx.eval_prompts:
        if ctx.procs.is_main:
            io.write_json(run.eval(t), {"iteration": t})
        return {}
    rows = sample_prompts(run.policy_path(t), ctx.eval_prompts, cfg.eval.sampling, ctx.procs,
                          cfg.trust_remote_code, ctx.progress, f"iter {t} eval")
    scores = score_rows(rows, cfg.eval.reward or cfg.reward, ctx.procs, cfg.trust_remote_code,
                        ctx.progress, f"iter {t} eval score", scorers=ctx.scorers)
    for row, s in zip(rows, scores, strict=True):
        row["score"] = s
    if cfg.eval.gold:
        from prefloop.rewards import gold_values

        gold = gold_values(cfg.eval.gold, [r["prompt"] for r in rows],
                           [r["response"] for r in rows])
        for row, g in zip(rows, gold, strict=True):
            row["gold"] = g
    if not ctx.procs.is_main:
        return {}
    baseline = read_jsonl(run.eval_samples(0)) if t else rows
    record = evaluate_iteration(t, rows, baseline, initial_logps(ctx, rows) if t else None,
                                cfg.eval.lc_fit)
    trained = ctx.manifest.stage(stage_key(t, "train")) if t else {}
    record.update({k: trained[k] for k in ("alpha", "alpha_last", "alpha_mean")
                   if k in trained})
    if "target_length" in trained:
        record.update(length_target=trained["target_length"],
                      length_target_unit=cfg.loss.length_unit)
    if "length_guard" in trained:
        guard = trained["length_guard"]
        record.update(trainings=len(guard["attempts"]), alpha_scale=guard["scale"],
                      probe_ratio=guard["ratio"])
    if cfg.eval.judge is not None and (t or cfg.eval.judge_baseline):
        record.update(llm_judge(ctx, t, rows, baseline))
    io.write_jsonl(run.eval_samples(t), rows)
    io.write_json(run.eval(t), record)
    run.write_metrics(cfg.iterations)
    ctx.echo(format_metrics_row(record, header=t == 0))
    _warn(ctx, t, record)
    return {}


def llm_judge(ctx: Context, t: int, rows: list[dict], initial_rows: list[dict]) -> dict:
    """π_t's eval answers against the baseline's (π₀'s, or `eval.judge_baseline`'s) by the
    LLM judge (prefloop.judge): writes judge.json, judgements.jsonl and the alpaca_eval files
    of iteration t; returns the metrics' judge_* fields. Requests go through the run's judge
    cache, so a resumed or re-run stage pays only for what it has not asked yet."""
    from prefloop.judge import judge_pairs, load_alpaca_eval_outputs, write_judge_files

    cfg, run = ctx.cfg, ctx.run
    path = cfg.eval.judge_baseline
    if not path:
        baseline, name = initial_rows, f"{cfg.name}-iter_0"
    else:
        baseline = load_alpaca_eval_outputs(path) if path.endswith(".json") else read_jsonl(path)
        name = next((r["generator"] for r in baseline if r.get("generator")), Path(path).stem)
    result = judge_pairs(cfg.eval.judge, rows, baseline, run.judge_cache, ctx.progress,
                         names=(f"{cfg.name}-iter_{t}", name))
    write_judge_files(result, run.judgements(t), run.judge(t), run.alpaca_eval(t))
    s = result.summary
    wr = _rate(s["win_rate"], s["win_rate_se"])
    lc = _rate(s["lc_win_rate"], s["lc_win_rate_se"])
    ctx.echo(f"iter {t}: judged by {s['model']} against {name}: win rate {wr}, LC {lc} "
             f"({s['n']} of {s['n_prompts']} prompts)")
    for warning in result.warnings:
        ctx.echo(f"iter {t}: judge warning: {warning}")
    if s["n_failed"]:
        reason = next(r["reason"] for r in result.rows if r["status"] == "failed")
        raise PrefloopError(
            f"eval.judge: {s['n_failed']} of {s['n_prompts']} prompts of iteration {t} got no "
            f"answer from {s['model']} ({reason}); the evaluate stage is not done. The answers "
            f"so far are kept in {run.judge_cache}: `prefloop run {run.root} --resume` asks "
            "only for the missing ones")
    return {"judge_model": s["model"], "judge_win_rate": s["win_rate"],
            "judge_win_rate_se": s["win_rate_se"], "judge_lc_win_rate": s["lc_win_rate"],
            "judge_lc_win_rate_se": s["lc_win_rate_se"], "judge_n": s["n"]}


def _rate(value: float | None, se: float | None) -> str:
    from prefloop.evaluate import format_rate

    if value is None:
        return "-"
    return format_rate(value) + (f" ± {se:.1f}" if se is not None else "")


def _warn(ctx: Context, t: int, record: dict) -> None:
    from prefloop.evaluate import EOS_WARNING

    if record["eos_rate"] < EOS_WARNING:
        ctx.echo(f"iter {t}: warning: {1 - record['eos_rate']:.0%} of the eval answers hit "
                 f"eval.sampling.max_new_tokens ({ctx.cfg.eval.sampling.max_new_tokens}): "
                 "their lengths and the KL estimate are of cut answers")
    for warning in record.get("lc_warnings", []):
        ctx.echo(f"iter {t}: warning: length-controlled win rate: {warning}")


# ---------------------------------------------------------------- alignment tax


def taxed(cfg, t: int) -> bool:
    """Whether iteration t's policy gets the alignment-tax step (`alignment_tax.iterations`:
    a list of t, "last" or "all"; π₀ is evaluated with the first of them, as the baseline)."""
    tax = cfg.alignment_tax
    if not tax.tasks or t == 0:
        return False
    if tax.iterations == "all":
        return True
    if tax.iterations == "last":
        return t == cfg.iterations
    return t in tax.iterations


def alignment_tax(ctx: Context, t: int) -> dict:
    """lm-evaluation-harness on π_t and, the first time, π₀ (prefloop.alignment_tax); their
    scores go into metrics.jsonl (`alignment_tax`) and the report."""
    from prefloop.alignment_tax import evaluate_policies

    cfg, run = ctx.cfg, ctx.run
    if ctx.procs.is_main:  # lm_eval runs as one process
        # every taxed policy so far (those already scored are only read), so that the
        # summary holds them all
        models = {i: run.policy_path(i) for i in range(t + 1) if i == 0 or taxed(cfg, i)}
        summary = evaluate_policies(cfg.alignment_tax, models, run.root, echo=ctx.echo,
                                    redo_hint="delete the file to redo")
        run.write_metrics(cfg.iterations)
        mine = [r for r in summary["rows"] if r["iteration"] == t]
        for r in mine:
            ctx.echo(f"iter {t}: alignment tax {r['task']} {r['metric']}: "
                     f"{r['value']:.4g} vs π₀ {r['baseline']:.4g} (Δ {r['delta']:+.4g})")
    return {"tasks": list(cfg.alignment_tax.tasks)}


def initial_logps(ctx: Context, rows: list[dict]) -> list[float] | None:
    """log π₀(y|x) of the current policy's eval samples, for the KL estimate."""
    if any(r.get("logprob") is None for r in rows):
        return None
    from prefloop.logprobs import sequence_logps
    from prefloop.models import load_causal_lm, load_tokenizer

    policy = ctx.run.policy_path(0)
    tok = load_tokenizer(policy, ctx.cfg.trust_remote_code)
    model = load_causal_lm(policy, ctx.cfg.trust_remote_code)
    values = sequence_logps(model, [r["prompt_ids"] for r in rows],
                            [r["response_ids"] for r in rows], tok.pad_token_id)
    return values.tolist()
