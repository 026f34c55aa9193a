"""Preference losses: pure functions over per-sequence log-probabilities.

Every loss here takes a :class:`PreferenceLogps` record and keyword parameters and returns a
:class:`LossOutput` with one loss per pair (the caller averages) and the implicit rewards of
the chosen and rejected responses (detached, for logging). Nothing here runs a model: the
trainer computes the summed response log-probs once and any loss in :data:`LOSSES` can be
applied to them. The module imports only ``torch``.

Notation (see METHODS.md), for a pair ``(y_w, y_l)`` of the same prompt ``x``:

- ``lp(y)`` = Σ_t log πθ(y_t | x, y_<t) over response tokens only; ``lr(y)`` the same under
  the frozen reference policy;
- ``Δ(y) = lp(y) − lr(y)``, the implicit reward ``r(y) = β·Δ(y)`` and ``h = Δ(y_w) − Δ(y_l)``;
- ``σ`` the logistic function. Every loss is minimised.

``−log σ(z)`` is always evaluated as ``-F.logsigmoid(z)``, which is finite with a finite
gradient for any finite ``z`` (|z| ≈ 1e3 included), unlike ``-torch.log(torch.sigmoid(z))``.

:data:`LOSSES` is the single registry of loss names in prefloop: configs, the CLI and the
trainer all look names up here. Use :func:`compute_loss` rather than calling a loss function
directly: it fills in defaults, rejects parameters the loss does not take, checks parameter
ranges, and checks that ``logps`` carries every field the loss needs.
"""

from __future__ import annotations

import difflib
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FEATURE_FIELDS",
    "LOSSES",
    "LossOutput",
    "LossSpec",
    "PreferenceLogps",
    "bco_pair_loss",
    "cdpo_loss",
    "compute_loss",
    "dadpo_loss",
    "dpo_loss",
    "dpop_loss",
    "get_loss",
    "hinge_loss",
    "ipo_loss",
    "length_neutral_alpha",
    "lr_dpo_loss",
    "nca_pair_loss",
    "rdpo_loss",
    "simpo_loss",
    "sppo_hard_loss",
    "sppo_loss",
    "tdpo1_loss",
    "tdpo2_loss",
    "xpo_loss",
]


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------


@dataclass
class PreferenceLogps:
    """Per-pair inputs of a preference loss; every tensor has shape ``(B,)``.

    Only ``policy_chosen`` and ``policy_rejected`` are always required; the optional fields
    are grouped into *features* (:data:`FEATURE_FIELDS`) and a loss declares the features it
    needs in :attr:`LossSpec.needs`.
    """

    policy_chosen: Tensor  # lp(y_w): summed response-token log-probs under the policy
    policy_rejected: Tensor  # lp(y_l)
    ref_chosen: Tensor | None = None  # lr(y_w) under the reference (no grad)
    ref_rejected: Tensor | None = None  # lr(y_l)
    chosen_tokens: Tensor | None = None  # float response token counts (IPO, SimPO)
    rejected_tokens: Tensor | None = None
    chosen_lengths: Tensor | None = None  # |y| in the configured unit (tokens or chars)
    rejected_lengths: Tensor | None = None
    chosen_kl: Tensor | None = None  # D(y) = Σ_t KL(π_ref ‖ πθ) over response tokens (TDPO)
    rejected_kl: Tensor | None = None
    teacher_chosen: Tensor | None = None  # l_T(y): teacher log-probs (daDPO)
    teacher_rejected: Tensor | None = None
    chosen_target: Tensor | None = None  # SPPO win-probability estimate P̂_w
    rejected_target: Tensor | None = None
    explore_logps: Tensor | None = None  # XPO: lp(ỹ) of the reference-sampled response


class LossOutput(NamedTuple):
    """What every loss returns; all three tensors have shape ``(B,)``."""

    losses: Tensor  # per-pair loss (caller averages)
    chosen_rewards: Tensor  # implicit reward of y_w, detached
    rejected_rewards: Tensor  # implicit reward of y_l, detached


# Which PreferenceLogps fields each feature name in LossSpec.needs stands for.
FEATURE_FIELDS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "reference": ("ref_chosen", "ref_rejected"),
        "tokens": ("chosen_tokens", "rejected_tokens"),
        "lengths": ("chosen_lengths", "rejected_lengths"),
        "token_kl": ("chosen_kl", "rejected_kl"),
        "teacher": ("teacher_chosen", "teacher_rejected"),
        "targets": ("chosen_target", "rejected_target"),
        "explore": ("explore_logps",),
    }
)


