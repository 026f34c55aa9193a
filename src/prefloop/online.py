"""The online methods' estimators, used by :mod:`prefloop.pairing`: SPPO's win
probabilities and RSO's rejection sampling (METHODS.md, "Online / iterative methods"). Which
method needs what is in :mod:`prefloop.methods`; how the loop draws their samples in
:mod:`prefloop.loop.stages`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from prefloop.errors import PrefloopError

WIN_PROBABILITY_ESTIMATES = ("soft", "hard")


# ---------------------------------------------------------------- SPPO


def win_probabilities(scores: Sequence[float], estimate: str = "soft") -> list[float]:
    """SPPO's estimate of each sample's probability of beating the policy (Wu et al. 2024).

    For the K samples of one prompt with scores s_1..s_K (K ≥ 2),

        P̂(y_i ≻ π) = 1/(K−1) · Σ_{j≠i} P(y_i ≻ y_j)

    with the Bradley–Terry preference ``P(y_i ≻ y_j) = σ(s_i − s_j)`` (``soft``, METHODS.md)
    or the hard one ``1[s_i > s_j] + ½·1[s_i = s_j]`` (``hard``). Values lie in [0, 1] and
    ``Σ_i P̂_i = K/2``. These are the targets of the ``sppo`` loss, which regresses each
    log-ratio to ``(P̂ − ½)/β``.
    """
    if estimate not in WIN_PROBABILITY_ESTIMATES:
        raise PrefloopError(f"pairing.win_probability: {estimate!r} is not soft or hard")
    k = len(scores)
    if k < 2:
        raise PrefloopError(f"win probabilities need at least 2 samples, got {k}")

    def beats(a: float, b: float) -> float:
        if estimate == "hard":
            return 1.0 if a > b else 0.5 if a == b else 0.0
        return 1.0 / (1.0 + math.exp(b - a))

    return [
        sum(beats(s_i, s_j) for j, s_j in enumerate(scores) if j != i) / (k - 1)
        for i, s_i in enumerate(scores)
    ]


# ---------------------------------------------------------------- RSO


def acceptance_probability(reward: float, max_reward: float, beta: float) -> float:
    """RSO's acceptance probability ``exp((r(y) − r_max)/β_rso)``, in (0, 1]."""
    return math.exp((reward - max_reward) / beta)


def rejection_sample(rewards: Sequence[float], beta: float, num_accepted: int,
                     rng: random.Random) -> list[int]:
    """Statistical rejection sampling (Liu et al. 2023, RSO, arXiv:2309.06657).

    Draws from the K candidates an approximate sample of the optimal policy
    ``π*(y|x) ∝ π_sft(y|x)·exp(r(y)/β)``: passes over the candidates not yet accepted, in
    order; candidate y is accepted with probability

        p(y) = exp((r(y) − r_max)/β_rso),   r_max = max r over the candidates left,

    decided by one uniform draw ``u < p(y)`` from ``rng`` (no draw once ``num_accepted`` are
    in). Accepted candidates leave the pool (without replacement); ``r_max`` is recomputed at
    each pass, so every pass accepts at least its best candidate and the loop ends. Stops at
    ``num_accepted`` or when the pool is empty.

    Returns:
        indices into ``rewards`` of the accepted candidates, in acceptance order.
    """
    if beta <= 0:
        raise PrefloopError(f"pairing.rejection_sampling.beta: must be > 0, got {beta}")
    remaining = list(range(len(rewards)))
    accepted: list[int] = []
    while remaining and len(accepted) < num_accepted:
        r_max = max(rewards[i] for i in remaining)
        left = []
        for i in remaining:
            if len(accepted) < num_accepted and \
                    rng.random() < acceptance_probability(rewards[i], r_max, beta):
                accepted.append(i)
            else:
                left.append(i)
        remaining = left
    return accepted
