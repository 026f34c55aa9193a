"""`prefloop demo` and `prefloop testbed`: a reduced demo end to end, the build cache, the CLI.

The reduced demo is the slowest test of the suite (a few minutes on 2 cores): it builds the
testbed, runs 2 iterations of iDPO and iLR-DPO and asserts the direction of the
paper's effect — iDPO's answers get longer, iLR-DPO's do not, and iLR-DPO is not less
correct than the SFT policy — from the metrics and artifacts the demo leaves on disk.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from prefloop import demo
from prefloop.demo import DemoConfig, Outcome
from prefloop.errors import PrefloopError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The testbed is built at its full size (a weaker reward model is exploited rather than
# followed); the loop is shortened: 2 iterations, fewer prompts.
REDUCED = dict(iterations=2, prompts_per_iteration=384, eval_prompts=300)


@pytest.fixture(scope="module")
def reduced_demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    cfg = DemoConfig(cache_dir=str(root / "cache"), out_dir=str(root / "out"), **REDUCED)
    cfg.validate()
    result = demo.run_demo(cfg, progress=False, echo=lambda *a, **k: None)
    return cfg, result


def test_reduced_demo_shows_the_length_story(reduced_demo):
    _, result = reduced_demo
    outcome = Outcome.of(result.metrics)
    _, tokens_plain = outcome.final["idpo"]
    gold_reg, tokens_reg = outcome.final["ilr-dpo"]
    assert 20 <= outcome.sft_gold[0] <= 80
    sft_tokens = outcome.sft_tokens[0]
    assert tokens_plain > 1.2 * sft_tokens  # iDPO: longer
    # iLR-DPO: in the ±10 % band of SFT's length at every iteration (the length controller)
    for record in result.metrics["ilr-dpo"][1:]:
        assert abs(record["mean_tokens"] / sft_tokens - 1) <= 0.10, record
    assert tokens_plain > 1.2 * tokens_reg
    assert gold_reg >= outcome.sft_gold[0]  # and not less correct


def test_at_twice_the_learning_rate_the_length_guard_holds_the_band(reduced_demo):
    """At 2× the demo's learning rate the within-iteration controller alone let iLR-DPO's
    length leave the band in every seed (×1.10–1.25); the length guard trains such an
    iteration again with more α."""
    cfg, _ = reduced_demo
    fast = replace(cfg, out_dir=str(Path(cfg.out_dir).parent / "lr2x"), lr=2 * cfg.lr,
                   runs={"ilr-dpo": {"name": "lr_dpo"}})
    result = demo.run_demo(fast, progress=False, echo=lambda *a, **k: None)
    outcome = Outcome.of(result.metrics)
    for record in result.metrics["ilr-dpo"][1:]:
        assert abs(record["mean_tokens"] / outcome.sft_tokens[0] - 1) <= 0.10, record
    manifest = json.loads((Path(fast.out_dir) / "ilr-dpo" / "manifest.json").read_text())
    guards = [manifest["stages"][f"iter_{t}/train"]["length_guard"] for t in (1, 2)]
    assert all(g["in_band"] for g in guards)


def test_reduced_demo_leaves_runs_and_a_report_on_disk(reduced_demo):
    cfg, result = reduced_demo
    out = Path(cfg.out_dir)
    assert result.report == out / "report.html" and result.report.stat().st_size > 10_000
    for name in cfg.runs:
        records = [json.loads(line) for line in (out / name / "metrics.jsonl").open()]
        assert [r["iteration"] for r in records] == list(range(cfg.iterations + 1))
        assert (out / name / f"iter_{cfg.iterations}" / "policy" / "config.json").is_file()
        for key in ("gold_accuracy", "mean_reward", "mean_tokens", "win_rate", "lc_win_rate"):
            assert all(key in r for r in records)
    sft = {name: result.metrics[name][0] for name in cfg.runs}
    assert sft["idpo"]["mean_tokens"] == sft["ilr-dpo"]["mean_tokens"]  # same SFT start


def test_report_of_loop_made_runs_draws_training_alpha_and_the_length_band(reduced_demo):
    """The report reads what the loop wrote (train logs beside each policy; α per step;
    the length target), not a directory built by hand."""
    from prefloop.report import load_run

    cfg, result = reduced_demo
    out = Path(cfg.out_dir)
    run = load_run(out / "ilr-dpo")
    assert sorted(run.train_logs) == list(range(1, cfg.iterations + 1))
    assert all("alpha" in row and "length_estimate" in row
               for rows in run.train_logs.values() for row in rows)
    sft_tokens = run.metrics[0]["mean_tokens"]
    for record in run.metrics[1:]:
        # the target is iteration 1's sampled length of the SFT policy: SFT's own length
        assert record["length_target_unit"] == "tokens"
        assert abs(record["length_target"] / sft_tokens - 1) < 0.05
        assert record["alpha"] > 0 and record["alpha_last"] >= 0
    assert (out / "plots" / "training.png").is_file() and (out / "plots" / "length.png").is_file()
    page = result.report.read_text()
    assert "length target" in page and "α last step" in page


def test_testbed_is_cached_and_reruns_resume(reduced_demo):
    cfg, result = reduced_demo
    assert not result.testbed.cached
    again = demo.build_testbed(cfg, progress=False, echo=lambda *a, **k: None)
    assert again.cached and again.directory == result.testbed.directory
    # nothing re-ran: every stage's artifact and every manifest is left as it was (it used
    # to compare wall-clock times, which a loaded machine can make fail or pass at will)
    out = Path(cfg.out_dir)
    artifacts = [p for p in out.rglob("*") if p.is_file() and p.parent != out
                 and "plots" not in p.parts]
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in artifacts}
    rerun = demo.run_demo(cfg, progress=False, echo=lambda *a, **k: None)
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in artifacts} == before
    assert rerun.metrics == result.metrics


def test_testbed_model_is_a_real_sequence_classifier_with_length_bias(reduced_demo):
    import torch
    from transformers import AutoModelForSequenceClassification

    _, result = reduced_demo
    rm = AutoModelForSequenceClassification.from_pretrained(result.testbed.reward_model)
    assert rm.config.num_labels == 1
    from prefloop import testbed
    from prefloop.rewards import RewardModelScorer

    scorer = RewardModelScorer(str(result.testbed.reward_model), batch_size=32)
    import random

    rng = random.Random(5)
    prompts, short, long = [], [], []
    for i in range(40):
        problem = testbed.make_problem(rng)
        prompts.append(problem.messages)
        short.append(testbed.write_answer(random.Random(i), problem.answer, 0))
        long.append(testbed.write_answer(random.Random(i), problem.answer, 6))
    s_short = torch.tensor(scorer.score(prompts, short))
    s_long = torch.tensor(scorer.score(prompts, long))
    assert (s_long > s_short).float().mean() > 0.7  # the proxy prefers longer answers


def test_concurrent_builders_wait_for_one_build(tmp_path, monkeypatch):
    builds = []

    def fake_build(cfg, bed, progress, echo):
        builds.append(threading.get_ident())
        time.sleep(0.3)
        bed.sft.mkdir(parents=True)

    monkeypatch.setattr(demo, "_build_models", fake_build)
    cfg = DemoConfig(cache_dir=str(tmp_path))
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        demo.build_testbed(cfg, False, lambda *a, **k: None))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1
    assert sorted(r.cached for r in results) == [False, True, True]
    assert not list(tmp_path.glob(".*.partial"))


def test_failed_build_leaves_no_half_built_cache(tmp_path, monkeypatch):
    def broken_build(cfg, bed, progress, echo):
        bed.sft.mkdir(parents=True)
        raise RuntimeError("out of memory")

    monkeypatch.setattr(demo, "_build_models", broken_build)
    cfg = DemoConfig(cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError):
        demo.build_testbed(cfg, False, lambda *a, **k: None)
    assert not (tmp_path / cfg.build_key()).exists()


def test_build_key_tracks_model_settings_only():
    cfg = DemoConfig()
    assert replace(cfg, alpha=0.5, prompts_per_iteration=7).build_key() == cfg.build_key()
    for change in (dict(sft_lr=1e-4), dict(rm_lr=1e-4), dict(seed=3),
                   dict(annotator_w_length=0.1)):
        assert replace(cfg, **change).build_key() != cfg.build_key()


@pytest.mark.parametrize("override, message", [
    ("policy_size=huge", "policy_size: 'huge' is not one of"),
    ("num_samples=1", "num_samples: pairing needs ≥ 2"),
    ("iterations=0", "iterations: must be ≥ 1"),
    ("runs.idpo.name=nope", "runs.idpo.name: 'nope' is not a registered loss"),
    ("alpha=-1", "alpha: must be ≥ 0 (or null: automatic)"),
    ("colour=red", "colour"),
])
def test_demo_cli_rejects_bad_settings(override, message, capsys):
    from prefloop.cli import main

    assert main(["demo", override]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_testbed_cli_writes_a_directory_of_files(reduced_demo, tmp_path, capsys):
    from prefloop.cli import main

    cfg, _ = reduced_demo
    overrides = [f"{k}={v}" for k, v in REDUCED.items()] + [f"cache_dir={cfg.cache_dir}"]
    out = tmp_path / "tb"
    assert main(["testbed", str(out), *overrides, "-q"]) == 0
    for name in ("sft/config.json", "base/config.json", "reward_model/config.json",
                 "sft.jsonl", "prefs.jsonl", "prompts.jsonl", "eval_prompts.jsonl"):
        assert (out / name).is_file(), name
    assert not (out / "rm_base").exists()
    assert main(["testbed", str(out), *overrides, "-q"]) == 2  # not empty: refused
    assert "exists and is not empty" in capsys.readouterr().err


def test_outcome_checks_compute_the_story_from_numbers():
    def rec(t, gold, tokens):
        return {"iteration": t, "gold_accuracy": gold, "gold_accuracy_se": 0.01,
                "mean_tokens": tokens, "mean_tokens_se": 0.5}

    metrics = {
        "idpo": [rec(0, 0.4, 20.0), rec(1, 0.42, 30.0), rec(2, 0.45, 40.0)],
        "ilr-dpo": [rec(0, 0.4, 20.0), rec(1, 0.45, 19.0), rec(2, 0.55, 21.0)],
    }
    checks = Outcome.of(metrics).checks()
    assert [ok for _, ok in checks] == [True, True, True, True]
    # every line shows its interval: 21/20 = 1.05 ± 1.05·√((0.5/21)² + (0.5/20)²) = 0.04
    assert "1.05±0.04" in checks[1][0] and "55.0±1.0" in checks[2][0]
    # the band holds at every iteration, not only the last
    metrics["ilr-dpo"][1]["mean_tokens"] = 23.0
    assert [ok for _, ok in Outcome.of(metrics).checks()] == [True, False, True, True]
    metrics["ilr-dpo"][1]["mean_tokens"] = 19.0
    metrics["ilr-dpo"][2]["gold_accuracy"] = 0.47  # +7 over SFT, and 2 above iDPO
    assert [ok for _, ok in Outcome.of(metrics).checks()] == [True, True, False, True]
    # a demo of only one of the runs (`runs=`) checks what concerns it (this was a KeyError)
    only = Outcome.of({"ilr-dpo": metrics["ilr-dpo"]}).checks()
    assert [text.split(" (")[0] for text, _ in only] == [
        "ilr-dpo length within ±10% of SFT at every iteration", "ilr-dpo gold ≥ SFT + 8"]
    assert [text.split(" (")[0] for text, _ in Outcome.of({"idpo": metrics["idpo"]}).checks()
            ] == ["idpo length ≥ 1.4× SFT"]


def _story(idpo: list[tuple[float, float]], ilr: list[tuple[float, float]]) -> dict:
    """metrics of one training: SFT at 40 % / 20 tokens, then (gold, tokens) per iteration."""
    def recs(values):
        return [{"iteration": t, "gold_accuracy": g, "gold_accuracy_se": 0.01,
                 "mean_tokens": n, "mean_tokens_se": 0.5}
                for t, (g, n) in enumerate([(0.4, 20.0), *values])]

    return {"idpo": recs(idpo), "ilr-dpo": recs(ilr)}


def test_claims_over_trainings_are_on_the_means_with_their_standard_errors():
    from prefloop.demo import over_trainings

    trainings = [  # iDPO ends at 61 / 74 / 70 % gold, iLR-DPO at 69 / 71 / 70 %
        _story([(0.5, 30.0), (0.61, 40.0)], [(0.6, 21.0), (0.69, 19.0)]),
        _story([(0.5, 30.0), (0.74, 30.0)], [(0.6, 20.0), (0.71, 21.0)]),
        _story([(0.5, 30.0), (0.70, 32.0)], [(0.6, 20.5), (0.70, 20.0)]),
    ]
    checks = over_trainings([Outcome.of(m) for m in trainings])
    assert [ok for _, ok in checks] == [True, True, True, True]
    # iDPO × SFT: (2.0 + 1.5 + 1.6)/3 = 1.70, sd 0.265 → se 0.15
    assert "1.70±0.15×" in checks[0][0]
    assert "0.95–1.05×" in checks[1][0]
    # gold: iLR-DPO 70.0, sd 1.0 → se 0.58; iDPO 68.33, sd 6.66 → se 3.84
    assert "70.0±0.6 [69.0, 71.0, 70.0]" in checks[2][0]
    assert "70.0±0.6 vs 68.3±3.8 [61.0, 74.0, 70.0]" in checks[3][0]
    # one training (the second) alone fails iDPO − 2; the means do not
    assert not Outcome.of(trainings[1]).checks()[3][1]
    # the band must hold in every training at every iteration
    trainings[2]["ilr-dpo"][1]["mean_tokens"] = 22.5
    assert [ok for _, ok in over_trainings([Outcome.of(m) for m in trainings])][1] is False
    with pytest.raises(ValueError, match="≥ 2 trainings"):
        over_trainings([Outcome.of(trainings[0])])
    with pytest.raises(ValueError, match="needs the runs"):
        over_trainings([Outcome.of(m) for m in trainings] +
                       [Outcome.of({"idpo": trainings[0]["idpo"]})])


def test_demo_tables_prints_the_claims_over_trainings_per_seed():
    import importlib.util
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[1] / "scripts" / "demo_tables.py"
    spec = importlib.util.spec_from_file_location("demo_tables", path)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    runs = [_story([(0.5, 30.0), (g_p, 32.0)], [(0.6, 20.0), (g_r, 21.0)])
            for g_p, g_r in ((0.61, 0.69), (0.74, 0.71), (0.70, 0.70))]
    lines = tables.training_rows({5: [SimpleNamespace(metrics=m) for m in runs]})
    assert lines[2].startswith("| 5 | 5, 1005, 2005 | 61.0, 74.0, 70.0 | 69.0, 71.0, 70.0 | "
                               "1.00–1.05 | 4/4 |")
    assert "| iDPO gold % t=2 | iLR-DPO gold % t=2 |" in lines[0]  # the runs' last iteration
    assert lines[3] == "" and len(lines) == 4 + 4 + 1
    assert all(line.startswith("- seed 5: ✓ ") for line in lines[4:-1])
    # iLR-DPO − iDPO per training: t=1 +10 each; t=2 +8, −3, 0 → mean +1.67, sd 5.69 → se 3.28
    assert lines[-1] == ("- all 1 seeds × 3 trainings, iLR-DPO gold − iDPO's paired by "
                         "training: t=1 +10.0 ± 0.0 (60.0 vs 50.0, behind in 0); t=2 +1.7 ± "
                         "3.3 (70.0 vs 68.3, behind in 1)")


def test_demo_tables_puts_every_training_in_its_own_seed_directory(tmp_path, monkeypatch,
                                                                   capsys):
    """With one seed, the trainings went to `--out` itself and `--out/seed-S-train-K` beside
    its run folders; every seed and training now has its folder, as with several seeds."""
    import importlib.util
    from types import SimpleNamespace

    path = Path(__file__).resolve().parents[1] / "scripts" / "demo_tables.py"
    spec = importlib.util.spec_from_file_location("demo_tables", path)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    ran = []

    def fake_demo(cfg, progress, echo):
        ran.append((cfg.seed, cfg.training_seed, cfg.out_dir))
        return SimpleNamespace(metrics=_story([(0.5, 30.0)], [(0.6, 20.0)]))

    monkeypatch.setattr(demo, "run_demo", fake_demo)
    monkeypatch.setattr(tables, "iteration_rows", lambda result: [])
    monkeypatch.setattr(tables, "reward_right", lambda result: "97.9 %")
    out = tmp_path / "tables"
    assert tables.main(["--seeds", "4", "--trainings", "2", "--out", str(out)]) == 0
    assert ran == [(4, None, str(out / "seed-4")), (4, 1004, str(out / "seed-4-train-1"))]
    printed = capsys.readouterr().out
    assert "| 4 | 4, 1004 |" in printed
    assert "| 4 | 40.0 ± 1.0 / 20.0 | 97.9 % | 50.0 ± 1.0 / ×1.50 |" in printed


def test_demo_tables_refuses_a_training_seed_with_several_trainings(capsys):
    """training_seed=7 with --trainings 2 ran training 0 with seed 7, training 1 with
    S + 1000, and printed S as training 0's seed."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "demo_tables.py"
    spec = importlib.util.spec_from_file_location("demo_tables", path)
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    with pytest.raises(SystemExit):
        tables.main(["--seeds", "4", "--trainings", "2", "training_seed=7"])
    assert "--trainings: not with training_seed=" in capsys.readouterr().err


