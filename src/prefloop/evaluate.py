"""Evaluation metrics: win rate, length-controlled win rate, length statistics, KL estimate.

Pure functions over numbers (numpy arrays or sequences) and over response rows (dicts);
nothing here runs a model. The loop samples responses from the policy π_t and the baseline
(usually the initial policy π₀) on the same evaluation prompts, scores both with the reward
model (the judge), and passes the scores, lengths and log-probabilities here; ``prefloop
evaluate`` matches response files by ``prompt_id`` with :func:`pair_by_prompt` and reads a
per-prompt covariate with :func:`prompt_numbers`.

Conventions (METHODS.md, "Evaluation"):

- model A is the one evaluated, B the baseline; ``s_A,i`` and ``s_B,i`` are the judge's scores
  of the two responses to prompt ``i``; ``σ`` is the logistic function;
- every rate (win rate, its standard error, LC win rate) is reported in **percent, 0..100**,
  the unit of ``metrics.jsonl`` and of AlpacaEval's leaderboard;
- standard errors are the sample standard deviation (ddof=1) over prompts divided by √n, and 0
  when n = 1;
- lengths for the length-controlled win rate are in characters by convention (AlpacaEval's
  unit), but any unit works: the length difference is standardised before use.

Bad input (empty or mismatched arrays, non-finite values, preferences outside [0, 1]) raises
:class:`prefloop.errors.PrefloopError` naming the argument.

``scipy`` is needed for :func:`length_controlled_win_rate` and ``scikit-learn`` for its
``fit="alpacaeval"``; both are imported only when used.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from numpy.typing import ArrayLike

from prefloop.errors import PrefloopError, where

__all__ = [
    "ALPACAEVAL_C_GRID",
    "ALPACAEVAL_FOLDS",
    "ALPACAEVAL_MAX_ITER",
    "ALPACAEVAL_RANDOM_STATE",
    "ALPACAEVAL_REGULARIZE_LAMBDA",
    "ALPACAEVAL_TOL",
    "LCWinRate",
    "RegularizationRows",
    "WinRate",
    "alpacaeval_folds",
    "format_rate",
    "is_extreme_change",
    "kl_estimate",
    "lc_warnings",
    "length_controlled_win_rate",
    "length_feature",
    "length_stats",
    "pair_by_prompt",
    "preferences",
    "prompt_numbers",
    "prompted_baseline_rows",
    "response_chars",
    "win_rate",
    "win_rate_from_preferences",
]

#: Inverse L1 strengths AlpacaEval's fit chooses among: 10 values log-spaced over [1e-4, 1e4].
ALPACAEVAL_C_GRID: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 4, 10))
#: Folds of the prompt-grouped cross-validation that picks C.
ALPACAEVAL_FOLDS = 5
#: liblinear's stopping tolerance and iteration limit in AlpacaEval's fit: scikit-learn's
#: LogisticRegressionCV defaults, which AlpacaEval keeps.
ALPACAEVAL_TOL = 1e-4
ALPACAEVAL_MAX_ITER = 100
#: AlpacaEval's random_state; it seeds liblinear, which shuffles the coordinates it descends.
ALPACAEVAL_RANDOM_STATE = 123
# AlpacaEval clips predicted probabilities to [ε, 1 − ε] in its cross-validation log-loss.
_LOGLOSS_EPS = 1e-15
# The unregularised fit has no finite optimum when the data are separable (e.g. A wins every
# prompt): coefficients are bounded here so the fit stays finite; σ(50) = 1 − 2e-22.
_THETA_BOUND = 50.0

FitMethod = Literal["glm", "alpacaeval"]


# --------------------------------------------------------------------------------- helpers


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = ½(1 + tanh(z/2)): no overflow for any z, and σ(0) = ½ exactly."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _as_1d(name: str, values: ArrayLike, n: int | None = None) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise PrefloopError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
    if arr.size == 0:
        raise PrefloopError(f"{name}: is empty; need at least one prompt")
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise PrefloopError(f"{name}: element {bad[0]} is {arr[bad[0]]}, expected a finite number")
    if n is not None and arr.size != n:
        raise PrefloopError(f"{name}: has {arr.size} elements, expected {n} (one per prompt)")
    return arr


def mean_se(values: ArrayLike) -> tuple[float, float]:
    """Mean and standard error std(x, ddof=1)/√n (0 when n = 1)."""
    x = np.asarray(values, dtype=np.float64)
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def _row_log_loss(y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Per row, −[y·log σ(z) + (1−y)·log(1−σ(z))], computed from the logit z without overflow.

    This is the log-loss of a row's two duplicated copies (label 1 with weight y, label 0
    with weight 1−y) added together.
    """
    return y * np.logaddexp(0.0, -z) + (1.0 - y) * np.logaddexp(0.0, z)


# ------------------------------------------------------------------------------- win rate


