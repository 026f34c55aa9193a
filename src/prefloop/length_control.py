"""lr_dpo's α chosen to hold the policy's mean response length at a target (prefloop's own).

LR-DPO's optimum maximises ``r − α·|y|`` under the KL constraint (METHODS.md), so α is the
Lagrange multiplier of a length budget: a larger α buys shorter answers. The modes of
``loss.length_control.mode``:

- ``fixed``: the α the user gives (``loss.alpha``);
- ``first_step``: the root of ``Σ_i σ(−α·d_i)·d_i = 0`` over the pairs, once per training
  run — the first update is length-neutral (``losses.length_neutral_alpha``; the old
  ``loss.auto_alpha``);
- ``per_step``: the same root re-solved after every optimizer step over all the run's
  pairs at margins ``β·h_i``, each pair with the h it had when last trained on, and used by
  the next step (one step late, so that every process, which sees only its shard, uses the
  same α): every update is length-neutral in the same sense;
- ``target`` (the default): the per-step root, scaled by how far the policy that sampled
  the pairs already is from the target, plus a correction λ moved by dual ascent on the
  policy's length as training changes it:

      α_k = max(0, c·root_k + λ_k),      c = (L̄_s / L*)^κ,
      λ_{k+1} = max(−c·root_k, λ_k + η · (L̂_k / L̄_s − 1) / mean_i |d_i|),   λ_0 = 0,

  where L̄_s is the measured mean length of the policy that sampled the pairs, L* the
  target, ``L̂_k`` the policy's mean length estimated at optimizer step k over all pairs
  (below; each pair with its latest h) and ``mean |d|``
  over all pairs makes η unit-free (α·d is of order one). The root balances each update; λ
  removes, measured, the drift the balance misses within the run, and stops integrating
  once α is at 0 (no wind-up); c corrects, across iterations, the drift an earlier
  iteration left (κ = 2: a policy sampled 10 % too long trains with 21 % more α). λ holds
  the length the run started from; only c pulls towards L*, so a target far from the
  policy's length is reached over several iterations, not within one.

  Why c and not λ for the drift already there: λ follows an estimate that sees only the two
  answers of each pair (it cannot exceed the longer one), so it under-reads growth; driven
  by a standing offset it wound α down to 0 within an iteration and the policy grew like
  iDPO's (seen on examples/word_forms). The factor c is bounded and applied once.

The length estimate needs no sampling. A pair's two responses were drawn from the policy
that sampled them, π_s; reweighting them by ``π_θ/π_s`` estimates the length the current
policy would give that prompt (self-normalised importance sampling over the two),

      ℓ̂_i = (e^{Δ_w}·|y_w| + e^{Δ_l}·|y_l|) / (e^{Δ_w} + e^{Δ_l}) = |y_l| + d_i·σ(h_i),

which is ``(|y_w| + |y_l|)/2`` at h = 0. The relative change ``Σ ℓ̂_i / Σ ℓ̂_i(h=0)`` over
the run's pairs, times L̄_s, is ``L̂_k``. In the loop, π_s is π_{t−1}, L̄_s is measured on
iteration t's samples and L* on iteration 1's (π₀'s) unless ``length_control.target`` is
given. Under ``prefloop train`` (no samples), L̄_s is the pairs' mean response length.

The root and the estimate leave out lr_dpo's chosen-response anchor (``loss.lam``): it is
zero while the chosen answers keep their reference log-probabilities, the regime it holds
the policy in.

The estimate uses h = Δ_w − Δ_l with the reference log-probs the loss uses; in the loop the
reference is π_s (``reference: previous``, the paper's), for which it is the estimate above.
With ``reference: initial`` h also carries earlier iterations' changes: a known bias.

The length guard (the loop's ``length_guard``) closes the loop on *measured* length. The
estimate sees only each pair's two answers; at a high learning rate the policy moves beyond
them within one iteration (the testbed at 2× the demo's rate: +10–25 % per iteration, most
of it answers that stop ending), which no estimate from the pairs reads. So after training
π_t the loop samples it on a fixed probe set of the run's prompts and compares its mean
length with π₀'s on the same probe, r = L̄_probe(π_t) / L̄_probe(π₀). Outside
``1 ± band``, π_t is trained again from π_{t−1} on the same pairs with c scaled by s:

      c = s · (L̄_s / L*)^κ,      ln s' = ln s − ln r / e,

where e = d ln r / d ln s is the secant through the attempt and the closest earlier one on
the other side of the target (regula falsi) once there is one, and until then e = −0.4
(the testbed at 2× the learning rate: −0.33 to −0.53 between attempts ×1.3–1.5 apart).
One retry moves s by at most ×3. The attempt closest to the target is kept, and the next
iteration starts from its s: a learning rate that needs more α needs it every iteration.
A training whose root was 0 at every step ends the search: s enters α only through c·root
(and λ's floor −c·root), so no scale would train anything else.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from prefloop.losses import length_neutral_alpha


def length_estimates(h: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """(b, 2): per pair, ``|y_l| + d·σ(h)`` (the current policy's importance-weighted
    length of the pair's two responses) and ``(|y_w| + |y_l|)/2`` (the same at h = 0)."""
    d = chosen_lengths - rejected_lengths
    now = rejected_lengths + d * torch.sigmoid(h.detach().to(d.dtype))
    return torch.stack([now, (chosen_lengths + rejected_lengths) / 2], dim=1)


# The band a length is held in around its target: ±10 %, the demo's check and the report's
# shaded band.
LENGTH_BAND = 0.10

# κ of the drift factor c = (L̄_s / L*)^κ.
DRIFT_EXPONENT = 2.0


@dataclass
class LengthGoal:
    """What the target mode steers to: ``target`` (L*) given the measured mean length
    ``start`` (L̄_s) of the policy that sampled the pairs, both in the loss's length unit;
    ``scale`` is the length guard's s (1 without the guard)."""

    start: float
    target: float
    scale: float = 1.0

    @property
    def drift_factor(self) -> float:
        """c = s·(L̄_s / L*)^κ: more α for a policy that already answers too long."""
        return self.scale * (self.start / self.target) ** DRIFT_EXPONENT


# The guard's first retry assumes r ∝ s^e with this e (measured on the testbed at 2× the
# demo's learning rate); later retries use the secant of the attempts.
GUARD_ELASTICITY = -0.4
# One retry changes the scale by at most this factor (either way).
GUARD_MAX_STEP = 3.0


def next_scale(attempts: list[tuple[float, float]]) -> float:
    """The length guard's next α scale s from every attempt so far, as (s, r) with r the
    measured length over its target, aiming at r = 1 with ln s' = ln s − ln r / e from the
    last attempt. Once attempts lie on both sides of r = 1, e is the secant through the last
    one and the closest across (regula falsi: s' stays inside the bracket; bisection in
    ln s if r does not fall between them); before that, e = −0.4. A secant between two
    attempts on one side is not used: their lengths differ by little more than the probe's
    noise (on the testbed, 1.077 → 1.052 read as e = −0.13 and the next step overshot to
    0.85). One step moves s by at most ×3.

    Raises:
        ValueError: without attempts, or with a scale or ratio that is not positive.
    """
    if not attempts:
        raise ValueError("next_scale: no attempt to go from")
    if any(s <= 0 or r <= 0 for s, r in attempts):
        raise ValueError(f"next_scale: scales and ratios must be > 0, got {attempts}")
    s, r = attempts[-1]
    x, y = math.log(s), math.log(r)
    across = [a for a in attempts[:-1] if (math.log(a[1]) > 0) != (y > 0)]
    slope = GUARD_ELASTICITY
    if across:
        other_s, other_r = min(across, key=lambda a: abs(math.log(a[1])))
        if other_s != s:
            secant = (y - math.log(other_r)) / (x - math.log(other_s))
            if secant >= 0:
                return math.sqrt(s * other_s)
            slope = secant
    step = max(-math.log(GUARD_MAX_STEP), min(math.log(GUARD_MAX_STEP), -y / slope))
    return math.exp(x + step)


def kept_attempt(ratios: list[float], band: float) -> int:
    """Which of the guard's attempts (their length ratios to the target) is kept: one in
    the band, else the closest in ln r (of several in the band, the closest too)."""
    return min(range(len(ratios)), key=lambda i: (abs(ratios[i] - 1) > band,
                                                  abs(math.log(ratios[i]))))


@dataclass
class AlphaController:
    """α of one training run; `alpha` is what the next loss evaluation uses.

    It keeps the most recent h of every pair of the run (0 until the pair is first trained
    on), so that the per-step root and the length estimate are taken over all the run's
    pairs rather than over one batch of 16: a length-grouped batch alone gave roots that
    jumped between 0.02 and 0.47 from one step to the next on the testbed.
    """

    mode: str
    alpha: float
    chosen_lengths: Tensor  # (n,) float64, every pair of the run
    rejected_lengths: Tensor
    goal: LengthGoal | None = None
    rate: float = 1.0
    correction: float = 0.0  # λ: the target mode's integrated correction on top of c·root
    root: float = 0.0  # the last root
    root_max: float = 0.0  # the largest root of the run (its first included)
    history: list[float] = field(default_factory=list)  # α of every optimizer step

    def __post_init__(self) -> None:
        self.gaps = self.chosen_lengths - self.rejected_lengths
        self.h = torch.zeros_like(self.gaps)  # the latest h of each pair
        self.gap_scale = max(float(self.gaps.abs().mean()) if self.gaps.numel() else 1.0,
                             1e-8)

    @classmethod
    def start(cls, mode: str, chosen_lengths: Tensor, rejected_lengths: Tensor,
              fixed_alpha: float | None = None, goal: LengthGoal | None = None,
              rate: float = 1.0) -> AlphaController:
        """α before the first step: the given one (`fixed`), else the first-step root (times
        c under `target`); `per_step` and `target` start from `fixed_alpha` when no winner
        is shorter (no root), and correct it from there.

        Raises:
            ValueError: from `length_neutral_alpha` under `first_step` when no winner is
                shorter.
        """
        chosen = chosen_lengths.detach().to("cpu", torch.float64)
        rejected = rejected_lengths.detach().to("cpu", torch.float64)
        if mode == "fixed":
            return cls(mode, float(fixed_alpha), chosen, rejected)
        try:
            root = length_neutral_alpha(chosen - rejected)
        except ValueError:
            if mode == "first_step" or fixed_alpha is None:
                raise
            import warnings

            warnings.warn(f"loss.length_control.mode={mode}: no pair has a shorter winner, so "
                          f"no α is length-neutral; starting from α = {fixed_alpha} (the loss's "
                          "default) and correcting from there", stacklevel=2)
            root = float(fixed_alpha)
        goal = goal if mode == "target" else None
        first = root * goal.drift_factor if goal is not None else root
        return cls(mode, first, chosen, rejected, goal, rate, root=root, root_max=max(root, 0.0))

    @property
    def adapts(self) -> bool:
        """Whether α moves during the run (and so needs each step's pairs' h)."""
        return self.mode in ("per_step", "target")

    def summary(self) -> dict[str, float | str]:
        """The run's α in one record: mode, first / last / mean α over the steps, and the
        start length and target of the target mode (train_summary.json, the manifest)."""
        steps = self.history or [self.alpha]
        out: dict[str, float | str] = {"mode": self.mode, "alpha_first": steps[0],
                                       "alpha_last": steps[-1],
                                       "alpha_mean": sum(steps) / len(steps)}
        if self.adapts:
            out["root_max"] = self.root_max
        if self.goal is not None:
            out.update(start_length=self.goal.start, target_length=self.goal.target,
                       alpha_scale=self.goal.scale)
        return out

    def after_step(self, index: Tensor | None = None, h: Tensor | None = None,
                   beta: float = 0.1) -> dict[str, float]:
        """Record the α the step used and set the next step's. `index`/`h`: the step's pairs
        (their positions in the run's pairs, and h), gathered over processes so that every
        process agrees; not needed when α does not adapt. Under `per_step` and `target`, the
        root at margins β·h over all pairs (each with its latest h); under `target` times c,
        plus λ moved by the dual update on the length estimate over all pairs; α ≥ 0.
        Returns the step's log fields: α used, and L̂, L* and λ under `target`."""
        record = {"alpha": self.alpha}
        self.history.append(self.alpha)
        if not self.adapts:
            return record
        self.h[index.long().cpu()] = h.detach().to("cpu", torch.float64)
        with contextlib.suppress(ValueError):  # no shorter winner at all: keep the last root
            self.root = length_neutral_alpha(self.gaps, beta * self.h)
        self.root_max = max(self.root_max, self.root)
        if self.goal is None:
            self.alpha = self.root
            return record
        c = self.goal.drift_factor
        now, start = length_estimates(self.h, self.chosen_lengths, self.rejected_lengths).sum(0)
        ratio = float(now / start)  # L̂_k / L̄_s
        self.correction = max(-c * self.root,
                              self.correction + self.rate * (ratio - 1) / self.gap_scale)
        self.alpha = max(0.0, c * self.root + self.correction)
        record.update(length_estimate=self.goal.start * ratio, length_target=self.goal.target,
                      alpha_correction=self.correction)
        return record