def test_training_seed_reseeds_only_the_loops_training(tmp_path):
    from prefloop.demo import PromptSets, _paths, run_config

    bed, prompts = _paths(tmp_path / "bed"), PromptSets.at(tmp_path)
    cfg = DemoConfig(seed=3)
    plain = run_config(cfg, bed, prompts, tmp_path / "a", {"name": "dpo"})
    other = run_config(replace(cfg, training_seed=1003), bed, prompts, tmp_path / "a",
                       {"name": "dpo"})
    assert plain.training.seed == 3 and other.training.seed == 1003
    assert other.sampling.seed == plain.sampling.seed == 3
    assert other.eval.sampling.seed == plain.eval.sampling.seed
    assert replace(cfg, training_seed=1003).build_key() == cfg.build_key()  # same testbed


def test_a_run_can_carry_the_loops_pairing_keys(tmp_path):
    from prefloop.demo import PromptSets, _paths, run_config

    bed, prompts = _paths(tmp_path / "bed"), PromptSets.at(tmp_path)
    spec = {"name": "lr_dpo", "pairing": {"length_penalty": "auto"}}
    cfg = DemoConfig(runs={"ilr-dpo-pairs": spec})
    cfg.validate()
    shaped = run_config(cfg, bed, prompts, tmp_path / "a", spec)
    assert shaped.pairing.length_penalty == "auto" and shaped.loss.name == "lr_dpo"
    assert spec == {"name": "lr_dpo", "pairing": {"length_penalty": "auto"}}  # not consumed
    plain = run_config(cfg, bed, prompts, tmp_path / "a", {"name": "lr_dpo"})
    assert plain.pairing.length_penalty == 0.0
    for bad, message in (({"length_penalty": -1}, r"runs\.r\.pairing\.length_penalty"),
                         ({"colour": 1}, r"runs\.r\.pairing\.colour"),
                         ("auto", r"runs\.r\.pairing: expected a mapping")):
        with pytest.raises(PrefloopError, match=message):
            DemoConfig(runs={"r": {"name": "lr_dpo", "pairing": bad}}).validate()


