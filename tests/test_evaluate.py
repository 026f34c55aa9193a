"""Tests of prefloop.evaluate: win rate, length-controlled win rate, lengths, KL estimate."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prefloop.errors import PrefloopError
from prefloop.evaluate import (
    ALPACAEVAL_C_GRID,
    kl_estimate,
    length_controlled_win_rate,
    length_feature,
    length_stats,
    preferences,
    win_rate,
)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


# ------------------------------------------------------------------------------- win rate


def test_win_rate_hand_computed():
    # score gaps s_A − s_B = [2, 0, 1]
    # hard: [1, ½ (a draw), 1] → mean 5/6; deviations [1/6, −1/3, 1/6], Σ² = 1/6,
    #       sample var = (1/6)/2 = 1/12, se = √(1/12)/√3 = 1/6.
    wr = win_rate([3.0, 1.0, 1.0], [1.0, 1.0, 0.0])
    assert wr.n == 3
    assert wr.hard == pytest.approx(100 * 5 / 6)
    assert wr.hard_se == pytest.approx(100 / 6)
    # soft: [σ(2), σ(0), σ(1)] = [0.8808, 0.5, 0.7311]
    p = np.array([sigmoid(2.0), 0.5, sigmoid(1.0)])
    se = math.sqrt(np.sum((p - p.mean()) ** 2) / 2) / math.sqrt(3)
    assert wr.soft == pytest.approx(100 * p.mean())
    assert wr.soft_se == pytest.approx(100 * se)
    assert wr.soft == pytest.approx(70.3952, abs=1e-4)


def test_model_against_itself_is_50():
    scores = np.random.default_rng(0).normal(size=50)
    wr = win_rate(scores, scores)
    assert (wr.soft, wr.soft_se, wr.hard, wr.hard_se) == (50.0, 0.0, 50.0, 0.0)
    lengths = np.random.default_rng(1).integers(10, 2000, size=50)
    for fit in ("glm", "alpacaeval"):
        lc = length_controlled_win_rate(preferences(scores, scores), lengths, lengths, fit=fit)
        assert lc.lc == pytest.approx(50.0, abs=1e-6)
        assert lc.win_rate == 50.0


def test_draws_count_half():
    assert preferences([1.0, 2.0, 3.0], [1.0, 2.0, 3.0], "hard").tolist() == [0.5, 0.5, 0.5]
    assert preferences([1.0, 2.0, 3.0], [0.0, 2.0, 4.0], "hard").tolist() == [1.0, 0.5, 0.0]
    assert win_rate([1.0, 2.0], [1.0, 5.0]).hard == pytest.approx(25.0)


def test_single_prompt_has_zero_standard_error():
    wr = win_rate([2.0], [1.0])
    assert wr.hard == 100.0 and wr.hard_se == 0.0 and wr.soft_se == 0.0


def test_win_rate_rejects_bad_input():
    with pytest.raises(PrefloopError, match="scores_b: has 2 elements, expected 3"):
        win_rate([1, 2, 3], [1, 2])
    with pytest.raises(PrefloopError, match="scores_a: is empty"):
        win_rate([], [])
    with pytest.raises(PrefloopError, match="element 1 is nan"):
        win_rate([1.0, float("nan")], [0.0, 0.0])


# ----------------------------------------------------------------- length-controlled win rate


def test_length_feature_uses_sample_std():
    # d = len_B − len_A = [0, 2]: sd(ddof=1) = √2, feature = tanh([0, 2/√2])
    np.testing.assert_allclose(length_feature([5, 5], [5, 7]), np.tanh([0.0, math.sqrt(2.0)]))
    # all differences equal (or a single prompt): no length effect can be identified
    assert length_feature([1, 2, 3], [11, 12, 13]).tolist() == [0.0, 0.0, 0.0]
    assert length_feature([1], [100]).tolist() == [0.0]


@pytest.mark.parametrize("shift", [0, 250])
def test_without_length_variation_lc_equals_raw_win_rate(shift):
    # The length column is 0, so the fit is a logit of a constant: σ(θ_m) = mean(y).
    rng = np.random.default_rng(0)
    y = rng.uniform(size=300)
    lengths = rng.integers(10, 1000, size=300)
    lc = length_controlled_win_rate(y, lengths, lengths + shift)
    assert lc.theta_length == 0.0
    assert lc.lc == pytest.approx(100 * y.mean(), abs=1e-6)
    assert lc.lc == pytest.approx(lc.win_rate, abs=1e-6)


def test_a_always_wins_at_equal_length_gives_about_100():
    lengths = np.arange(100, 300)
    lc = length_controlled_win_rate(np.ones(200), lengths, lengths)
    assert lc.lc > 99.99 and lc.win_rate == 100.0
    assert math.isfinite(lc.theta_model)
    lc = length_controlled_win_rate(np.zeros(200), lengths, lengths)
    assert lc.lc < 0.01


def _judged_pairs(seed: int, n: int = 400, inflation: float = 2.5):
    """A synthetic reward-model judge that likes length.

    A and the baseline B are equally good: latent qualities q_A, q_B ~ N(0, 1) iid per prompt.
    Their response lengths come from the same log-normal, except that B's are multiplied by
    `inflation`. The judge scores s = q + 1.5·log(length), and A's win probability is
    σ(s_A − s_B) — note the judge's length bias is logarithmic, not the GLM's tanh form.
    """
    rng = np.random.default_rng(seed)
    q_a, q_b = rng.normal(size=n), rng.normal(size=n)
    len_a = np.exp(rng.normal(math.log(600), 0.5, size=n))
    len_b = np.exp(rng.normal(math.log(600), 0.5, size=n)) * inflation
    score_a, score_b = q_a + 1.5 * np.log(len_a), q_b + 1.5 * np.log(len_b)
    return preferences(score_a, score_b), len_a, len_b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_longer_baseline_moves_raw_win_rate_not_lc(seed):
    pref, len_a, len_b = _judged_pairs(seed)
    glm = length_controlled_win_rate(pref, len_a, len_b)
    assert abs(glm.win_rate - 50.0) > 15.0  # raw: ~28 %, the judge rewards B's padding
    assert abs(glm.lc - 50.0) < 5.0  # controlled: back near the truth, 50 %
    assert glm.theta_length < 0  # the judge prefers the longer response
    ae = length_controlled_win_rate(pref, len_a, len_b, fit="alpacaeval")
    assert abs(ae.lc - 50.0) < 5.0
    # Without the inflation both numbers sit near 50.
    pref0, len_a0, len_b0 = _judged_pairs(seed, inflation=1.0)
    plain = length_controlled_win_rate(pref0, len_a0, len_b0)
    assert abs(plain.win_rate - 50.0) < 5.0 and abs(plain.lc - 50.0) < 5.0


def _glm_data(seed: int, n: int, theta_len: float, theta_m: float, theta_d: float = 0.0):
    rng = np.random.default_rng(seed)
    len_a, len_b = rng.lognormal(6, 0.5, n), rng.lognormal(6, 0.5, n)
    difficulty = rng.normal(size=n)
    x_len = np.tanh((len_b - len_a) / np.std(len_b - len_a, ddof=1))
    p = sigmoid(theta_len * x_len + theta_m + theta_d * difficulty)
    return rng, p, len_a, len_b, difficulty


def test_glm_recovers_coefficients_from_its_own_soft_labels():
    _, p, len_a, len_b, _ = _glm_data(0, 500, theta_len=-1.0, theta_m=0.5)
    lc = length_controlled_win_rate(p, len_a, len_b)
    assert lc.theta_length == pytest.approx(-1.0, abs=1e-6)
    assert lc.theta_model == pytest.approx(0.5, abs=1e-6)
    assert lc.lc == pytest.approx(100 * sigmoid(0.5), abs=1e-5)
    assert lc.C is None and lc.theta_difficulty is None and lc.fit == "glm"


def test_difficulty_covariate():
    _, p, len_a, len_b, diff = _glm_data(1, 500, theta_len=-0.8, theta_m=0.3, theta_d=-0.7)
    lc = length_controlled_win_rate(p, len_a, len_b, difficulty=diff)
    assert lc.theta_difficulty == pytest.approx(-0.7, abs=1e-6)
    assert lc.theta_model == pytest.approx(0.3, abs=1e-6)
    assert lc.lc == pytest.approx(100 * np.mean(sigmoid(0.3 - 0.7 * diff)), abs=1e-5)


def test_alpacaeval_fit_lands_near_glm_on_a_well_posed_problem():
    rng, p, len_a, len_b, _ = _glm_data(2, 1500, theta_len=-1.0, theta_m=0.5)
    hard = (rng.uniform(size=p.size) < p).astype(float)  # sampled 0/1 judgements
    glm = length_controlled_win_rate(hard, len_a, len_b)
    ae = length_controlled_win_rate(hard, len_a, len_b, fit="alpacaeval")
    assert ae.C in ALPACAEVAL_C_GRID and ae.fit == "alpacaeval"
    assert ae.lc == pytest.approx(glm.lc, abs=1.0)
    assert ae.theta_length == pytest.approx(glm.theta_length, abs=0.1)
    assert glm.lc == pytest.approx(100 * sigmoid(0.5), abs=4.0)  # sampling noise at n=1500


def test_alpacaeval_fit_is_deterministic_and_seeded():
    pref, len_a, len_b = _judged_pairs(3, n=120)
    a = length_controlled_win_rate(pref, len_a, len_b, fit="alpacaeval", seed=7)
    b = length_controlled_win_rate(pref, len_a, len_b, fit="alpacaeval", seed=7)
    assert a == b


@settings(max_examples=25, deadline=None)
@given(
    y=st.lists(st.floats(0.0, 1.0), min_size=2, max_size=40),
    data=st.data(),
)
def test_swapping_a_and_b_gives_100_minus_lc(y, data):
    n = len(y)
    len_a = data.draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))
    len_b = data.draw(st.lists(st.integers(1, 5000), min_size=n, max_size=n))
    y = np.array(y)
    ab = length_controlled_win_rate(y, len_a, len_b)
    ba = length_controlled_win_rate(1.0 - y, len_b, len_a)
    assert 0.0 <= ab.lc <= 100.0
    assert ab.lc + ba.lc == pytest.approx(100.0, abs=1e-4)


def test_lc_rejects_bad_input():
    with pytest.raises(PrefloopError, match=r"preference: element 1 is 1.5"):
        length_controlled_win_rate([0.5, 1.5], [1, 2], [1, 2])
    with pytest.raises(PrefloopError, match="len_b: has 1 elements, expected 2"):
        length_controlled_win_rate([0.5, 0.5], [1, 2], [1])
    with pytest.raises(PrefloopError, match="difficulty: has 3 elements"):
        length_controlled_win_rate([0.5, 0.5], [1, 2], [1, 2], difficulty=[0, 0, 0])
    with pytest.raises(PrefloopError, match="fit: must be 'glm' or 'alpacaeval'"):
        length_controlled_win_rate([0.5, 0.5], [1, 2], [1, 2], fit="ols")  # type: ignore[arg-type]
    with pytest.raises(PrefloopError, match="A always wins"):
        length_controlled_win_rate(np.ones(20), np.arange(20), np.arange(20), fit="alpacaeval")


# ------------------------------------------------------------------- lengths and divergence


def test_length_stats():
    stats = length_stats([10, 20, 60], [40, 80, 240, 1000])
    assert stats == {
        "mean_tokens": 30.0,
        "median_tokens": 20.0,
        "mean_chars": 340.0,
        "median_chars": 160.0,
    }


def test_kl_estimate_hand_computed():
    # lp − l0 = [1, 2, 6]: mean 3, sample var ((−2)² + (−1)² + 3²)/2 = 7, se = √7/√3
    mean, se = kl_estimate([-9.0, -8.0, -4.0], [-10.0, -10.0, -10.0])
    assert mean == pytest.approx(3.0)
    assert se == pytest.approx(math.sqrt(7.0 / 3.0))
    assert kl_estimate([-1.0], [-1.5]) == (0.5, 0.0)
    assert kl_estimate([-3.0, -2.0], [-3.0, -2.0]) == (0.0, 0.0)
    with pytest.raises(PrefloopError, match="initial_logps: has 1 elements, expected 2"):
        kl_estimate([-1.0, -2.0], [-1.0])