@dataclass(frozen=True)
class WinRate:
    """Win rate of A against B, in percent (0..100), with standard errors in percent.

    - ``soft``: mean_i σ(s_A,i − s_B,i) · 100;
    - ``hard``: mean_i (1[s_A,i > s_B,i] + ½·1[s_A,i = s_B,i]) · 100 (draws count ½);
    - ``*_se``: std_i(·, ddof=1)/√n · 100, 0 when n = 1;
    - ``n``: number of prompts.
    """

    soft: float
    soft_se: float
    hard: float
    hard_se: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def preferences(
    scores_a: ArrayLike, scores_b: ArrayLike, kind: Literal["soft", "hard"] = "soft"
) -> np.ndarray:
    """Per-prompt probability that the judge prefers A's response over B's.

    - ``kind="soft"``: p_i = σ(s_A,i − s_B,i) (Bradley–Terry reading of reward-model scores);
    - ``kind="hard"``: p_i = 1[s_A,i > s_B,i] + ½·1[s_A,i = s_B,i].

    Identical scores give exactly ½ either way. The result is the ``preference`` argument of
    :func:`length_controlled_win_rate`.
    """
    a = _as_1d("scores_a", scores_a)
    b = _as_1d("scores_b", scores_b, a.size)
    if kind == "soft":
        return _sigmoid(a - b)
    if kind == "hard":
        return (a > b).astype(np.float64) + 0.5 * (a == b)
    raise PrefloopError(f"kind: must be 'soft' or 'hard', got {kind!r}")


def win_rate(scores_a: ArrayLike, scores_b: ArrayLike) -> WinRate:
    """Win rate of model A against baseline B judged by scores on the same prompts.

    Per prompt i, soft ``p_i = σ(s_A,i − s_B,i)`` and hard
    ``h_i = 1[s_A,i > s_B,i] + ½·1[s_A,i = s_B,i]``; each is reported as mean · 100 with the
    standard error ``std(ddof=1)/√n · 100`` (0 for a single prompt). A model against itself
    (equal scores) gets exactly 50 ± 0.
    """
    soft, soft_se = mean_se(preferences(scores_a, scores_b, "soft"))
    hard, hard_se = mean_se(preferences(scores_a, scores_b, "hard"))
    return WinRate(
        soft=100.0 * soft,
        soft_se=100.0 * soft_se,
        hard=100.0 * hard,
        hard_se=100.0 * hard_se,
        n=int(np.asarray(scores_a).size),
    )


def win_rate_from_preferences(preference: ArrayLike) -> WinRate:
    """Win rate of A from per-prompt preferences p_i ∈ [0, 1] (1 = A better), e.g. an LLM
    judge's.

    ``soft`` = mean_i p_i · 100 and ``hard`` = mean_i (1[p_i > ½] + ½·1[p_i = ½]) · 100, each
    with the standard error std(ddof=1)/√n · 100 (0 for a single prompt), as in
    :func:`win_rate`, whose ``soft`` is this function's on p_i = σ(s_A,i − s_B,i).
    """
    p = _preference_array("preference", preference)
    soft, soft_se = mean_se(p)
    hard, hard_se = mean_se((p > 0.5).astype(np.float64) + 0.5 * (p == 0.5))
    return WinRate(soft=100.0 * soft, soft_se=100.0 * soft_se, hard=100.0 * hard,
                   hard_se=100.0 * hard_se, n=int(p.size))


# ---------------------------------------------------------------- length-controlled win rate


@dataclass(frozen=True)
class LCWinRate:
    """Length-controlled win rate of A against B (AlpacaEval 2's GLM), in percent.

    - ``lc``: mean_i σ(θ_m [+ θ_d·difficulty_i]) · 100, the win rate the fitted model predicts
      at equal lengths;
    - ``win_rate``: mean_i preference_i · 100, the raw (not length-controlled) win rate;
    - ``theta_length``, ``theta_model``, ``theta_difficulty``: the fitted coefficients
      (``theta_difficulty`` is None without a difficulty covariate). ``theta_length`` < 0 means
      the judge prefers longer responses (the feature is tanh of len_B − len_A);
    - ``C``: the inverse L1 strength chosen by cross-validation (``fit="alpacaeval"``), None for
      the unregularised fit;
    - ``n``: number of prompts; ``fit``: which fit produced it;
    - ``n_regularization``: number of verbose/concise-baseline rows in the fit (0 without);
    - ``warnings``: one sentence per reason to distrust ``lc`` (see :func:`lc_warnings`, and
      liblinear's iteration limit for ``fit="alpacaeval"``); empty when there is none.
    """

    lc: float
    win_rate: float
    theta_length: float
    theta_model: float
    theta_difficulty: float | None
    C: float | None
    n: int
    fit: str
    n_regularization: int = 0
    warnings: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, float | int | str | tuple[str, ...] | None]:
        return asdict(self)


def length_feature(len_a: ArrayLike, len_b: ArrayLike) -> np.ndarray:
    """The GLM's length covariate ``tanh(d_i / sd(d))`` with ``d_i = len_B,i − len_A,i``.

    ``sd`` is the sample standard deviation over prompts (ddof=1). ``d`` is scaled, not
    centred. When sd is 0 (all differences equal, a single prompt included) the length effect
    cannot be told apart from the model term, and the feature is 0 everywhere.
    """
    a = _as_1d("len_a", len_a)
    b = _as_1d("len_b", len_b, a.size)
    d = b - a
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    if not sd > 0.0:
        return np.zeros_like(d)
    return np.tanh(d / sd)