def test_export_refuses_a_non_empty_directory_before_building(tmp_path, monkeypatch):
    monkeypatch.setattr(demo, "build_testbed", lambda *a, **k: pytest.fail("built"))
    (tmp_path / "tb").mkdir()
    (tmp_path / "tb" / "x").write_text("keep me")
    with pytest.raises(PrefloopError, match="exists and is not empty"):
        demo.export_testbed(DemoConfig(cache_dir=str(tmp_path / "cache")), tmp_path / "tb",
                            progress=False)
    assert (tmp_path / "tb" / "x").read_text() == "keep me"


def test_starting_point_measures_the_sft_policy_and_the_reward_bias(reduced_demo):
    from scipy.stats import spearmanr

    from prefloop.data import read_jsonl
    from prefloop.demo import StartingPoint

    cfg, result = reduced_demo
    run_dir = Path(cfg.out_dir) / "idpo"
    start = StartingPoint.of(run_dir)
    rows = read_jsonl(run_dir / "iter_0" / "eval_samples.jsonl")
    correct = [r for r in rows if r["gold"] == 1.0]
    assert start.gold == pytest.approx(100 * len(correct) / len(rows))
    assert start.gold == pytest.approx(100 * result.metrics["idpo"][0]["gold_accuracy"])
    assert start.spearman_correct == pytest.approx(
        spearmanr([r["num_tokens"] for r in correct], [r["score"] for r in correct])[0])
    assert start.length_cv >= 0.3  # the SFT policy samples a spread of lengths
    assert [ok for _, ok in start.checks()][:2] == [True, True]
    # the reward model's length bias within prompts, on iteration 1's SFT samples
    assert start.same_gold_pairs > 100 and start.longer_preferred > 0.5


