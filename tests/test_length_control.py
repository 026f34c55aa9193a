"""lr_dpo's α held at a length target (`prefloop.length_control`, `loss.length_control`)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from prefloop.config import TrainConfig, load_config
from prefloop.errors import PrefloopError
from prefloop.length_control import AlphaController, LengthGoal, length_estimates
from prefloop.losses import length_neutral_alpha


def test_length_estimate_of_a_pair_is_its_importance_weighted_length():
    # chosen 10 tokens, rejected 4; h = ln 3 → σ(h) = 3/4: (3·10 + 1·4)/4 = 8.5; at h = 0 7
    est = length_estimates(torch.tensor([math.log(3), 0.0]), torch.tensor([10.0, 10.0]),
                           torch.tensor([4.0, 4.0]))
    assert est.flatten().tolist() == pytest.approx([8.5, 7.0, 7.0, 7.0])


def test_neutral_alpha_with_margins_solves_the_current_step():
    # d = (2, −2), margins m = (−1, 0): 2σ(1 − 2α) − 2σ(2α) = 0 ⇔ 1 − 2α = 2α ⇔ α = 1/4
    d = torch.tensor([2.0, -2.0])
    assert length_neutral_alpha(d, torch.tensor([-1.0, 0.0])) == pytest.approx(0.25)
    # with m = (1, 0) the step already favours the shorter side: no α > 0 is needed
    assert length_neutral_alpha(d, torch.tensor([1.0, 0.0])) == 0.0
    # margins = 0 is the first-step rule
    assert length_neutral_alpha(torch.tensor([4.0, -1.0, 3.0]), torch.zeros(3)) == \
        pytest.approx(length_neutral_alpha(torch.tensor([4.0, -1.0, 3.0])))


GAPS = torch.tensor([6.0, -2.0, 4.0, -3.0])
REJECTED = torch.full((4,), 10.0)  # so the chosen answers are 16, 8, 14, 7 long


def _start(mode: str, goal: LengthGoal | None = None) -> AlphaController:
    return AlphaController.start(mode, REJECTED + GAPS, REJECTED, 0.05, goal)


def _step(ctl: AlphaController, h: list[float], index: list[int] | None = None,
          beta: float = 0.1) -> dict:
    """One optimizer step's update from the pairs at `index` (default: all four)."""
    index = list(range(len(h))) if index is None else index
    return ctl.after_step(torch.tensor(index), torch.tensor(h, dtype=torch.float64), beta)


def test_fixed_and_first_step_alpha_do_not_move():
    fixed, first = _start("fixed"), _start("first_step")
    for ctl in (fixed, first):
        a0 = ctl.alpha
        assert _step(ctl, [30.0, -30.0, 30.0, -30.0]) == {"alpha": a0}
        assert ctl.alpha == a0 and ctl.history == [a0]
    assert fixed.alpha == 0.05 and first.alpha == pytest.approx(length_neutral_alpha(GAPS))


def test_per_step_alpha_is_the_root_over_all_pairs_at_their_latest_margins():
    ctl = _start("per_step")
    assert ctl.alpha == pytest.approx(length_neutral_alpha(GAPS))  # h = 0 at the first step
    _step(ctl, [5.0, -2.0], index=[0, 1])  # pairs 2 and 3 not trained on yet: h = 0
    assert ctl.alpha == pytest.approx(length_neutral_alpha(GAPS, 0.1 * torch.tensor(
        [5.0, -2.0, 0.0, 0.0])))
    _step(ctl, [3.0, 1.0], index=[2, 3])  # pairs 0 and 1 keep the h they had
    assert ctl.alpha == pytest.approx(length_neutral_alpha(GAPS, 0.1 * torch.tensor(
        [5.0, -2.0, 3.0, 1.0])))
    assert len(ctl.history) == 2


def test_target_mode_raises_alpha_when_the_estimate_grows_and_lowers_it_when_it_falls():
    ctl = _start("target", LengthGoal(start=20.0, target=20.0))
    root = length_neutral_alpha(GAPS)
    assert ctl.alpha == pytest.approx(root)  # on target: c = 1
    # h = 0: the estimate is the start, on target: α stays the root
    record = _step(ctl, [0.0] * 4)
    assert record["length_estimate"] == pytest.approx(20.0) and record["length_target"] == 20
    assert ctl.alpha == pytest.approx(root) and ctl.correction == 0
    # the longer winners (pairs 0, 2) strongly preferred, the shorter ones (1, 3) not:
    # ℓ̂ = 10 + d·σ(h) → (16, 10, 14, 10) = 50 against (13, 9, 12, 8.5) = 42.5 at h = 0
    big = 40.0
    record = _step(ctl, [big, -big, big, -big])
    assert record["length_estimate"] == pytest.approx(20 * 50 / 42.5)
    lam = (50 / 42.5 - 1) / 3.75  # η·gap / mean|d|
    assert ctl.correction == pytest.approx(lam)
    margins = 0.1 * torch.tensor([big, -big, big, -big])
    assert ctl.alpha == pytest.approx(length_neutral_alpha(GAPS, margins) + lam)
    for _ in range(300):  # the shorter answers preferred: α falls to 0 and stays ≥ 0
        _step(ctl, [-big, big, -big, big])
        assert ctl.alpha >= 0.0
    assert ctl.alpha == 0.0
    # no wind-up: after 300 steps pushing down, λ waits at −c·root, not 300 steps below it
    assert ctl.root > 0 and ctl.correction == pytest.approx(-ctl.root)


