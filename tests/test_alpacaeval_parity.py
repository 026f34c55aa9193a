"""prefloop's ``fit="alpacaeval"`` LC against alpaca_eval's own length-controlled win rate.

Runs only where ``alpaca_eval`` (0.6.6, the ``compare`` extra) is importable. Each case is a
synthetic set of judgements of a model A against a baseline B on the same prompts, given to
``alpaca_eval.metrics.glm_winrate.get_length_controlled_winrate`` as AlpacaEval annotations
(B is ``output_1``/``generator_1``, A ``output_2``/``generator_2``; preference 1 = B wins,
2 = A wins, a soft value in between, 0 or 1.5 a draw) and to prefloop as arrays. alpaca_eval
reads the instruction difficulties and its verbose/concise ("gamed") baseline rows from a
file it downloads from the Hugging Face Hub (``df_gamed.csv``); the test writes that file
from the case's own data and points the download at it, so nothing leaves the machine.

Compared: the LC win rate (within 1e-3 points; it agrees to ~1e-12), the raw win rate, the
fitted coefficients (alpaca_eval's saved weights) and AlpacaEval's "very different from the
raw one" warning against prefloop's.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

glm = pytest.importorskip("alpaca_eval.metrics.glm_winrate")
pd = pytest.importorskip("pandas")

from prefloop.evaluate import (  # noqa: E402  (after the skip)
    ALPACAEVAL_FOLDS,
    ALPACAEVAL_REGULARIZE_LAMBDA,
    length_controlled_win_rate,
)

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

LC_TOLERANCE = 1e-3  # LC points
LENGTH, DIFFICULTY, MODEL = (
    "np.tanh(std_delta_len)", "instruction_difficulty", "not_gamed_baseline.astype(float)")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def _length_term(len_a: np.ndarray, len_b: np.ndarray) -> np.ndarray:
    """tanh((len_B − len_A) / sd): the GLM's own length covariate, so the judge is in-model."""
    d = len_b - len_a
    return np.tanh(d / d.std(ddof=1))


@dataclass
class Case:
    """One model A against baseline B: preference (P(A wins), ½ for a draw), integer lengths
    in characters, optional difficulty, optional verbose/concise sets (pref, len_a, len_b)."""

    pref: np.ndarray
    len_a: np.ndarray
    len_b: np.ndarray
    difficulty: np.ndarray | None = None
    baselines: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=list)