def test_reward_correctness_compares_answers_of_equal_word_count():
    from prefloop import testbed

    seen = []

    def knows(prompts, responses):  # the right answer first, the others by length only
        seen.extend(responses)
        return [2.0 * testbed.is_correct(p, r) + 0.01 * len(r) for p, r in
                zip(prompts, responses, strict=True)]

    assert testbed.reward_correctness(knows) == (1.0, 1.0, 32 * 3 * 7, 32 * 3)
    # 32 questions × filler counts 0, 2, 4 × the 8 values of each table; one word count
    # within a case of 8, and the three counts of the filler settings
    assert len(seen) == 32 * 3 * 8
    cases = [seen[i:i + 8] for i in range(0, len(seen), 8)]
    assert all(len({testbed.words(r) for r in case}) == 1 for case in cases)
    assert {testbed.words(case[0]) for case in cases} == {
        4 + sum(testbed.words(f) for f in testbed.FILLERS[:n]) for n in (0, 2, 4)}

    def by_length(prompts, responses):  # a pure length bias sees only ties, which lose
        return [float(testbed.words(r)) for r in responses]

    assert testbed.reward_correctness(by_length)[:2] == (0.0, 0.0)

    def prefers(prompts, responses):  # the right answer, but "paris" above everything
        return [float(testbed.is_correct(p, r)) + 5.0 * ("paris" in r)
                for p, r in zip(prompts, responses, strict=True)]

    # 672 pairs, 96 cases: the 7 capital questions whose answer is not paris lose one pair
    # (to paris) at each of the 3 filler counts, and with it their case
    pairs, first, _, _ = testbed.reward_correctness(prefers)
    assert pairs == pytest.approx(1 - 7 * 3 / (32 * 3 * 7))
    assert first == pytest.approx(1 - 7 * 3 / (32 * 3))
    with pytest.raises(ValueError, match="767 scores for 768 answers"):
        testbed.reward_correctness(lambda p, r: [0.0] * (len(r) - 1))
    with pytest.raises(ValueError, match="at least one filler count"):
        testbed.reward_correctness(knows, fillers=())