def test_target_mode_corrects_a_drift_measured_before_training():
    # the sampling policy already answers 10 % longer than the target: α is the root times
    # c = 1.1² from the first step on, and stays so while training changes nothing
    ctl = _start("target", LengthGoal(start=22.0, target=20.0))
    assert ctl.alpha == pytest.approx(1.21 * length_neutral_alpha(GAPS))
    _step(ctl, [0.0] * 4)
    assert ctl.correction == 0 and ctl.alpha == pytest.approx(1.21 * length_neutral_alpha(GAPS))
    short = _start("target", LengthGoal(start=18.0, target=20.0))
    assert short.alpha == pytest.approx(0.81 * length_neutral_alpha(GAPS))


def test_the_largest_root_of_a_run_says_whether_the_guard_scale_can_act():
    # what the length guard reads (summary()["root_max"]): s multiplies only c·root
    goal = LengthGoal(start=20.0, target=20.0)
    # every winner shorter: the root is 0 at every step, yet λ lifts α when the estimate
    # grows (losers preferred): α > 0 that no scale changes
    shorter = AlphaController.start("target", torch.tensor([6.0, 8.0]),
                                    torch.tensor([10.0, 12.0]), 0.05, goal)
    for _ in range(3):
        _step(shorter, [-40.0, -40.0])
    summary = shorter.summary()
    assert summary["root_max"] == 0 and summary["alpha_mean"] > 0
    # gaps −10 and +8: no root at h = 0 (α starts at 0), but once the shorter winner is
    # learned (h = 40) the longer one's pull makes the root positive: a scale would act
    mixed = AlphaController.start("target", torch.tensor([10.0, 18.0]),
                                  torch.tensor([20.0, 10.0]), 0.05, goal)
    assert mixed.alpha == 0 and mixed.root_max == 0
    _step(mixed, [40.0, 0.0])
    assert mixed.root > 0 and mixed.summary()["root_max"] == mixed.root
    assert "root_max" not in _start("fixed").summary()


def _cfg(*extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, ["model=m", "data.path=d.jsonl", "output_dir=o",
                                           *extra])


@pytest.mark.parametrize("overrides,message", [
    (["loss.name=dpo", "loss.length_control.mode=target"], "only for lr_dpo"),
    (["loss.alpha=0.05", "loss.length_control.mode=target"], "does not apply"),
    (["loss.length_control.mode=sometimes"], "is not one of target, per_step"),
    (["loss.length_control.target=-3"], "must be ≥ 0"),
    (["loss.length_control.rate=0"], "must be > 0"),
    (["loss.length_control.mode=per_step", "loss.length_control.target=30"], "only for"),
    (["loss.auto_alpha=true", "loss.length_control.mode=target"], "first_step"),
])
def test_length_control_misuse_is_refused(overrides, message):
    with pytest.raises(PrefloopError, match=message):
        _cfg(*overrides).validate()


@pytest.mark.parametrize("overrides,mode", [
    ([], "target"), (["loss.alpha=0.02"], "fixed"), (["loss.auto_alpha=true"], "first_step"),
    (["loss.length_control.mode=per_step"], "per_step"), (["loss.name=dpo"], "none"),
])
def test_the_mode_in_force(overrides, mode):
    cfg = _cfg(*overrides)
    cfg.validate()
    assert cfg.loss.alpha_mode == mode


@pytest.mark.usefixtures("one_torch_thread")
def test_training_records_alpha_and_the_length_estimate_of_every_step(model_dir, tmp_path):
    from prefloop.trainer import train_preferences
    from tests.conftest import mixed_length_pairs, write_jsonl

    data = write_jsonl(tmp_path / "prefs.jsonl", mixed_length_pairs(16))
    cfg = load_config(TrainConfig, None, [
        f"model={model_dir('llama')}", f"data.path={data}", f"output_dir={tmp_path / 'out'}",
        "training.lr=5e-3", "training.batch_size=4", "training.max_steps=6",
        "loss.name=lr_dpo", "loss.length_control.target=5"])
    result = train_preferences(cfg, progress=False)
    log = [json.loads(line) for line in (result.output_dir / "train_log.jsonl").open()]
    assert [r["alpha"] for r in log] == result.alpha_steps and len(log) == 6
    assert all(r["length_target"] == 5 and r["length_estimate"] > 5 for r in log)
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    lc = summary["length_control"]
    # the pairs answer far longer than the 5-token target: c = (L̄/5)² scales the root
    from prefloop.data import load_preferences, tokenize_pairs
    from prefloop.models import load_tokenizer

    pairs, _ = tokenize_pairs(load_preferences(data), load_tokenizer(model_dir("llama")))
    gaps = torch.tensor([float(len(p.chosen_ids) - len(p.rejected_ids)) for p in pairs])
    mean = sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs) / (2 * len(pairs))
    assert lc["start_length"] == pytest.approx(mean)
    assert log[0]["alpha"] == pytest.approx(length_neutral_alpha(gaps) * (mean / 5) ** 2)
    assert lc["mode"] == "target" and lc["target_length"] == 5
    assert lc["alpha_first"] == log[0]["alpha"] and lc["alpha_last"] == log[-1]["alpha"]