def _fit_glm(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Unregularised maximum likelihood of P(win) = σ(xᵀθ) with soft labels y and row weights w.

    Minimises L(θ) = Σ_i w_i·[y_i·softplus(−z_i) + (1−y_i)·softplus(z_i)] / Σ_i w_i, z = Xθ,
    whose gradient is Xᵀ(w ⊙ (σ(z) − y))/Σw; this is the log-likelihood of the duplicated rows
    (label 1 with weight w_i·y_i, label 0 with weight w_i·(1−y_i)). Coefficients are bounded
    to ±50 so that separable data (e.g. A wins every prompt) give a finite fit with σ(θ) ≈ 0
    or 1.
    """
    from scipy.optimize import minimize

    k = x.shape[1]
    wn = w / w.sum()  # (N,) normalised weights: the objective is a weighted mean

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = x @ theta
        return float(wn @ _row_log_loss(y, z)), x.T @ (wn * (_sigmoid(z) - y))

    result = minimize(
        objective,
        np.zeros(k),
        jac=True,
        method="L-BFGS-B",
        bounds=[(-_THETA_BOUND, _THETA_BOUND)] * k,
        options={"maxiter": 10_000, "ftol": 1e-15, "gtol": 1e-12},
    )
    theta = result.x
    # Two Newton steps polish the optimum where it is interior and the Hessian is invertible;
    # L-BFGS-B stops at ~1e-8 in θ, Newton takes it to machine precision.
    for _ in range(2):
        z = x @ theta
        p = _sigmoid(z)
        grad = x.T @ (wn * (p - y))
        hess = (x * (wn * p * (1.0 - p))[:, None]).T @ x
        if np.linalg.cond(hess) > 1e10 or np.any(np.abs(theta) >= _THETA_BOUND - 1.0):
            break
        theta = np.clip(theta - np.linalg.solve(hess, grad), -_THETA_BOUND, _THETA_BOUND)
    return theta


def alpacaeval_folds(n: int, k: int = ALPACAEVAL_FOLDS) -> list[np.ndarray]:
    """Held-out rows of each fold of AlpacaEval's cross-validation, in fold order.

    AlpacaEval splits with scikit-learn's ``GroupKFold`` (no shuffling) and one group per row
    (a row's two duplicated label rows stay together); this asks the installed scikit-learn's
    ``GroupKFold`` for the same split of rows 0..n−1. GroupKFold deals the groups, largest
    first, each to the fold holding the fewest samples so far (ties to the lower fold). All
    groups here have the same size, so the order among them decides: scikit-learn ≥ 1.9 sorts
    ties stably, which puts row i in fold (n − 1 − i) mod k (the last row in fold 0, the one
    before it in fold 1, …); older versions broke the ties with numpy's unstable argsort,
    whose order varies between installs, and asking GroupKFold keeps prefloop on the order
    that alpaca_eval gets beside it. Each fold's rows are ascending.
    """
    from sklearn.model_selection import GroupKFold

    if not 2 <= k <= n:
        raise PrefloopError(f"alpacaeval_folds: need 2 ≤ k ≤ n, got k={k}, n={n}")
    rows = np.arange(n)
    return [test for _, test in GroupKFold(n_splits=k).split(rows[:, None], groups=rows)]


def _l1_logistic(
    x: np.ndarray, y: np.ndarray, w: np.ndarray, c: float, random_state: np.random.RandomState
) -> tuple[np.ndarray, bool]:
    """L1-penalised logistic regression without intercept (liblinear) on soft labels.

    Minimises ‖θ‖₁ + C·Σ_rows weight·logloss over the duplicated rows: rows 1..N label 1
    with weight w_i·y_i, then rows N+1..2N label 0 with weight w_i·(1−y_i), rows of weight 0
    kept, as AlpacaEval lays them out. liblinear runs with AlpacaEval's tolerance
    :data:`ALPACAEVAL_TOL` and iteration limit :data:`ALPACAEVAL_MAX_ITER`; its seed (it
    shuffles the coordinates it descends) is the next draw of ``random_state``. Returns θ and
    whether liblinear stopped before its iteration limit.
    """
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    m = y.size
    # scikit-learn ≥ 1.8 spells the L1 penalty l1_ratio=1 and deprecates `penalty`.
    major, minor = (int(v) for v in sklearn.__version__.split(".")[:2])
    penalty = {"l1_ratio": 1.0} if (major, minor) >= (1, 8) else {"penalty": "l1"}
    model = LogisticRegression(
        C=c,
        solver="liblinear",
        fit_intercept=False,
        tol=ALPACAEVAL_TOL,
        max_iter=ALPACAEVAL_MAX_ITER,
        random_state=random_state,
        **penalty,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported by the caller
        model.fit(
            np.concatenate([x, x]),
            np.concatenate([np.ones(m), np.zeros(m)]),
            sample_weight=np.concatenate([w * y, w * (1.0 - y)]),
        )
    converged = int(np.max(model.n_iter_)) < ALPACAEVAL_MAX_ITER
    return model.coef_.ravel().astype(np.float64), converged


def _fold_score(y: np.ndarray, w: np.ndarray, z: np.ndarray) -> float:
    """AlpacaEval's held-out score of a fold (higher is better): minus its mean weighted soft
    log-loss,

        mean_i w_i·[y_i·log p_i + (1−y_i)·log(1−p_i)],  p_i = clip(σ(z_i), 1e-15, 1 − 1e-15).
    """
    from scipy.special import expit

    p = np.clip(expit(z), _LOGLOSS_EPS, 1.0 - _LOGLOSS_EPS)
    return float(np.mean(w * (y * np.log(p) + (1.0 - y) * np.log(1.0 - p))))


def _fit_alpacaeval(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, float, int]:
    """AlpacaEval's fit: C by row-grouped k-fold CV on the soft log-loss, then a full refit.

    The folds are :func:`alpacaeval_folds` (k = min(5, N) over all N rows, regularisation rows
    included). In each fold, liblinear is fitted on the other folds' rows for every C of
    :data:`ALPACAEVAL_C_GRID` in increasing order, seeded by successive draws of
    ``RandomState(123)`` (one fresh stream per fold, as scikit-learn's LogisticRegressionCV
    does), and the fold is scored by :func:`_fold_score`. The C whose scores summed over the
    folds are largest wins (ties to the smaller C), and the model is refitted on every row
    with that C, seeded by the first draw of ``RandomState(123)``. Returns θ, C and the number
    of liblinear fits (of k·10 + 1) that hit the iteration limit.
    """
    n = y.size
    k = min(ALPACAEVAL_FOLDS, n)
    if k < 2:
        raise PrefloopError("fit='alpacaeval': cross-validation needs at least 2 prompts")
    scores = np.zeros(len(ALPACAEVAL_C_GRID))
    unconverged = 0
    for test in alpacaeval_folds(n, k):
        train = np.setdiff1d(np.arange(n), test)
        seeds = np.random.RandomState(ALPACAEVAL_RANDOM_STATE)
        for j, c in enumerate(ALPACAEVAL_C_GRID):
            theta, converged = _l1_logistic(x[train], y[train], w[train], c, seeds)
            scores[j] += _fold_score(y[test], w[test], x[test] @ theta)
            unconverged += not converged
    best = ALPACAEVAL_C_GRID[int(np.argmax(scores))]
    seeds = np.random.RandomState(ALPACAEVAL_RANDOM_STATE)
    theta, converged = _l1_logistic(x, y, w, best, seeds)
    return theta, best, unconverged + (not converged)


#: AlpacaEval's weight λ of the verbose/concise baseline rows, shared among the sets given.
ALPACAEVAL_REGULARIZE_LAMBDA = 0.2

#: One set of regularisation rows: (preference, len_a, len_b) or (…, difficulty), where A is
#: the baseline prompted to be verbose (or concise) and B the baseline itself.
RegularizationRows = (
    tuple[ArrayLike, ArrayLike, ArrayLike] | tuple[ArrayLike, ArrayLike, ArrayLike, ArrayLike]
)


def _preference_array(name: str, values: ArrayLike) -> np.ndarray:
    y = _as_1d(name, values)
    bad = np.flatnonzero((y < 0.0) | (y > 1.0))
    if bad.size:
        i = int(bad[0])
        raise PrefloopError(f"{name}: element {i} is {y[i]}, expected a probability in [0, 1]")
    return y


def _regularization_design(
    sets: Sequence[RegularizationRows], n: int, difficulty: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Design rows (M, 2 or 3) and labels (M,) of the verbose/concise-baseline comparisons.

    Set k's rows are [tanh(d_kj / sd(d_k)), difficulty_kj?, 0]: their own standardised length
    difference, the difficulty of their prompt, and a model column of 0 (the prompted
    baseline is the baseline, so its quality term is pinned to 0).
    """
    xs, ys = [], []
    for k, rows in enumerate(sets):
        name = f"regularize_to[{k}]"
        if not isinstance(rows, tuple | list) or len(rows) not in (3, 4):
            raise PrefloopError(
                f"{name}: expected (preference, len_a, len_b) or (…, difficulty), got "
                f"{type(rows).__name__} of length {len(rows) if hasattr(rows, '__len__') else '?'}"
            )
        y = _preference_array(f"{name}.preference", rows[0])
        m = y.size
        cols = [length_feature(_as_1d(f"{name}.len_a", rows[1], m),
                               _as_1d(f"{name}.len_b", rows[2], m))]
        if difficulty is not None:
            if len(rows) == 4:
                cols.append(_as_1d(f"{name}.difficulty", rows[3], m))
            elif m == n:  # the same prompts, in the same order, as the model's rows
                cols.append(difficulty)
            else:
                raise PrefloopError(
                    f"{name}: has {m} rows, not one per prompt ({n}), so it needs its own "
                    "difficulty as a fourth element"
                )
        elif len(rows) == 4:
            raise PrefloopError(f"{name}: gives a difficulty but the model's rows have none")
        cols.append(np.zeros(m))
        xs.append(np.stack(cols, axis=1))
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def length_controlled_win_rate(
    preference: ArrayLike,
    len_a: ArrayLike,
    len_b: ArrayLike,
    difficulty: ArrayLike | None = None,
    fit: FitMethod = "glm",
    regularize_to: Sequence[RegularizationRows] = (),
    regularize_lambda: float = ALPACAEVAL_REGULARIZE_LAMBDA,
) -> LCWinRate:
    """Length-controlled win rate of A against B (AlpacaEval 2's GLM, METHODS.md).

    Per prompt i: ``y_i`` = ``preference[i]``, the judge's probability that A wins (soft or
    hard; a draw is ½), and ``d_i = len_B,i − len_A,i`` scaled by its sample standard deviation
    (ddof=1) over prompts (see :func:`length_feature`). The model, without intercept, is

        P(A wins on i) = σ(θ_len·tanh(d_i / sd(d)) + θ_m [+ θ_d·difficulty_i])

    fitted by logistic regression with soft labels: each prompt is two rows, label 1 with
    weight y_i and label 0 with weight 1 − y_i. The result is the win rate predicted at equal
    lengths (d_i = 0):

        LC = mean_i σ(θ_m [+ θ_d·difficulty_i]) · 100.

    ``fit="glm"`` (default) is unregularised maximum likelihood. ``fit="alpacaeval"``
    reproduces alpaca_eval 0.6.6's ``get_length_controlled_winrate`` (checked by
    ``tests/test_alpacaeval_parity.py``): L1-penalised (liblinear, no intercept, every
    coefficient penalised, tolerance 1e-4, at most 100 iterations, seeded from random_state
    123) with C chosen among 10 values log-spaced over [1e-4, 1e4] by 5-fold cross-validation
    grouped by row in scikit-learn's ``GroupKFold`` order and scored by the (weighted) soft
    log-loss; see :func:`_fit_alpacaeval` and :func:`alpacaeval_folds`. Its columns are in
    AlpacaEval's order [length, difficulty?, model] and, with ``regularize_to``, its rows too:
    the baseline sets' rows first, then the model's. When A wins (or loses) every prompt, the
    other label's rows have weight 0 and the L1 penalty keeps θ finite, as in AlpacaEval.

    ``warnings`` in the result lists reasons to distrust LC (:func:`lc_warnings`): lengths
    that cannot separate length from model, or an LC far from the raw win rate.

    ``difficulty`` is an optional per-prompt covariate (AlpacaEval's instruction difficulty,
    estimated beforehand from many models' comparisons); prefloop does not estimate it.

    **Regularisation toward the baseline** (``regularize_to``). A model that is only longer
    than the baseline has a length difference that barely varies across prompts, so the
    length term and the model term are nearly collinear and the fit can credit the model with
    what is really the judge's length bias. AlpacaEval 2 pins the length slope with extra rows
    in which the *baseline* is compared with versions of itself prompted to be verbose and
    concise (same judge): these rows share θ_len (and θ_d) with the model's rows but have no
    model term, since a prompted baseline is by assumption as good as the baseline, so any
    preference in them is attributed to length. Each set k of m_k rows
    ``(preference, len_a, len_b[, difficulty])`` — A the prompted baseline, B the baseline —
    adds rows

        P(A wins on j) = σ(θ_len·tanh(d_kj / sd(d_k)) [+ θ_d·difficulty_kj])

    with weight λ/K each (K = number of sets) against weight 1 for the model's rows; λ =
    ``regularize_lambda`` = 0.2 as in AlpacaEval. LC is still averaged over the model's
    prompts only. This is the form of ``tatsu-lab/alpaca_eval``,
    ``src/alpaca_eval/metrics/glm_winrate.py`` (GLM ``length_controlled_v1``: formula
    ``tanh(std_delta_len) + instruction_difficulty + not_gamed_baseline − 1``,
    ``regularize_to_baseline_lambda = 0.2`` divided by the two gamed baselines, the gamed rows'
    ``not_gamed_baseline`` = 0, the cross-validation grouped by row over all rows). That file
    reads the gamed rows' standardised length difference precomputed from a data file; the
    project's ``notebooks/notebook_helpers.py`` standardises each generator's length
    difference, the gamed baselines' included, by that generator's own standard deviation,
    and prefloop does the same: set k uses ``sd(d_k)``.
    Without ``difficulty`` a set is three arrays; with it, a set with one row per prompt in the
    model's order reuses ``difficulty``, any other needs a fourth array.

    Properties: a model against itself (y ≡ ½, d ≡ 0) gives exactly 50 (with the glm fit even
    with regularisation rows and difficulty: the optimum's θ_m equation makes the mean fitted
    probability over the model's rows equal the mean preference, ½); with no length
    differences, or all equal ones, the length term is 0 and (glm, no difficulty, no
    regularisation) LC equals the raw win rate; without difficulty or regularisation, swapping
    A and B gives 100 − LC.
    """
    y = _preference_array("preference", preference)
    n = y.size
    a, b = _as_1d("len_a", len_a, n), _as_1d("len_b", len_b, n)
    diff = None if difficulty is None else _as_1d("difficulty", difficulty, n)
    columns = [length_feature(a, b), *(() if diff is None else (diff,)), np.ones(n)]
    x = np.stack(columns, axis=1)  # (n, 2 or 3): [length, difficulty?, model]
    w = np.ones(n)
    n_reg = 0
    if regularize_to:
        if not (math.isfinite(regularize_lambda) and regularize_lambda > 0):
            raise PrefloopError(
                f"regularize_lambda: must be a positive number, got {regularize_lambda!r}"
            )
        x_reg, y_reg = _regularization_design(regularize_to, n, diff)
        n_reg = y_reg.size
        # AlpacaEval's row order, which its folds follow: the baseline rows, then the model's.
        x = np.concatenate([x_reg, x])  # (M + n, …)
        y = np.concatenate([y_reg, y])
        w = np.concatenate([np.full(n_reg, regularize_lambda / len(regularize_to)), w])

    notes: list[str] = []
    if fit == "glm":
        theta, c = _fit_glm(x, y, w), None
    elif fit == "alpacaeval":
        theta, c, unconverged = _fit_alpacaeval(x, y, w)
        if unconverged:
            notes.append(
                f"liblinear stopped at its {ALPACAEVAL_MAX_ITER}-iteration limit in "
                f"{unconverged} of its {min(ALPACAEVAL_FOLDS, y.size) * len(ALPACAEVAL_C_GRID) + 1}"
                " fits (AlpacaEval's limit, kept for parity): θ may be short of the optimum"
            )
    else:
        raise PrefloopError(f"fit: must be 'glm' or 'alpacaeval', got {fit!r}")

    from scipy.special import expit  # σ with full relative precision in the tails

    equal_length_logit = x[n_reg:, 1:] @ theta[1:]  # the model's rows, length column at 0
    lc = 100.0 * float(np.mean(expit(equal_length_logit)))
    raw = 100.0 * float(np.mean(y[n_reg:]))
    return LCWinRate(
        lc=lc,
        win_rate=raw,
        theta_length=float(theta[0]),
        theta_model=float(theta[-1]),
        theta_difficulty=float(theta[1]) if diff is not None else None,
        C=c,
        n=n,
        fit=fit,
        n_regularization=n_reg,
        warnings=(*lc_warnings(lc, raw, a, b, regularized=n_reg > 0), *notes),
    )


def is_extreme_change(win_rate: float, lc: float) -> bool:
    """AlpacaEval's test that the LC win rate moved suspiciously far from the raw one (percent).

    True when LC < min(wr − wr/4, wr − 10) or LC > max(wr + (100 − wr)/4, wr + 10): LC
    moved by more than 10 points *and* by more than a quarter of the way to 0 (or to 100).
    E.g. from wr = 20 it flags LC < 10 or LC > 40, from wr = 50 LC < 37.5 or LC > 62.5.
    """
    too_low = lc < min(win_rate - win_rate / 4.0, win_rate - 10.0)
    too_high = lc > max(win_rate + (100.0 - win_rate) / 4.0, win_rate + 10.0)
    return bool(too_low or too_high)


def _length_warning(len_a: np.ndarray, len_b: np.ndarray) -> str | None:
    """Why the lengths cannot separate length from model, or None when they can.

    With ``d_i = len_B,i − len_A,i``: all d_i equal and non-zero (the length term is 0 and its
    effect falls into the model term); the two length ranges disjoint; or d_i of one sign on
    every prompt. In the last two cases no prompt has the two responses at equal length, and
    LC extrapolates the fitted tanh curve to d = 0.
    """
    d = len_b - len_a
    n = d.size
    if np.all(d == d[0]) and d[0] != 0:
        return (f"every length difference len_B − len_A is {d[0]:g}: the length effect cannot "
                "be estimated apart from the model's, and LC absorbs it")
    longer, shorter = ("A", "B") if d[0] < 0 else ("B", "A")
    ranges = f"A {len_a.min():g}–{len_a.max():g}, B {len_b.min():g}–{len_b.max():g}"
    if len_a.min() > len_b.max() or len_b.min() > len_a.max():
        return (f"the lengths do not overlap ({ranges}): every response of {longer} is longer "
                f"than every response of {shorter}, so length and model cannot be told apart "
                "and LC extrapolates far beyond the data to equal length")
    if np.all(d < 0) or np.all(d > 0):
        return (f"{longer}'s response is the longer one on all {n} prompts ({ranges}): LC "
                "extrapolates the length effect to equal length, where there are no data")
    return None


def lc_warnings(
    lc: float, win_rate: float, len_a: ArrayLike, len_b: ArrayLike, regularized: bool = False
) -> list[str]:
    """Reasons to distrust a length-controlled win rate, one sentence each (empty: none).

    - the length difference ``len_B − len_A`` cannot separate the length effect from the model
      term: constant, disjoint length ranges, or one sign on every prompt (see
      :func:`_length_warning`); with ``regularized`` (verbose/concise baseline rows in the
      fit) the sentence says that the length slope then comes from those rows;
    - :func:`is_extreme_change`: LC moved far from the raw ``win_rate`` (AlpacaEval's warning
      that the GLM may have failed).

    ``lc`` and ``win_rate`` are in percent; lengths one per prompt, in any one unit.
    """
    a = _as_1d("len_a", len_a)
    b = _as_1d("len_b", len_b, a.size)
    out = []
    length = _length_warning(a, b)
    if length is not None:
        out.append(length + ("; the length slope comes from the verbose/concise baseline rows"
                             if regularized else
                             "; the baseline's verbose/concise answers would pin the length "
                             "slope (regularize_to; prefloop evaluate --verbose-baseline, "
                             "--concise-baseline)"))
    if is_extreme_change(win_rate, lc):
        out.append(f"LC {format_rate(lc)} % is far from the raw win rate {format_rate(win_rate)} "
                   "% (by more than 10 points and a quarter of the way to 0 or 100, AlpacaEval's "
                   "check): the length-controlled fit may have failed")
    return out


# Below this share of answers that ended with EOS, an evaluation's lengths and KL estimate
# are of answers cut at the token limit: the loop and the report warn.
EOS_WARNING = 0.95


def format_rate(value: float, decimals: int = 1) -> str:
    """A rate in percent as text with ``decimals`` decimals, unless that would hide it.

    A value that rounds to 0 or 100 without being exactly 0 or 100 keeps two significant
    digits of its distance from the end: ``format_rate(1.6e-5)`` is ``"1.6e-05"``,
    ``format_rate(100 - 3e-7)`` is ``"100 - 3e-07"``, ``format_rate(0.04)`` is ``"0.04"``;
    ``format_rate(73.94)`` is ``"73.9"``.
    """
    half = 0.5 * 10.0 ** -decimals
    if 0.0 < value < half:
        return f"{value:.2g}"
    if 100.0 - half < value < 100.0:
        return f"100 - {100.0 - value:.2g}"
    return f"{value:.{decimals}f}"


# ------------------------------------------------------------------- lengths and divergence


def length_stats(
    token_lengths: Sequence[float] | ArrayLike, char_lengths: Sequence[float] | ArrayLike
) -> dict[str, float]:
    """Mean and median response length in tokens and characters.

    Returns ``{"mean_tokens", "median_tokens", "mean_chars", "median_chars"}``, the keys of a
    ``metrics.jsonl`` row.
    """
    tokens = _as_1d("token_lengths", token_lengths)
    chars = _as_1d("char_lengths", char_lengths)
    return {
        "mean_tokens": float(np.mean(tokens)),
        "median_tokens": float(np.median(tokens)),
        "mean_chars": float(np.mean(chars)),
        "median_chars": float(np.median(chars)),
    }


def kl_estimate(policy_logps: ArrayLike, initial_logps: ArrayLike) -> tuple[float, float]:
    """Monte-Carlo estimate of KL(π ‖ π₀) from the policy's own samples, with its standard error.

    For responses y_j ~ π(·|x_j), with ``lp_j = log π(y_j|x_j)`` and ``l0_j = log π₀(y_j|x_j)``
    (summed over response tokens),

        KL(π ‖ π₀) = E_{y~π}[log π(y|x) − log π₀(y|x)] ≈ mean_j (lp_j − l0_j),

    with standard error std_j(lp_j − l0_j, ddof=1)/√m (0 when m = 1), in nats per response.
    The estimator is unbiased, but single terms can be negative, and so can the mean of a
    small sample. It is only valid on samples drawn from π, not on π₀'s samples.
    """
    lp = _as_1d("policy_logps", policy_logps)
    l0 = _as_1d("initial_logps", initial_logps, lp.size)
    return mean_se(lp - l0)


# ---------------------------------------------------------------------------- response rows


def _first_per_prompt(rows: Sequence[dict]) -> dict[str, int]:
    """prompt_id → index of its first row (later rows of the same prompt are other samples)."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        first.setdefault(str(row["prompt_id"]), i)
    return first


def pair_by_prompt(
    a_rows: Sequence[dict], b_rows: Sequence[dict]
) -> list[tuple[int, int]]:
    """(row of A, row of B) index pairs on the prompts both answer, in A's order.

    Each prompt's first row in each list is used (a file of several samples per prompt is
    compared on its first sample). Rows need a ``prompt_id``; the result may be empty.
    """
    first_b = _first_per_prompt(b_rows)
    return [(i, first_b[pid]) for pid, i in _first_per_prompt(a_rows).items() if pid in first_b]


def _row_lookup(rows: Sequence[dict]) -> dict[str, int]:
    """prompt id → row index: by the rows' ``prompt_id`` field (first row of each id), or, in
    a file where no row has one, by row number (the id ``prefloop sample`` gives a prompts
    file without an id column)."""
    if not any("prompt_id" in r for r in rows):
        return {str(i): i for i in range(len(rows))}
    return {str(r["prompt_id"]): i for i, r in reversed(list(enumerate(rows)))
            if "prompt_id" in r}


def prompt_numbers(
    column: str, prompt_ids: Sequence[str], sources: Sequence[tuple[str, Sequence[dict]]]
) -> np.ndarray:
    """A per-prompt number (e.g. a difficulty) for each id in ``prompt_ids``.

    ``sources`` are (file name, rows) searched in order; a prompt's row in a source (its first
    row there) is found by its ``prompt_id`` field, or by row number in a source without that
    field. The first source whose row has ``column`` gives the value, which must be a finite
    number (not a bool or a string). A prompt that no source gives a value for raises one
    line naming the first source's row, the field and the other files searched.
    """
    lookups = [(name, rows, _row_lookup(rows)) for name, rows in sources]
    values = np.empty(len(prompt_ids))
    for k, pid in enumerate(prompt_ids):
        found = None
        for name, rows, lookup in lookups:
            i = lookup.get(str(pid))
            if i is not None and column in rows[i]:
                found = (name, i, rows[i][column])
                break
        if found is None:
            name, _, lookup = lookups[0]
            others = ", ".join(n for n, _, _ in lookups[1:])
            raise PrefloopError(
                f"{where(name, lookup.get(str(pid)), column)}: missing for prompt_id {pid!r}"
                + (f" (also looked in {others})" if others else "")
            )
        name, i, value = found
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        if not ok or not math.isfinite(value):
            raise PrefloopError(f"{where(name, i, column)}: expected a number, got {value!r}")
        values[k] = float(value)
    return values


def response_chars(row: dict) -> int:
    """A response row's length in characters: its ``num_chars``, else ``len(response)``."""
    return int(row.get("num_chars", len(row["response"])))