def test_starting_point_checks_the_reward_model_on_right_and_wrong_answers(reduced_demo):
    from prefloop.demo import StartingPoint, reward_right

    cfg, result = reduced_demo
    assert result.reward_right == reward_right(result.testbed.reward_model)  # measured on first use
    start = StartingPoint.of(Path(cfg.out_dir) / "idpo", result.reward_right)
    assert StartingPoint.of(Path(cfg.out_dir) / "idpo").reward_right is None
    assert start.reward_right.pairs == 672 and start.reward_right.cases == 96
    text, ok = start.checks()[-1]
    assert text.startswith("reward scores the right answer above a wrong one") and ok
    assert start.reward_right.pair_share >= 0.9
    assert result.checks()[:len(start.checks())] == start.checks()
    weak = replace(start, reward_right=start.reward_right._replace(pair_share=0.856,
                                                                   first_share=0.5))
    assert weak.checks()[-1] == (
        "reward scores the right answer above a wrong one of the same word count in ≥ 90% "
        "of pairs (85.6% of 672; above every wrong one in 50% of 96 question × length "
        "cases, not checked)", False)


def test_lr_dpo_alpha_of_a_demo_run(tmp_path):
    from prefloop.demo import PromptSets, _paths, run_config

    bed, prompts = _paths(tmp_path / "bed"), PromptSets.at(tmp_path)

    def loss_of(cfg: DemoConfig, name: str):
        run = run_config(cfg, bed, prompts, tmp_path / name, cfg.runs[name])
        run.validate()
        return run.loss

    cfg = DemoConfig(runs={"auto": {"name": "lr_dpo"}, "own": {"name": "lr_dpo", "alpha": 0.05},
                           "dpo": {"name": "dpo"}})
    auto = loss_of(cfg, "auto")  # by default α is held at SFT's length
    assert auto.alpha_mode == "target" and "alpha" not in auto.params
    own = loss_of(cfg, "own")  # a run's own α wins over the automatic one
    assert own.alpha_mode == "fixed" and own.params["alpha"] == 0.05
    assert loss_of(cfg, "dpo").alpha_mode == "none" and "alpha" not in loss_of(cfg, "dpo").params
    fixed = loss_of(replace(cfg, alpha=0.07), "auto")
    assert fixed.alpha_mode == "fixed" and fixed.params["alpha"] == 0.07
    assert loss_of(replace(cfg, alpha_mode="per_step"), "auto").alpha_mode == "per_step"