@dataclass(frozen=True)
class LossSpec:
    """A registered loss: its function, parameters with defaults, needed inputs and paper."""

    name: str
    fn: Callable[..., LossOutput]  # fn(logps: PreferenceLogps, **params) -> LossOutput
    defaults: Mapping[str, float]  # every keyword parameter with its default
    needs: frozenset[str]  # subset of FEATURE_FIELDS keys
    paper: str  # short citation, e.g. "Rafailov et al. 2023, arXiv:2305.18290"

    @property
    def reference_free(self) -> bool:
        """True when the loss never reads reference log-probs (the caller skips that pass)."""
        return "reference" not in self.needs


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def _logratios(logps: PreferenceLogps) -> tuple[Tensor, Tensor]:
    """Δ(y_w), Δ(y_l): policy minus reference log-probs."""
    return logps.policy_chosen - logps.ref_chosen, logps.policy_rejected - logps.ref_rejected


def _margin(logps: PreferenceLogps) -> tuple[Tensor, Tensor, Tensor]:
    """Δ_w, Δ_l and h = Δ_w − Δ_l.

    Every DPO-shaped loss takes h from here so that the reductions to DPO (α=0, ε=0, γ=0) are
    exact in floating point, not only in exact arithmetic.
    """
    d_w, d_l = _logratios(logps)
    return d_w, d_l, d_w - d_l


def _anchored(h: Tensor, logps: PreferenceLogps, lam: float) -> Tensor:
    """DPOP's margin ``h − λ·max(0, lr(y_w) − lp(y_w))`` (``h`` itself at λ = 0, exactly)."""
    if not lam:
        return h
    return h - lam * torch.relu(logps.ref_chosen - logps.policy_chosen)


def _nll_sigmoid(z: Tensor) -> Tensor:
    """−log σ(z), finite with a finite gradient for every finite z."""
    return -F.logsigmoid(z)


def _output(losses: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor) -> LossOutput:
    return LossOutput(losses, chosen_rewards.detach(), rejected_rewards.detach())


def _beta_rewards(losses: Tensor, beta: float, d_w: Tensor, d_l: Tensor) -> LossOutput:
    """Output with the standard implicit rewards r = β·Δ."""
    return _output(losses, beta * d_w, beta * d_l)


# --------------------------------------------------------------------------------------------
# Reference-based pairwise losses
# --------------------------------------------------------------------------------------------


def dpo_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Direct Preference Optimization (DPO).

    Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a
    Reward Model", arXiv:2305.18290 (Eq. 7).

    .. math::

        L = −\\log σ(β·h),\\qquad h = [lp(y_w) − lr(y_w)] − [lp(y_l) − lr(y_l)]

    The Bradley–Terry negative log-likelihood of the preference under the implicit reward
    ``r(y) = β·(lp(y) − lr(y))``. The gradient raises ``lp(y_w)`` and lowers ``lp(y_l)``,
    weighted by ``σ(−β·h)``: pairs the model already orders correctly by a wide margin
    contribute little.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: inverse temperature of the KL constraint to the reference. Larger β keeps the
            policy closer to the reference. Typical range 0.01–0.5; default 0.1.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    return _beta_rewards(_nll_sigmoid(beta * h), beta, d_w, d_l)


def lr_dpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, alpha: float = 0.01,
                lam: float = 5.0) -> LossOutput:
    """Length-regularised DPO (LR-DPO, the loss of iLR-DPO): R-DPO's length margin, and by
    default DPOP's anchor on the chosen response.

    Liu et al. 2024, "Iterative Length-Regularized Direct Preference Optimization",
    arXiv:2406.11817; Park et al. 2024, "Disentangling Length from Quality in Direct Preference
    Optimization" (R-DPO), arXiv:2403.19159; the anchor: Pal et al. 2024, "Smaug" (DPOP),
    arXiv:2402.13228.

    .. math::

        L = −\\log σ\\big(β·[h − λ·\\max(0,\\ lr(y_w) − lp(y_w))] + α·(|y_w| − |y_l|)\\big),
        \\qquad α, λ ≥ 0

    Derivation of the margin: the optimal policy maximises ``r_RM(x, y) − α|y|`` under the KL
    constraint, so ``r_RM = β·Δ + α|y| + const``; substituting into the Bradley–Terry
    likelihood of the reward model's preference gives the loss at λ = 0 (the papers' LR-DPO).
    Sign: when the winner is longer the length term is already positive, the sigmoid saturates
    sooner and the loss pushes *less* toward the longer winner, so training does not reward
    verbosity. ``α = λ = 0`` is exactly DPO; ``α = 0`` is DPOP; ``λ = 0`` is R-DPO.

    The anchor (λ, prefloop's default 5; 0 for the papers' loss) is zero while the policy gives
    the chosen response at least its reference log-probability. It is there because the
    margin lets a pair be "won" with h < 0 once α·d is large: at the α that holds the length,
    iterative LR-DPO on examples/word_forms ended its iterations with h < 0 on 19–36 % of its
    longer-winner pairs (iDPO: 8–13 %; with the anchor 13–20 %), its chosen log-probabilities
    fell, and some iterations collapsed into malformed answers (README, "The chosen-response
    anchor").

    Args:
        logps: needs ``policy_*``, ``ref_*`` and ``chosen_lengths``/``rejected_lengths``
            (in tokens or characters: α is per unit of that length).
        beta: as in DPO. Default 0.1.
        alpha: length penalty per unit of length. Typical range 0.005–0.05 per token; the
            default 0.01 is *unverified* against the paper's value (use a smaller α when
            lengths are in characters). The loop's length control sets α itself unless
            ``loss.length_control.mode=fixed``.
        lam: weight λ of the anchor, ``λ ≥ 0``. Default 5.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``: rewards are the DPO ones, without the
        length term or the anchor.
    """
    d_w, d_l, h = _margin(logps)
    length_gap = logps.chosen_lengths - logps.rejected_lengths
    return _beta_rewards(_nll_sigmoid(beta * _anchored(h, logps, lam) + alpha * length_gap),
                         beta, d_w, d_l)