def prompted_baseline_rows(
    name: str,
    prompted: Sequence[dict],
    baseline: Sequence[dict],
    difficulty: dict[str, float] | None = None,
) -> RegularizationRows:
    """One ``regularize_to`` set for :func:`length_controlled_win_rate` from scored rows.

    ``prompted`` are the baseline's answers when prompted to be verbose (or concise),
    ``baseline`` its ordinary answers (``prompt_id``, ``response``, ``score`` per row, scored
    by the same judge). On the prompts both answer (first row of each), A is the prompted
    answer and B the baseline's: preference σ(s_A − s_B), lengths in characters, and, when
    ``difficulty`` (prompt id → number) is given, each prompt's difficulty as the fourth
    array. ``name`` (the file) prefixes the error when they share no prompt.
    """
    pairs = pair_by_prompt(prompted, baseline)
    if not pairs:
        raise PrefloopError(f"{name}: shares no prompt_id with the baseline's responses")
    a = [prompted[i] for i, _ in pairs]
    b = [baseline[j] for _, j in pairs]
    pref = preferences([r["score"] for r in a], [r["score"] for r in b])
    rows: tuple = (pref, [response_chars(r) for r in a], [response_chars(r) for r in b])
    if difficulty is not None:
        rows += ([difficulty[str(r["prompt_id"])] for r in b],)
    return rows