def test_a_demo_run_made_with_other_settings_is_named(tmp_path, monkeypatch):
    import prefloop.loop
    from prefloop.loop import ConfigChanged

    def changed(*a, **k):
        raise ConfigChanged("differs")

    monkeypatch.setattr(demo, "build_testbed", lambda cfg, *a, **k: demo._paths(tmp_path / "b"))
    monkeypatch.setattr(prefloop.loop, "drive", changed)
    with pytest.raises(PrefloopError, match=r"idpo: holds a demo run made with other settings"
                                            r".*give another --out"):
        demo.run_demo(DemoConfig(out_dir=str(tmp_path / "out")), progress=False,
                      echo=lambda *a, **k: None)


def test_longer_preferred_counts_same_prompt_same_gold_pairs():
    from prefloop.demo import longer_preferred
    from prefloop.testbed import CAPITALS

    country, city = next(iter(sorted(CAPITALS.items())))
    wrong = next(c for c in sorted(CAPITALS.values()) if c != city)
    prompt = [{"role": "user", "content": f"What is the capital of {country}?"}]

    def row(pid, answer, tokens, score):
        return {"prompt_id": pid, "prompt": prompt, "response": f"The answer is {answer}.",
                "num_tokens": tokens, "score": score}

    rows = [
        # prompt a: two correct (longer scored higher: 1), one wrong (no same-gold partner)
        row("a", city, 10, 0.5), row("a", city, 20, 0.9), row("a", wrong, 30, 5.0),
        # prompt b: two wrong, longer scored lower (0); a correct pair of equal length
        # (skipped); a correct pair with a score tie (½)
        row("b", wrong, 12, 0.3), row("b", wrong, 25, -0.2),
        row("b", city, 15, 1.0), row("b", city, 15, 2.0),
    ]
    share, n = longer_preferred(rows)
    # pairs: a (10, 20) → 1; b wrong (12, 25) → 0; b correct (15, 15) skipped ⇒ 1 of 2
    assert (share, n) == (0.5, 2)
    rows.append(row("b", city, 40, 1.0))  # a longer correct answer for b
    share, n = longer_preferred(rows)
    # new pairs with b's correct answers: (15 @1.0, 40 @1.0) → ½, (15 @2.0, 40 @1.0) → 0
    assert n == 4 and share == pytest.approx((1 + 0 + 0.5 + 0) / 4)