def length_neutral_alpha(length_gaps: Tensor, margins: Tensor | None = None) -> float:
    """The α of LR-DPO at which its first update on these pairs is length-neutral.

    prefloop's own rule (not from the iLR-DPO paper, which tunes α by hand). At the start of
    training ``h = 0`` and the gradient of pair i's loss in ``h`` has weight
    ``β·σ(−α·d_i)``, ``d_i = |y_w| − |y_l|``: a positive α turns down pairs whose winner is
    longer and turns up pairs whose winner is shorter. The returned α is the root of

    .. math::

        f(α) = \\sum_i σ(−α·d_i)·d_i = 0,

    the weighted mean length gap of the pairs the update follows; f falls strictly with α,
    from ``Σ d_i / 2`` at α = 0 towards the sum of the negative gaps. When the pairs do not
    favour longer winners (``Σ d_i ≤ 0``) the answer is 0 (α ≥ 0). It is the loss-side
    analogue of DICE's pair-side rule (mean chosen−rejected gap closest to 0).

    With ``margins`` m_i = β·h_i of a policy already trained away from its reference, the
    same root of ``Σ_i σ(−m_i − α·d_i)·d_i = 0`` makes the *current* update length-neutral
    (the per-step rule of ``loss.length_control.mode=per_step``).

    Args:
        length_gaps: (num_pairs,) ``|y_w| − |y_l|`` in the loss's length unit.
        margins: (num_pairs,) β·h of each pair; None = 0 (the first step).

    Raises:
        ValueError: when the gaps are longer-winner only (no pair has a shorter winner), so
            no α balances them, or when a gap is not finite.
    """
    d = length_gaps.detach().to("cpu", torch.float64).flatten()
    m = torch.zeros_like(d) if margins is None else \
        margins.detach().to("cpu", torch.float64).flatten()
    if not bool(torch.isfinite(d).all() and torch.isfinite(m).all()):
        raise ValueError("length gaps and margins must be finite numbers")

    def weighted_gap(alpha: float) -> float:
        return float((torch.sigmoid(-m - alpha * d) * d).sum())

    if d.numel() == 0 or weighted_gap(0.0) <= 0:
        return 0.0
    if not bool((d < 0).any()):
        raise ValueError("every pair's chosen response is at least as long as its rejected "
                         "one: no α makes the update length-neutral")

    lo, hi = 0.0, 1.0 / float(d.abs().max())
    while weighted_gap(hi) > 0:  # f(∞) < 0, so this ends
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        if weighted_gap(mid) > 0:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return (lo + hi) / 2


def cdpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, epsilon: float = 0.1) -> LossOutput:
    """Conservative DPO (cDPO): DPO with label smoothing.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (technical
    note, no arXiv id).

    .. math::

        L = (1 − ε)·(−\\log σ(β·h)) + ε·(−\\log σ(−β·h))

    The cross-entropy against a soft label: the preference is assumed flipped with
    probability ε. Unlike DPO the loss has a finite minimiser, ``β·h = log((1 − ε)/ε)``, so
    the margin stops growing once it is reached. ``ε = 0`` is exactly DPO.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: as in DPO. Default 0.1.
        epsilon: assumed label-noise rate, ``0 ≤ ε < 0.5``. Typical 0.05–0.2; default 0.1.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    z = beta * h
    losses = (1.0 - epsilon) * _nll_sigmoid(z) + epsilon * _nll_sigmoid(-z)
    return _beta_rewards(losses, beta, d_w, d_l)


def rdpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, epsilon: float = 0.1) -> LossOutput:
    """Robust DPO (rDPO): an unbiased DPO loss under random preference flips.

    Chowdhury et al. 2024, "Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", arXiv:2403.00409.

    .. math::

        L = \\frac{(1 − ε)·(−\\log σ(β·h)) − ε·(−\\log σ(−β·h))}{1 − 2ε}

    If each label is flipped independently with probability ε, the expectation of this loss
    over the flips equals the DPO loss on the clean labels. Because of the minus sign the
    per-pair loss is not bounded below (it goes to −∞ linearly as β·h → +∞); only its average
    is meaningful. Not to be confused with R-DPO (see :func:`lr_dpo_loss`). ``ε = 0`` is
    exactly DPO.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: as in DPO. Default 0.1.
        epsilon: flip rate of the preference labels, ``0 ≤ ε < 0.5``. Default 0.1.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    z = beta * h
    clean, flipped = _nll_sigmoid(z), _nll_sigmoid(-z)
    losses = ((1.0 - epsilon) * clean - epsilon * flipped) / (1.0 - 2.0 * epsilon)
    return _beta_rewards(losses, beta, d_w, d_l)


