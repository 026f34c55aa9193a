"""The length guard (`length_guard`): lr_dpo's held length checked on sampled answers, and
π_t trained again with a rescaled α while it is outside the band."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prefloop.data import read_jsonl
from prefloop.errors import PrefloopError
from prefloop.length_control import kept_attempt, next_scale
from prefloop.loop import load_run_config, run
from tests.conftest import write_loop_world
from tests.test_loop import _cli, _weights, base_args

# ---------------------------------------------------------------- the rescaling rule


def test_the_first_retry_assumes_length_falls_as_the_scale_to_the_minus_0_4():
    # r = 1.16 at s = 1: ln s' = ln 1.16 / 0.4
    assert next_scale([(1.0, 1.16)]) == pytest.approx(1.16 ** 2.5)
    assert next_scale([(2.0, 0.8)]) == pytest.approx(2.0 * 0.8 ** 2.5)  # too short: less α


def test_later_retries_take_the_secant_through_the_closest_attempt_across_the_target():
    # the last attempt is short (0.9); of the two long ones, 1.1 at s = 1.5 is closer to 1
    e = (math.log(0.9) - math.log(1.1)) / (math.log(2.0) - math.log(1.5))
    want = math.exp(math.log(2.0) - math.log(0.9) / e)
    assert next_scale([(1.0, 1.2), (1.5, 1.1), (2.0, 0.9)]) == pytest.approx(want)
    assert 1.5 < want < 2.0  # regula falsi stays inside the bracket


def test_attempts_on_one_side_step_with_the_prior_slope_not_their_secant():
    # 1.077 → 1.052 is mostly probe noise: their secant (e = −0.13) would overshoot
    assert next_scale([(1.0, 1.077), (1.2, 1.052)]) == pytest.approx(1.2 * 1.052 ** 2.5)
    # more α and (noise) a longer answer: the same
    assert next_scale([(1.0, 1.1), (1.5, 1.12)]) == pytest.approx(1.5 * 1.12 ** 2.5)


def test_a_bracket_whose_length_rises_with_alpha_is_bisected():
    assert next_scale([(1.0, 0.9), (2.0, 1.1)]) == pytest.approx(2 ** 0.5)


def test_one_retry_moves_the_scale_by_at_most_three_times():
    assert next_scale([(1.0, 3.0)]) == pytest.approx(3.0)
    assert next_scale([(1.0, 0.2)]) == pytest.approx(1 / 3)


def test_an_attempt_in_the_band_is_kept_over_a_closer_one_in_log_outside_it():
    # |ln 1.0505| = 0.0493 < |ln 0.951| = 0.0502, but only 0.951 is within ±5 %
    assert kept_attempt([1.0505, 0.951], 0.05) == 1
    assert kept_attempt([1.2, 0.9, 1.08], 0.05) == 2  # none inside: the closest
    assert kept_attempt([1.04, 0.99], 0.05) == 1  # both inside: the closest


@pytest.mark.parametrize("attempts", [[], [(0.0, 1.1)], [(1.0, -1.0)]])
def test_the_rule_refuses_what_it_cannot_step_from(attempts):
    with pytest.raises(ValueError):
        next_scale(attempts)


# ---------------------------------------------------------------- configuration


def _run_cfg(*extra: str):
    return load_run_config(None, ["policy=p", "prompts.path=x.jsonl", "reward.model=rm",
                                  *extra])


@pytest.mark.parametrize("overrides,message", [
    (["loss.name=dpo", "length_guard.band=0.1"], "does not apply: loss dpo"),
    (["loss.name=lr_dpo", "loss.alpha=0.05", "length_guard.attempts=2"], "mode 'fixed'"),
    (["loss.name=lr_dpo", "loss.length_control.target=30", "length_guard.band=0.1"],
     "approached over iterations"),
    (["loss.name=lr_dpo", "length_guard.band=0"], "must be in \\(0, 1\\)"),
    (["loss.name=lr_dpo", "length_guard.attempts=-1"], "must be ≥ 0"),
    (["loss.name=lr_dpo", "length_guard.samples=0"], "samples: must be ≥ 1"),
])
def test_length_guard_misuse_is_refused(overrides, message):
    with pytest.raises(PrefloopError, match=message):
        _run_cfg(*overrides).validate()


@pytest.mark.parametrize("overrides,guarded", [
    (["loss.name=lr_dpo"], True), (["loss.name=lr_dpo", "length_guard.attempts=0"], False),
    (["loss.name=dpo"], False), (["loss.name=lr_dpo", "loss.length_control.target=30"], False),
    # turning off a guard that does not apply is not refused
    (["loss.name=dpo", "length_guard.attempts=0"], False),
    (["loss.name=lr_dpo", "loss.length_control.target=30", "length_guard.attempts=0"], False),
])
def test_the_guard_is_on_by_default_where_it_applies(overrides, guarded):
    cfg = _run_cfg(*overrides)
    cfg.validate()
    assert cfg.guarded is guarded


# ---------------------------------------------------------------- in the loop


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """The loop tests' world with a policy that ends its answers (a random one runs every
    answer to max_new_tokens, so no α could change its length): a micro Llama taught for
    a few steps to answer the sums with 0–2 filler sentences."""
    from prefloop.config import load_config
    from prefloop.sft import SFTConfig, train_sft
    from prefloop.tiny import build_causal_lm, save_pretrained_pair, synthetic_preferences

    d = tmp_path_factory.mktemp("guard-world")
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "micro"), tokenizer, d / "base")
    rows = [{"prompt": r["prompt"], "completion": r["chosen"][0]["content"]}
            for r in synthetic_preferences(64, seed=3, chat=True, max_filler=2)]
    cfg = load_config(SFTConfig, None, [
        f"model={d / 'base'}", f"output_dir={d / 'policy'}", "training.lr=3e-3",
        "training.batch_size=8", "training.max_steps=40", "training.warmup_ratio=0"])
    train_sft(cfg, rows=rows, progress=False)
    write_loop_world(d, tokenizer)
    return d


def guard_args(world: Path, run_dir: Path, *extra: str) -> list[str]:
    return base_args(world, run_dir, "length_guard.prompts=8", "length_guard.samples=2",
                     "sampling.max_new_tokens=32", *extra)


def _mean_tokens(rows: list[dict]) -> float:
    return sum(r["num_tokens"] for r in rows) / len(rows)


def test_a_length_outside_the_band_is_trained_again_and_the_closest_kept(world, tmp_path):
    run_dir = tmp_path / "run"
    # a band nothing meets: every iteration trains three times (sampling seed 1 draws pairs
    # whose length-neutral root is > 0 in both iterations; with a root of 0 at every step
    # the guard stops after one training, test_a_guard_whose_root_stays_zero_…)
    run(load_run_config(None, guard_args(world, run_dir, "length_guard.band=1e-9",
                                         "sampling.seed=1")), progress=False)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    initial_rows = read_jsonl(run_dir / "iter_0" / "length_probe.jsonl")
    assert len(initial_rows) == 8 * 2 and len({r["prompt_id"] for r in initial_rows}) == 8
    initial = _mean_tokens(initial_rows)
    previous_scale = 1.0
    for t in (1, 2):
        train = manifest["stages"][f"iter_{t}/train"]
        guard = train["length_guard"]
        tried = guard["attempts"]
        assert len(tried) == 3 and guard["initial_length"] == pytest.approx(initial)
        probe = read_jsonl(run_dir / f"iter_{t}" / "length_probe.jsonl")
        assert {r["prompt_id"] for r in probe} == {r["prompt_id"] for r in initial_rows}
        for a, attempt in enumerate(tried):
            rows = [r for r in probe if r["attempt"] == a]
            assert len(rows) == 16
            assert attempt["length"] == pytest.approx(_mean_tokens(rows))
            assert attempt["ratio"] == pytest.approx(attempt["length"] / initial)
            assert attempt["train_seconds"] > 0 and attempt["probe_seconds"] > 0
        # the first attempt starts from the previous iteration's kept scale, the others
        # from the rule; α at the first step is proportional to the scale
        assert tried[0]["scale"] == pytest.approx(previous_scale)
        for a in (1, 2):
            assert tried[a]["scale"] == pytest.approx(
                next_scale([(x["scale"], x["ratio"]) for x in tried[:a]]))
        per_scale = [x["alpha_first"] / x["scale"] for x in tried]
        assert per_scale == pytest.approx([per_scale[0]] * 3)
        kept = min(range(3), key=lambda a: abs(math.log(tried[a]["ratio"])))
        assert guard["kept"] == kept and guard["scale"] == tried[kept]["scale"]
        assert guard["in_band"] is False
        # iter_t/policy is the kept training
        log = read_jsonl(run_dir / f"iter_{t}" / "policy" / "train_log.jsonl")
        assert log[0]["alpha"] == pytest.approx(tried[kept]["alpha_first"])
        assert train["alpha_mean"] == pytest.approx(tried[kept]["alpha_mean"])
        assert not (run_dir / f"iter_{t}" / ".policy.attempts").exists()
        assert metrics[t]["trainings"] == 3
        assert metrics[t]["alpha_scale"] == guard["scale"]
        assert metrics[t]["probe_ratio"] == pytest.approx(tried[kept]["ratio"])
        previous_scale = guard["scale"]
    assert "trainings" not in metrics[0]


def test_a_guard_that_accepts_changes_nothing_but_adds_its_probe(world, tmp_path):
    off, on = tmp_path / "off", tmp_path / "on"
    run(load_run_config(None, guard_args(world, off, "length_guard.attempts=0")),
        progress=False)
    run(load_run_config(None, guard_args(world, on, "length_guard.band=0.99")),
        progress=False)
    for t in (1, 2):
        for name in ("samples.jsonl", "pairs.jsonl", "eval_samples.jsonl"):
            assert (on / f"iter_{t}" / name).read_bytes() == \
                (off / f"iter_{t}" / name).read_bytes(), name
        a, b = _weights(on / f"iter_{t}" / "policy"), _weights(off / f"iter_{t}" / "policy")
        assert all(torch.equal(a[k], b[k]) for k in a)
    guard_keys = {"trainings", "alpha_scale", "probe_ratio"}
    for m_on, m_off in zip(read_jsonl(on / "metrics.jsonl"), read_jsonl(off / "metrics.jsonl"),
                           strict=True):
        assert {k: v for k, v in m_on.items() if k not in guard_keys} == m_off
        assert m_on.get("trainings", 1) == 1 and not guard_keys & set(m_off)
    assert not list(off.rglob("length_probe.jsonl"))
    assert len(list(on.rglob("length_probe.jsonl"))) == 3


@pytest.mark.slow
def test_killed_inside_the_second_training_resumes_to_the_uninterrupted_run(world, tmp_path):
    args = ("length_guard.band=1e-9", "length_guard.attempts=2")
    reference = tmp_path / "reference"
    done = _cli(guard_args(world, reference, *args))
    assert done.returncode == 0, done.stderr[-2000:]
    killed_dir = tmp_path / "killed"
    # attempt 0 of iteration 1 passes a fault point per optimizer step and probe batch
    steps = len(read_jsonl(reference / "iter_1" / "policy" / "train_log.jsonl"))
    # π₀'s probe (2 batches of 4 prompts), attempt 0 (its steps, its probe's 2 batches),
    # then the second step of attempt 1
    killed = _cli(guard_args(world, killed_dir, *args),
                  {"PREFLOOP_FAULT": "iter_1/train", "PREFLOOP_FAULT_AT": str(steps + 6)})
    assert killed.returncode == -9, killed.stderr[-2000:]
    attempts = killed_dir / "iter_1" / ".policy.attempts"
    assert (attempts / "0" / "config.json").is_file(), "died after the first training"
    assert (killed_dir / "iter_1" / ".policy.partial").is_dir(), "died in the second"
    assert not (killed_dir / "iter_1" / "policy").exists()
    resumed = _cli([*guard_args(world, killed_dir, *args), "--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not attempts.exists()
    for t in (1, 2):
        for name in ("length_probe.jsonl", "samples.jsonl", "eval_samples.jsonl"):
            assert (killed_dir / f"iter_{t}" / name).read_bytes() == \
                (reference / f"iter_{t}" / name).read_bytes(), (t, name)
        a, b = _weights(killed_dir / f"iter_{t}" / "policy"), \
            _weights(reference / f"iter_{t}" / "policy")
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert read_jsonl(killed_dir / "metrics.jsonl") == read_jsonl(reference / "metrics.jsonl")


@pytest.mark.parametrize("overrides,line", [
    (["loss.name=lr_dpo"], "π_t's length on 256 prompts × 4 samples within ±5% of π₀'s, "
                           "≤ 3 trainings per iteration"),
    (["loss.name=lr_dpo", "length_guard.attempts=0"], "off (length_guard.attempts=0)"),
    (["loss.name=lr_dpo", "length_guard.attempts=1", "length_guard.band=0.002"],
     "π_t's length on 256 prompts × 4 samples measured against π₀'s, never retrained "
     "(length_guard.attempts=1)"),
    (["loss.name=lr_dpo", "length_guard.attempts=2", "length_guard.band=0.002"],
     "π_t's length on 256 prompts × 4 samples within ±0.2% of π₀'s, ≤ 2 trainings per "
     "iteration"),
    (["loss.name=dpo"], "does not apply (lr_dpo holding π₀'s length only)"),
])
def test_dry_run_says_what_the_guard_will_do(overrides, line, tmp_path):
    from prefloop.loop.plan import plan

    (tmp_path / "p.jsonl").write_text('{"prompt": "hi"}\n')
    cfg = _run_cfg(f"prompts.path={tmp_path / 'p.jsonl'}", f"run_dir={tmp_path / 'run'}",
                   *overrides)
    assert dict(plan(cfg))["length guard"] == line


def test_a_retry_that_fails_keeps_the_trainings_before_it(world, tmp_path, monkeypatch):
    import prefloop.trainer

    real, calls = prefloop.trainer.train_preferences, []

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise PrefloopError("step 3: the loss is not finite (nan)")
        return real(*args, **kwargs)

    monkeypatch.setattr(prefloop.trainer, "train_preferences", second_fails)
    run_dir = tmp_path / "run"
    run(load_run_config(None, guard_args(world, run_dir, "iterations=1",
                                         "length_guard.band=1e-9")), progress=False)
    guard = json.loads((run_dir / "manifest.json").read_text())[
        "stages"]["iter_1/train"]["length_guard"]
    assert len(guard["attempts"]) == 1 and guard["kept"] == 0
    assert "not finite" in guard["failed"]["error"]
    assert guard["failed"]["scale"] == pytest.approx(
        next_scale([(1.0, guard["attempts"][0]["ratio"])]))
    log = read_jsonl(run_dir / "iter_1" / "policy" / "train_log.jsonl")
    assert log[0]["alpha"] == pytest.approx(guard["attempts"][0]["alpha_first"])
    assert not (run_dir / "iter_1" / ".policy.attempts").exists()
    assert read_jsonl(run_dir / "metrics.jsonl")[1]["trainings"] == 1


def test_a_guard_whose_root_stays_zero_stops_after_one_training(world, tmp_path):
    # pairs whose winner is always the shorter answer: the length-neutral root is 0 and the
    # policy shortens, which no α ≥ 0 can undo, so a larger or smaller scale would train
    # the same model again (it did, twice per iteration, before the guard checked)
    run_dir = tmp_path / "run"
    run(load_run_config(None, guard_args(world, run_dir, "iterations=1",
                                         "pairing.length_penalty=1000",
                                         "length_guard.band=1e-9")), progress=False)
    guard = json.loads((run_dir / "manifest.json").read_text())[
        "stages"]["iter_1/train"]["length_guard"]
    assert len(guard["attempts"]) == 1 and guard["stopped"] == "root_zero"
    assert guard["attempts"][0]["alpha_mean"] == 0 and guard["in_band"] is False
    assert read_jsonl(run_dir / "metrics.jsonl")[1]["trainings"] == 1
    assert {r["attempt"] for r in read_jsonl(run_dir / "iter_1" / "length_probe.jsonl")} == {0}


def test_the_kept_policy_records_its_own_directory(world, tmp_path):
    run_dir = tmp_path / "run"
    run(load_run_config(None, guard_args(world, run_dir, "iterations=1",
                                         "length_guard.band=1e-9",
                                         "length_guard.attempts=2")), progress=False)
    text = (run_dir / "iter_1" / "policy" / "train_config.yaml").read_text()
    assert f"output_dir: {run_dir / 'iter_1' / 'policy'}" in text and ".attempts" not in text


def test_a_redo_with_other_sampling_samples_the_initial_probe_again(world, tmp_path):
    run_dir = tmp_path / "run"
    run(load_run_config(None, guard_args(world, run_dir, "iterations=1")), progress=False)
    first = read_jsonl(run_dir / "iter_0" / "length_probe.jsonl")
    run(load_run_config(None, guard_args(world, run_dir, "iterations=1",
                                         "sampling.max_new_tokens=6")),
        redo_from="iter_1/sample", progress=False)
    again = read_jsonl(run_dir / "iter_0" / "length_probe.jsonl")
    assert {r["settings"] for r in again} != {r["settings"] for r in first}
    assert max(r["num_tokens"] for r in again) <= 6 < max(r["num_tokens"] for r in first)


def test_a_redo_without_the_guard_leaves_no_probe_of_the_guarded_training(world, tmp_path):
    run_dir = tmp_path / "run"
    run(load_run_config(None, guard_args(world, run_dir, "iterations=1")), progress=False)
    assert (run_dir / "iter_1" / "length_probe.jsonl").is_file()
    run(load_run_config(None, guard_args(world, run_dir, "iterations=1",
                                         "length_guard.attempts=0")),
        redo_from="iter_1/train", progress=False)
    assert not (run_dir / "iter_1" / "length_probe.jsonl").exists()
    assert "length_guard" not in json.loads((run_dir / "manifest.json").read_text())[
        "stages"]["iter_1/train"]


def test_a_run_recorded_before_the_guard_continues_without_it(tmp_path):
    import yaml

    from prefloop.loop.rundir import RunDir, config_changes, recorded_config

    old = tmp_path / "old"
    old.mkdir()
    cfg = _run_cfg("loss.name=lr_dpo", f"run_dir={old}")
    recorded = recorded_config(cfg)
    del recorded["length_guard"]
    (old / "config.yaml").write_text(yaml.safe_dump(recorded))
    # today's default (the guard on) is a change for a run that ran without it …
    assert config_changes(RunDir(old), cfg)[0] == ["length_guard.attempts: 0 → 3"]
    # … the run directory alone continues it as it was, and so does saying so
    loaded = load_run_config(str(old))
    assert loaded.length_guard.attempts == 0 and not loaded.guarded
    assert config_changes(RunDir(old), loaded)[0] == []
    off = _run_cfg("loss.name=lr_dpo", f"run_dir={old}", "length_guard.attempts=0")
    assert config_changes(RunDir(old), off)[0] == []


def test_a_run_recorded_before_the_anchor_continues_without_it(tmp_path):
    """lr_dpo's chosen-response anchor (loss.lam, default 5) came after runs that trained
    without it: resuming one with today's default must be refused as a change, and the run
    directory alone continues it with λ = 0."""
    import yaml

    from prefloop.loop.rundir import RunDir, config_changes, recorded_config

    old = tmp_path / "old"
    old.mkdir()
    cfg = _run_cfg("loss.name=lr_dpo", f"run_dir={old}")
    recorded = recorded_config(cfg)
    assert recorded["loss"]["lam"] == 5.0  # a new run records the anchor in force
    del recorded["loss"]["lam"]
    (old / "config.yaml").write_text(yaml.safe_dump(recorded))
    assert config_changes(RunDir(old), cfg)[0] == ["loss.lam: 0.0 → 5.0"]
    loaded = load_run_config(str(old))
    assert loaded.loss.params["lam"] == 0.0
    assert config_changes(RunDir(old), loaded)[0] == []
    # a run of another loss has no anchor to fill in
    dpo = _run_cfg("loss.name=dpo", f"run_dir={old}")
    (old / "config.yaml").write_text(yaml.safe_dump(recorded_config(dpo)))
    assert "lam" not in recorded_config(dpo)["loss"]
    assert load_run_config(str(old)).loss.name == "dpo"
    assert config_changes(RunDir(old), dpo)[0] == []


def test_a_run_extended_over_a_grown_prompt_file_keeps_its_probe(world, tmp_path):
    """`prefloop demo iterations=3` rewrites its prompt file with more prompts and extends
    the run: the probe (and π₀'s length on it) must stay the one iterations 1–2 used."""
    rows = read_jsonl(world / "prompts.jsonl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:16]))
    run_dir = tmp_path / "run"
    args = [*guard_args(world, run_dir), f"prompts.path={prompts}"]
    run(load_run_config(None, args), progress=False)
    before = (run_dir / "iter_0" / "length_probe.jsonl").read_bytes()
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows[:24]))
    run(load_run_config(None, [*args, "iterations=3"]), resume=True, progress=False)
    assert (run_dir / "iter_0" / "length_probe.jsonl").read_bytes() == before
    manifest = json.loads((run_dir / "manifest.json").read_text())
    initial = {manifest["stages"][f"iter_{t}/train"]["length_guard"]["initial_length"]
               for t in (1, 2, 3)}
    assert len(initial) == 1
    ids = {r["prompt_id"] for r in read_jsonl(run_dir / "iter_0" / "length_probe.jsonl")}
    assert ids == {r["prompt_id"] for r in read_jsonl(run_dir / "iter_3" /
                                                      "length_probe.jsonl")}