def _make_case(kind: str, seed: int, n: int = 150, difficulty: bool = False,
               baselines: bool = False, draws: bool = False) -> Case:
    """A judge with P(A wins on i) = σ(q − 1.0·tanh(d_i/sd) − 0.5·difficulty_i) (it likes
    length), on lengths of one of these kinds:

    - ``longer-only``: A as good as B (q = 0), its answers 1.2–2× B's on every prompt;
    - ``disjoint``: A at 600–800 characters, B at 15–25 (the issue's 712 vs 20), q = 0.3;
    - ``shorter-and-better``: A 0.5–1.1× B's length and better, q = 0.6;
    - ``mixed``: independent lengths, q = 0.2;
    - ``always-wins``: A wins every prompt outright (preference 1).

    ``draws``: hard 0/1 judgements drawn from that probability, 15 % of prompts a draw (½).
    ``baselines``: B prompted to be verbose (×1.8) and concise (×0.6), as good as B (q = 0).
    """
    rng = np.random.default_rng(seed)
    len_b = rng.integers(300, 1500, n)
    quality = {"longer-only": 0.0, "disjoint": 0.3, "shorter-and-better": 0.6}.get(kind, 0.2)
    if kind == "longer-only":
        len_a = np.round(len_b * rng.uniform(1.2, 2.0, n)).astype(int)
    elif kind == "disjoint":
        len_a, len_b = rng.integers(600, 800, n), rng.integers(15, 25, n)
    elif kind == "shorter-and-better":
        len_a = np.round(len_b * rng.uniform(0.5, 1.1, n)).astype(int)
    else:
        len_a = rng.integers(300, 1500, n)
    diff = rng.normal(size=n)
    offset = -0.5 * diff if difficulty else np.zeros(n)

    def judge(q: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        p = _sigmoid(q - 1.0 * _length_term(a, b) + offset)
        if not draws:
            return p
        hard = (rng.uniform(size=n) < p).astype(float)
        return np.where(rng.uniform(size=n) < 0.15, 0.5, hard)

    pref = np.ones(n) if kind == "always-wins" else judge(quality, len_a, len_b)
    sets = []
    if baselines:
        for factor in (1.8, 0.6):
            prompted = np.round(len_b * factor * rng.uniform(0.8, 1.2, n)).astype(int)
            sets.append((judge(0.0, prompted, len_b), prompted, len_b))
    return Case(pref, len_a, len_b, diff if difficulty else None, sets)


def _annotations(case: Case, rng: np.random.Generator) -> pd.DataFrame:
    """The case as AlpacaEval annotations; half the draws coded 0, half 1.5 (both mean ½)."""
    pref = 1.0 + case.pref
    draw = case.pref == 0.5
    pref[draw & (rng.uniform(size=pref.size) < 0.5)] = 0.0
    return pd.DataFrame({
        "preference": pref,
        "output_1": ["x" * int(k) for k in case.len_b],
        "output_2": ["x" * int(k) for k in case.len_a],
        "generator_1": "baseline",
        "generator_2": "model",
        "annotator": "synthetic_judge",
    })


def _gamed_file(case: Case, path: Path) -> Path:
    """alpaca_eval's ``df_gamed.csv`` for this case.

    alpaca_eval looks an instruction's difficulty up by the row label of the file's first
    row of that instruction, so the first set's rows are instructions 0..n−1 in order (a
    placeholder set when the case has none). Each gamed row carries its standardised length
    difference (len_B − len_prompted)/sd, sd over its own set (prefloop's convention).
    """
    n = case.pref.size
    diff = case.difficulty if case.difficulty is not None else np.zeros(n)
    sets = case.baselines or [(np.full(n, 0.5), case.len_b, case.len_b)]
    frames = []
    for k, (pref, len_a, len_b) in enumerate(sets):
        d = (len_b - len_a).astype(float)
        sd = d.std(ddof=1)
        frames.append(pd.DataFrame({
            "model": f"gamed_{k}",
            "index": np.arange(n),
            "preference": pref,
            "std_delta_len": d / sd if sd > 0 else d,
            "instruction_difficulty": diff,
            "not_gamed_baseline": False,
        }))
    pd.concat(frames).to_csv(path, index=False)
    return path


def _alpaca_eval(case: Case, tmp_path: Path, monkeypatch, caplog) -> tuple[dict, pd.Series, bool]:
    """alpaca_eval's metrics, its fitted weights and whether it warned of an extreme change."""
    gamed = _gamed_file(case, tmp_path / "df_gamed.csv")
    monkeypatch.setattr(glm, "hf_hub_download", lambda **_: str(gamed))
    with_d, with_reg = case.difficulty is not None, bool(case.baselines)
    glm_name = {(True, True): "length_controlled_v1", (True, False): "length_controlled_noreg",
                (False, False): "length_controlled_minimal"}.get((with_d, with_reg))
    glm_info = None
    if glm_name is None:  # regularised without difficulty: the minimal formula with v1's λ
        glm_name = "length_controlled_minimal"
        glm_info = dict(glm.GLM_INFO[glm_name], regularize_to_baseline_lambda=glm.GLM_INFO[
            "length_controlled_v1"]["regularize_to_baseline_lambda"])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        metrics = glm.get_length_controlled_winrate(
            _annotations(case, np.random.default_rng(0)), glm_name=glm_name, glm_info=glm_info,
            save_weights_dir=tmp_path / "weights")
    weights = pd.read_csv(tmp_path / "weights" / glm_name / "baseline_baseline.csv", index_col=0)
    warned = any("very different from the raw one" in r.getMessage() for r in caplog.records)
    return metrics, weights.loc["model"], warned


KINDS = ["longer-only", "disjoint", "shorter-and-better", "mixed"]
CASES = [
    pytest.param(kind, difficulty, baselines, draws,
                 id=f"{kind}{'-difficulty' * difficulty}{'-baselines' * baselines}"
                    f"{'-draws' * draws}")
    for kind in KINDS
    for difficulty in (False, True)
    for baselines in (False, True)
    for draws in (False, True)
] + [pytest.param("always-wins", False, False, False, id="always-wins")]


@pytest.mark.parametrize(("kind", "difficulty", "baselines", "draws"), CASES)
def test_lc_matches_alpaca_eval(kind, difficulty, baselines, draws, tmp_path, monkeypatch,
                                caplog):
    case = _make_case(kind, seed=len(kind), difficulty=difficulty, baselines=baselines,
                      draws=draws)
    metrics, weights, warned = _alpaca_eval(case, tmp_path, monkeypatch, caplog)
    ours = length_controlled_win_rate(case.pref, case.len_a, case.len_b, case.difficulty,
                                      fit="alpacaeval", regularize_to=case.baselines)
    assert ours.lc == pytest.approx(metrics["length_controlled_winrate"], abs=LC_TOLERANCE)
    assert ours.win_rate == pytest.approx(metrics["win_rate"], abs=1e-9)
    assert ours.theta_length == pytest.approx(weights[LENGTH], abs=1e-6)
    assert ours.theta_model == pytest.approx(weights[MODEL], abs=1e-6)
    if difficulty:
        assert ours.theta_difficulty == pytest.approx(weights[DIFFICULTY], abs=1e-6)
    assert warned == any("far from the raw win rate" in w for w in ours.warnings)
    assert math.isfinite(ours.lc) and ours.fit == "alpacaeval"


def test_constants_are_alpaca_evals():
    for name in ("length_controlled_v1", "length_controlled_noreg", "length_controlled_minimal"):
        assert glm.GLM_INFO[name]["kwargs"]["n_splits"] == ALPACAEVAL_FOLDS
    v1 = glm.GLM_INFO["length_controlled_v1"]
    assert v1["regularize_to_baseline_lambda"] == ALPACAEVAL_REGULARIZE_LAMBDA