def ipo_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Identity Preference Optimization (IPO).

    Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", arXiv:2310.12036 (Eq. 17, with τ = β).

    .. math::

        L = \\Big(\\bar h − \\frac{1}{2β}\\Big)^2,\\qquad
        \\bar h = \\frac{Δ(y_w)}{n_w} − \\frac{Δ(y_l)}{n_l}

    A squared loss that regresses the margin to a fixed target ``1/(2β)`` instead of pushing
    it to infinity, so it does not overfit deterministic preferences. Each log-ratio is
    divided by its response token count ``n``, so β means the same for short and long
    responses. A count below 1 (an empty response, whose Δ is 0) is treated as 1.

    Args:
        logps: needs ``policy_*``, ``ref_*`` and ``chosen_tokens``/``rejected_tokens``.
        beta: regularisation strength τ; the target per-token margin is ``1/(2β)``. Typical
            range 0.01–1; default 0.1 (target margin 5 nats per token).

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))`` with the summed (not per-token) Δ.
    """
    d_w, d_l = _logratios(logps)
    h_bar = d_w / logps.chosen_tokens.clamp(min=1.0) - d_l / logps.rejected_tokens.clamp(min=1.0)
    return _beta_rewards((h_bar - 1.0 / (2.0 * beta)) ** 2, beta, d_w, d_l)


def hinge_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Hinge loss on the DPO margin (SLiC-HF; RSO's ``hinge`` variant).

    Zhao et al. 2023, "SLiC-HF: Sequence Likelihood Calibration with Human Feedback",
    arXiv:2305.10425; Liu et al. 2023, "Statistical Rejection Sampling Improves Preference
    Optimization" (RSO), arXiv:2309.06657.

    .. math::

        L = \\max(0,\\ 1 − β·h)

    Pairs whose scaled margin ``β·h`` already exceeds 1 contribute nothing (and no gradient);
    the others are pushed with a constant slope. ``1/β`` is thus the margin, in nats, that
    the policy must reach relative to the reference.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: inverse of the required margin. RSO uses 0.05; default 0.1.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    return _beta_rewards(torch.relu(1.0 - beta * h), beta, d_w, d_l)


def dpop_loss(logps: PreferenceLogps, *, beta: float = 0.1, lam: float = 50.0) -> LossOutput:
    """DPO-Positive (DPOP): DPO with a penalty when the chosen likelihood falls.

    Pal et al. 2024, "Smaug: Fixing Failure Modes of Preference Optimisation with
    DPO-Positive", arXiv:2402.13228.

    .. math::

        L = −\\log σ\\Big(β·\\big[h − λ·\\max(0,\\ lr(y_w) − lp(y_w))\\big]\\Big)

    Plain DPO can increase the margin while *lowering* ``lp(y_w)``, notably when the two
    responses differ in few tokens. The penalty is zero while the policy assigns the chosen
    response at least its reference log-probability and grows with slope λ below it.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: as in DPO. Default 0.1.
        lam: weight λ of the penalty, ``λ ≥ 0``; ``λ = 0`` is DPO. Large values (tens) are
            the intended regime. Default 50 (*unverified* against the paper's value).

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    return _beta_rewards(_nll_sigmoid(beta * _anchored(h, logps, lam)), beta, d_w, d_l)


def nca_pair_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Noise Contrastive Alignment, pairwise form (NCA).

    Chen et al. 2024, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
    arXiv:2402.05369.

    .. math::

        L = −\\log σ(r_w) − ½\\log σ(−r_w) − ½\\log σ(−r_l),\\qquad r = β·Δ

    Each response's reward is optimised on its own scale rather than only through the
    difference ``r_w − r_l``, which keeps ``lp(y_w)`` from drifting down as it can in DPO.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: reward scale. Typical range 0.01–0.5; default 0.1.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l = _logratios(logps)
    r_w, r_l = beta * d_w, beta * d_l
    losses = _nll_sigmoid(r_w) + 0.5 * _nll_sigmoid(-r_w) + 0.5 * _nll_sigmoid(-r_l)
    return _output(losses, r_w, r_l)


def bco_pair_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Binary Classifier Optimization on pairs (BCO), without the reward shift.

    Jung et al. 2024, "Binary Classifier Optimization for Large Language Model Alignment",
    arXiv:2404.04656.

    .. math::

        L = −\\log σ(r_w) − \\log σ(−r_l),\\qquad r = β·Δ

    A binary classifier whose logit is the implicit reward: chosen responses are labelled 1
    and rejected ones 0, independently. The paper subtracts a shift δ (a running mean of the
    rewards) from both logits; prefloop implements the formula without it (δ = 0), as
    METHODS.md states it, so the loss stays a pure function of the batch.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: reward scale. Typical range 0.01–0.5; default 0.1.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l = _logratios(logps)
    r_w, r_l = beta * d_w, beta * d_l
    return _output(_nll_sigmoid(r_w) + _nll_sigmoid(-r_l), r_w, r_l)


def sppo_hard_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Self-Play Preference Optimization with hard win probabilities (SPPO, hard labels).

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    arXiv:2405.00675 (Eq. 4.7 with P̂(y_w) = 1 and P̂(y_l) = 0).

    .. math::

        L = \\Big(Δ_w − \\frac{1}{2β}\\Big)^2 + \\Big(Δ_l + \\frac{1}{2β}\\Big)^2

    Regresses each log-ratio to its own target: ``+1/(2β)`` for the winner and ``−1/(2β)``
    for the loser. Equals twice :func:`sppo_loss` evaluated at targets 1 and 0.

    Args:
        logps: needs ``policy_*`` and ``ref_*``.
        beta: 1/η, the inverse of the self-play step size. Default 0.1 (targets ±5).

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l = _logratios(logps)
    target = 1.0 / (2.0 * beta)
    losses = (d_w - target) ** 2 + (d_l + target) ** 2
    return _beta_rewards(losses, beta, d_w, d_l)


# --------------------------------------------------------------------------------------------
# Reference-free
# --------------------------------------------------------------------------------------------


def simpo_loss(
    logps: PreferenceLogps, *, beta: float = 2.0, gamma_ratio: float = 0.5
) -> LossOutput:
    """Simple Preference Optimization (SimPO): reference-free, length-normalised.

    Meng et al. 2024, "SimPO: Simple Preference Optimization with a Reference-Free Reward",
    arXiv:2405.14734 (Eq. 6).

    .. math::

        L = −\\log σ\\Big(β\\frac{lp(y_w)}{n_w} − β\\frac{lp(y_l)}{n_l} − γ\\Big),
        \\qquad γ = \\text{gamma\\_ratio}·β

    The implicit reward is the policy's average per-token log-prob scaled by β; no reference
    model is needed. The target margin γ must be exceeded before the loss saturates.
    prefloop parameterises γ through ``gamma_ratio = γ/β`` (the quantity the paper tunes), so
    changing β keeps the margin in proportion. A token count below 1 is treated as 1.

    Args:
        logps: needs ``policy_*`` and ``chosen_tokens``/``rejected_tokens``.
        beta: reward scale. Much larger than DPO's because the reward is a per-token
            average: values of a few units (2–10) are the usual range; default 2.0.
        gamma_ratio: γ/β, ``≥ 0``; γ/β below 1 is the usual range. Default 0.5, i.e.
            γ = 0.5·β = 1.0 at β = 2 (METHODS.md: γ = 0.5β).

    Returns:
        ``LossOutput(losses, β·lp(y_w)/n_w, β·lp(y_l)/n_l)``.
    """
    r_w = beta * logps.policy_chosen / logps.chosen_tokens.clamp(min=1.0)
    r_l = beta * logps.policy_rejected / logps.rejected_tokens.clamp(min=1.0)
    gamma = gamma_ratio * beta
    return _output(_nll_sigmoid(r_w - r_l - gamma), r_w, r_l)


# --------------------------------------------------------------------------------------------
# Token-level
# --------------------------------------------------------------------------------------------


def tdpo1_loss(logps: PreferenceLogps, *, beta: float = 0.1) -> LossOutput:
    """Token-level DPO, first variant (TDPO1).

    Zeng et al. 2024, "Token-level Direct Preference Optimization", arXiv:2404.11999.

    .. math::

        L = −\\log σ\\Big(β·\\big[h − (D(y_l) − D(y_w))\\big]\\Big),\\qquad
        D(y) = \\sum_t \\mathrm{KL}\\big(π_{ref}(·|x, y_{<t})\\ \\|\\ πθ(·|x, y_{<t})\\big)

    DPO with a correction by the sequential forward KL of each response, which controls the
    divergence from the reference token by token. ``D`` comes from the full-vocabulary
    distributions of both models and carries gradient through πθ.

    Args:
        logps: needs ``policy_*``, ``ref_*`` and ``chosen_kl``/``rejected_kl``.
        beta: as in DPO. Default 0.1.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    kl_gap = logps.rejected_kl - logps.chosen_kl
    return _beta_rewards(_nll_sigmoid(beta * (h - kl_gap)), beta, d_w, d_l)


def tdpo2_loss(logps: PreferenceLogps, *, beta: float = 0.1, alpha: float = 0.5) -> LossOutput:
    """Token-level DPO, second variant (TDPO2).

    Zeng et al. 2024, "Token-level Direct Preference Optimization", arXiv:2404.11999.

    .. math::

        L = −\\log σ\\Big(β·\\big[h − α·(D(y_l) − \\mathrm{sg}(D(y_w)))\\big]\\Big)

    As TDPO1, but the chosen response's KL is a constant (``sg`` = stop-gradient, here
    ``detach``) so the loss does not push πθ away from the reference on the preferred
    response, and α weighs the correction.

    Args:
        logps: needs ``policy_*``, ``ref_*`` and ``chosen_kl``/``rejected_kl``.
        beta: as in DPO. Default 0.1.
        alpha: weight of the KL correction, ``α ≥ 0``; ``α = 0`` is DPO. Default 0.5
            (METHODS.md); values of order 0.1–1 are the meaningful range.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    kl_gap = logps.rejected_kl - logps.chosen_kl.detach()
    return _beta_rewards(_nll_sigmoid(beta * (h - alpha * kl_gap)), beta, d_w, d_l)