def test_demo_cli_takes_overrides_after_seeds(monkeypatch, capsys):
    from prefloop.cli import main

    seen = {}

    def fake_run_seeds(cfg, seeds, progress=True):
        seen.update(alpha=cfg.alpha, seeds=seeds)
        raise PrefloopError("stopped before running")

    monkeypatch.setattr(demo, "run_seeds", fake_run_seeds)
    assert main(["demo", "--seeds", "0", "2", "alpha=0.05", "-q"]) == 2
    assert seen == {"alpha": 0.05, "seeds": [0, 2]}
    assert main(["demo", "alpha=0.06"]) == 2
    assert seen == {"alpha": 0.06, "seeds": [0]}
    capsys.readouterr()
    assert main(["demo", "--seeds", "0", "x"]) == 2
    assert "--seeds: 'x' is not an integer" in capsys.readouterr().err


@pytest.mark.parametrize("terminal,flags,progress", [
    (True, [], True), (True, ["-q"], False), (False, [], False), (False, ["-q"], False)])
def test_progress_bars_only_on_a_terminal(terminal, flags, progress, monkeypatch):
    import io
    import sys

    from prefloop.cli import main

    class Stderr(io.StringIO):
        def isatty(self) -> bool:
            return terminal

    seen = {}

    def fake_run_seeds(cfg, seeds, progress=True):
        seen["progress"] = progress
        raise PrefloopError("stopped before running")

    monkeypatch.setattr(demo, "run_seeds", fake_run_seeds)
    monkeypatch.setattr(sys, "stderr", Stderr())
    assert main(["demo", *flags]) == 2
    assert seen == {"progress": progress}