@dataclass
class Comparison:
    """A against B by a reward, on the prompts both answer (:func:`compare`)."""

    a: list[dict]  # A's row of each shared prompt (its first), in A's order
    b: list[dict]  # B's row of the same prompt
    win_rate: WinRate
    lc: LCWinRate
    regularize: list[RegularizationRows]  # the prompted baselines' rows, as fitted


def compare(
    a_rows: Sequence[dict],
    b_rows: Sequence[dict],
    fit: str = "glm",
    difficulty: Callable[[list[str]], np.ndarray] | None = None,
    prompted: Sequence[tuple[str, Sequence[dict]]] = (),
    regularize_lambda: float = 0.2,
    names: tuple[str, str] = ("A", "B"),
) -> Comparison:
    """Win rate and length-controlled win rate of scored responses A against B: the one
    evaluation `prefloop evaluate` and the loop's evaluate stage share.

    Prompts are matched by :func:`pair_by_prompt` (each prompt's first row in each list);
    the preference is σ(s_A − s_B), lengths in characters. ``difficulty`` maps the shared
    prompt ids to the LC GLM's per-prompt covariate; ``prompted`` are (name, rows) of B's
    answers when prompted to be verbose/concise, scored by the same reward, which regularise
    the length slope as AlpacaEval 2 does. Raises PrefloopError, naming the two sets by
    ``names``, when they share no prompt.
    """
    pairs = pair_by_prompt(a_rows, b_rows)
    if not pairs:
        raise PrefloopError(f"{names[0]} and {names[1]} share no prompt_id")
    a, b = [a_rows[i] for i, _ in pairs], [b_rows[j] for _, j in pairs]
    theta_d = None
    by_prompt = None
    if difficulty is not None:
        ids = [str(r["prompt_id"]) for r in a]
        theta_d = difficulty(ids)
        by_prompt = dict(zip(ids, theta_d.tolist(), strict=True))
    regularize = [prompted_baseline_rows(name, rows, b, by_prompt) for name, rows in prompted]
    sa, sb = [r["score"] for r in a], [r["score"] for r in b]
    lc = length_controlled_win_rate(preferences(sa, sb), [response_chars(r) for r in a],
                                    [response_chars(r) for r in b], theta_d, fit=fit,
                                    regularize_to=regularize,
                                    regularize_lambda=regularize_lambda)
    return Comparison(a, b, win_rate(sa, sb), lc, regularize)