# --------------------------------------------------------------------------------------------
# Online / iterative
# --------------------------------------------------------------------------------------------


def sppo_loss(logps: PreferenceLogps, *, beta: float = 1e-3) -> LossOutput:
    """Self-Play Preference Optimization (SPPO) with estimated win probabilities.

    Wu et al. 2024, "Self-Play Preference Optimization for Language Model Alignment",
    arXiv:2405.00675 (Eq. 4.7).

    .. math::

        L = ½\\Big[\\Big(Δ_w − \\frac{P̂_w − ½}{β}\\Big)^2
                  + \\Big(Δ_l − \\frac{P̂_l − ½}{β}\\Big)^2\\Big]

    ``P̂(y) = mean_j σ(s(y) − s(y_j))`` is the estimated probability that ``y`` beats the
    other samples of its prompt under the scorer (computed by the pairing stage, passed in as
    ``chosen_target``/``rejected_target``, values in [0, 1]). Each log-ratio is regressed to
    ``(P̂ − ½)/β``: responses that beat the field are made more likely, the others less.

    Args:
        logps: needs ``policy_*``, ``ref_*`` and ``chosen_target``/``rejected_target``.
        beta: 1/η, the inverse of the self-play step size η. Default 1e-3 (η = 1e3,
            METHODS.md), which puts the log-ratio targets in [−500, 500].

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l = _logratios(logps)
    target_w = (logps.chosen_target - 0.5) / beta
    target_l = (logps.rejected_target - 0.5) / beta
    losses = 0.5 * ((d_w - target_w) ** 2 + (d_l - target_l) ** 2)
    return _beta_rewards(losses, beta, d_w, d_l)


def xpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, alpha: float = 1e-5) -> LossOutput:
    """Exploratory Preference Optimization (XPO).

    Xie et al. 2024, "Exploratory Preference Optimization: Harnessing Implicit
    Q*-Approximation for Sample-Efficient RLHF", arXiv:2405.21046.

    .. math::

        L = −\\log σ(β·h) + α·lp(ỹ)

    DPO on an online pair plus an exploration bonus: ``ỹ`` is a response sampled from the
    reference policy and ``lp(ỹ)`` its summed log-prob under the *current* policy. Minimising
    ``α·lp(ỹ)`` lowers the policy's likelihood of what the reference would say, pushing it to
    explore responses the reference rarely produces.

    Args:
        logps: needs ``policy_*``, ``ref_*`` and ``explore_logps`` (with gradient).
        beta: as in DPO. Default 0.1.
        alpha: exploration weight α_x, ``α ≥ 0``; ``α = 0`` is online DPO. Default 1e-5
            (METHODS.md): the bonus multiplies a summed log-prob of order −10² to −10³, so
            α must stay small.

    Returns:
        ``LossOutput(losses, β·Δ(y_w), β·Δ(y_l))``.
    """
    d_w, d_l, h = _margin(logps)
    losses = _nll_sigmoid(beta * h) + alpha * logps.explore_logps
    return _beta_rewards(losses, beta, d_w, d_l)


# --------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------


def dadpo_loss(logps: PreferenceLogps, *, beta: float = 0.1, gamma: float = 0.5) -> LossOutput:
    """Distribution-aware DPO (daDPO), in prefloop's teacher-KL-regularised reading.

    Zhang et al. 2025, "daDPO: Distribution-Aware DPO for Distilling Conversational
    Abilities", arXiv:2506.15717. The paper's exact loss is *unverified*: this is prefloop's
    reading of it, DPO against a geometric mixture of the reference and the teacher T:

    .. math::

        L = −\\log σ\\Big((β + γ)[lp(y_w) − lp(y_l)] − β[lr(y_w) − lr(y_l)]
                        − γ[l_T(y_w) − l_T(y_l)]\\Big)

    It is the DPO loss, with coefficient ``β + γ``, of the policy against the mixture
    ``π_mix ∝ π_ref^{β/(β+γ)} · π_T^{γ/(β+γ)}``: besides following the preference, the
    policy is pulled toward the teacher's distribution with strength γ. The data are those
    of black-box distillation DPO (dDPO): ``y_w`` the teacher's answer, ``y_l`` the
    student's, reference = the student's SFT model. ``γ = 0`` is dDPO, i.e. exactly DPO: the
    logit is computed as ``β·h + γ·([lp_w − lp_l] − [l_T(y_w) − l_T(y_l)])`` (the same value)
    so that the reduction holds bitwise.

    Args:
        logps: needs ``policy_*``, ``ref_*`` and ``teacher_chosen``/``teacher_rejected``
            (the teacher's summed log-probs of the same response tokens; same tokenizer).
        beta: as in DPO. Default 0.1.
        gamma: weight of the teacher, ``γ ≥ 0``. Default 0.5 (*unverified*).

    Returns:
        ``LossOutput(losses, r_w, r_l)`` with ``r = (β+γ)·lp − β·lr − γ·l_T``
        ``= β·Δ + γ·(lp − l_T)``.
    """
    d_w, d_l, h = _margin(logps)
    policy_gap = logps.policy_chosen - logps.policy_rejected
    teacher_gap = logps.teacher_chosen - logps.teacher_rejected
    z = beta * h + gamma * (policy_gap - teacher_gap)
    r_w = beta * d_w + gamma * (logps.policy_chosen - logps.teacher_chosen)
    r_l = beta * d_l + gamma * (logps.policy_rejected - logps.teacher_rejected)
    return _output(_nll_sigmoid(z), r_w, r_l)


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------

# Valid range of each parameter name, shared by every loss that takes it.
_PARAM_RULES: Mapping[str, tuple[Callable[[float], bool], str]] = MappingProxyType(
    {
        "beta": (lambda v: v > 0.0, "> 0"),
        "alpha": (lambda v: v >= 0.0, ">= 0"),
        "epsilon": (lambda v: 0.0 <= v < 0.5, "in [0, 0.5)"),
        "lam": (lambda v: v >= 0.0, ">= 0"),
        "gamma": (lambda v: v >= 0.0, ">= 0"),
        "gamma_ratio": (lambda v: v >= 0.0, ">= 0"),
    }
)


def _spec(name: str, fn: Callable[..., LossOutput], needs: set[str], paper: str) -> LossSpec:
    """Build a LossSpec whose defaults are read from ``fn``'s keyword-only parameters.

    Reading them from the signature keeps one source of truth for every default.
    """
    defaults = {
        p.name: float(p.default)
        for p in inspect.signature(fn).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }
    unknown = set(defaults) - set(_PARAM_RULES)
    if unknown:  # a new parameter name needs a range rule in _PARAM_RULES
        raise AssertionError(f"loss {name!r}: no range rule for {sorted(unknown)}")
    if not needs <= set(FEATURE_FIELDS):
        raise AssertionError(
            f"loss {name!r}: unknown features {sorted(needs - set(FEATURE_FIELDS))}"
        )
    return LossSpec(name, fn, MappingProxyType(defaults), frozenset(needs), paper)


_REF = {"reference"}

#: The single registry of loss names in prefloop.
LOSSES: dict[str, LossSpec] = {
    spec.name: spec
    for spec in (
        _spec("dpo", dpo_loss, _REF, "Rafailov et al. 2023, arXiv:2305.18290"),
        _spec(
            "lr_dpo",
            lr_dpo_loss,
            _REF | {"lengths"},
            "Liu et al. 2024, arXiv:2406.11817; Park et al. 2024 (R-DPO), arXiv:2403.19159",
        ),
        _spec("cdpo", cdpo_loss, _REF, "Mitchell 2023, note on DPO with noisy preferences"),
        _spec("rdpo", rdpo_loss, _REF, "Chowdhury et al. 2024, arXiv:2403.00409"),
        _spec("ipo", ipo_loss, _REF | {"tokens"}, "Azar et al. 2023, arXiv:2310.12036"),
        _spec(
            "hinge",
            hinge_loss,
            _REF,
            "Zhao et al. 2023 (SLiC), arXiv:2305.10425; Liu et al. 2023 (RSO), arXiv:2309.06657",
        ),
        _spec("simpo", simpo_loss, {"tokens"}, "Meng et al. 2024, arXiv:2405.14734"),
        _spec("dpop", dpop_loss, _REF, "Pal et al. 2024, arXiv:2402.13228"),
        _spec("nca_pair", nca_pair_loss, _REF, "Chen et al. 2024, arXiv:2402.05369"),
        _spec("bco_pair", bco_pair_loss, _REF, "Jung et al. 2024, arXiv:2404.04656"),
        _spec("sppo_hard", sppo_hard_loss, _REF, "Wu et al. 2024, arXiv:2405.00675"),
        _spec("tdpo1", tdpo1_loss, _REF | {"token_kl"}, "Zeng et al. 2024, arXiv:2404.11999"),
        _spec("tdpo2", tdpo2_loss, _REF | {"token_kl"}, "Zeng et al. 2024, arXiv:2404.11999"),
        _spec("sppo", sppo_loss, _REF | {"targets"}, "Wu et al. 2024, arXiv:2405.00675"),
        _spec("xpo", xpo_loss, _REF | {"explore"}, "Xie et al. 2024, arXiv:2405.21046"),
        _spec(
            "dadpo",
            dadpo_loss,
            _REF | {"teacher"},
            "Zhang et al. 2025, arXiv:2506.15717 (loss form: prefloop's reading, unverified)",
        ),
    )
}


def get_loss(name: str) -> LossSpec:
    """The registered :class:`LossSpec` called ``name``.

    Raises:
        ValueError: for an unknown name; the message lists the valid names.
    """
    try:
        return LOSSES[name]
    except (KeyError, TypeError):
        valid = sorted(LOSSES)
        close = difflib.get_close_matches(str(name), valid, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown loss {name!r}{hint}; valid losses: {', '.join(valid)}") from None


def broken_rule(param: str, value: float) -> str | None:
    """The range rule of a loss parameter that `value` breaks (e.g. ">= 0"), None when it is
    finite and in range."""
    check, rule = _PARAM_RULES[param]
    return None if math.isfinite(value) and check(value) else rule


def _check_params(spec: LossSpec, params: Mapping[str, object]) -> dict[str, float]:
    """Defaults merged with ``params``, every value a finite float in its valid range."""
    unknown = sorted(set(params) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(sorted(spec.defaults)) or "(none)"
        raise ValueError(
            f"loss {spec.name!r} does not take parameter(s) {', '.join(unknown)}; "
            f"it accepts: {accepted}"
        )
    merged: dict[str, float] = {}
    for key, default in spec.defaults.items():
        value = params.get(key, default)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(
                f"loss {spec.name!r}: parameter {key} must be a real number, "
                f"got {type(value).__name__} {value!r}"
            )
        value = float(value)
        rule = broken_rule(key, value)
        if rule:
            raise ValueError(f"loss {spec.name!r}: parameter {key} must be {rule}, got {value!r}")
        merged[key] = value
    return merged


def _check_logps(spec: LossSpec, logps: PreferenceLogps) -> None:
    """Every field the loss needs is present, and every tensor in use has the same shape."""
    if not isinstance(logps, PreferenceLogps):
        raise TypeError(f"loss {spec.name!r} expects a PreferenceLogps, got {type(logps).__name__}")
    needed = [f for feature in sorted(spec.needs) for f in FEATURE_FIELDS[feature]]
    missing = [f for f in needed if getattr(logps, f) is None]
    if missing:
        features = sorted(k for k in spec.needs if set(FEATURE_FIELDS[k]) & set(missing))
        raise ValueError(
            f"loss {spec.name!r} needs PreferenceLogps field(s) {', '.join(missing)} "
            f"(feature(s) {', '.join(features)}), which are None"
        )
    in_use = ("policy_chosen", "policy_rejected", *needed)
    for f in in_use:
        value = getattr(logps, f)
        if not isinstance(value, Tensor):
            raise TypeError(
                f"loss {spec.name!r}: {f} must be a torch.Tensor, got {type(value).__name__}"
            )
    shape = logps.policy_chosen.shape
    for f in in_use[1:]:
        value = getattr(logps, f)
        if value.shape != shape:
            raise ValueError(
                f"loss {spec.name!r}: {f} has shape {tuple(value.shape)} but policy_chosen "
                f"has shape {tuple(shape)}; every field must be one value per pair"
            )


def compute_loss(name: str, logps: PreferenceLogps, **params: float) -> LossOutput:
    """Evaluate the registered loss ``name`` on ``logps``, with checked parameters.

    ``params`` override the loss's defaults (:attr:`LossSpec.defaults`).

    Raises:
        ValueError: unknown loss name; a parameter the loss does not take (the message lists
            those it accepts); a parameter out of range; a needed field of ``logps`` that is
            None (the message names it and the loss); fields of different shapes.
        TypeError: a parameter that is not a real number; ``logps`` of the wrong type.
    """
    spec = get_loss(name)
    checked = _check_params(spec, params)
    _check_logps(spec, logps)
    return spec.fn(logps, **checked)
