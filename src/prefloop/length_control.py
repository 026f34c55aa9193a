"""lr_dpo's α chosen to hold the policy's mean response length at a target (prefloop's own).

LR-DPO's optimum maximises ``r − α·|y|`` under the KL constraint (METHODS.md), so α is the
Lagrange multiplier of a length budget: a larger α buys shorter answers. The modes of
``loss.length_control.mode``:

- ``fixed``: the α the user gives (``loss.alpha``);
- ``first_step``: the root of ``Σ_i σ(−α·d_i)·d_i = 0`` over the pairs, once per training
  run — the first update is length-neutral (``losses.length_neutral_alpha``; the old
  ``loss.auto_alpha``);
- ``per_step``: the same root re-solved after every optimizer step with the margins
  ``β·h_i`` of that step's pairs and used by the next step (one step late, so that every
  process, which sees only its shard, uses the same α), so every update is length-neutral
  in the same sense;
- ``target`` (the default): the per-step root, scaled by how far the policy that sampled
  the pairs already is from the target, plus a correction λ moved by dual ascent on the
  policy's length as training changes it:

      α_k = max(0, c·root_k + λ_k),      c = (L̄_s / L*)^κ,
      λ_{k+1} = max(−c·root_k, λ_k + η · (L̂_k / L̄_s − 1) / mean_i |d_i|),   λ_0 = 0,

  where L̄_s is the measured mean length of the policy that sampled the pairs, L* the
  target, ``L̂_k`` the policy's mean length estimated at optimizer step k (below; a running
  sum over the last ~5 steps, since one length-grouped batch alone is noisy) and ``mean |d|``
  over all pairs makes η unit-free (α·d is of order one). The root balances each update; λ
  removes, measured, the drift the balance misses within the run, and stops integrating
  once α is at 0 (no wind-up); c corrects, across iterations, the drift an earlier
  iteration left (κ = 2: a policy sampled 10 % too long trains with 21 % more α).

  Why c and not λ for the drift already there: λ follows an estimate that sees only the two
  answers of each pair (it cannot exceed the longer one), so it under-reads growth; driven
  by a standing offset it wound α down to 0 within an iteration and the policy grew like
  iDPO's (seen on examples/word_forms). The factor c is bounded and applied once.

The length estimate needs no sampling. A pair's two responses were drawn from the policy
that sampled them, π_s; reweighting them by ``π_θ/π_s`` estimates the length the current
policy would give that prompt (self-normalised importance sampling over the two),

      ℓ̂_i = (e^{Δ_w}·|y_w| + e^{Δ_l}·|y_l|) / (e^{Δ_w} + e^{Δ_l}) = |y_l| + d_i·σ(h_i),

which is ``(|y_w| + |y_l|)/2`` at h = 0. The relative change ``Σ ℓ̂_i / Σ ℓ̂_i(h=0)`` over a
step's pairs, times L̄_s, is ``L̂_k``. In the loop, π_s is π_{t−1}, L̄_s is measured on
iteration t's samples and L* on iteration 1's (π₀'s) unless ``length_control.target`` is
given. Under ``prefloop train`` (no samples), L̄_s is the pairs' mean response length.

The estimate uses h = Δ_w − Δ_l with the reference log-probs the loss uses; in the loop the
reference is π_s (``reference: previous``, the paper's), for which it is the estimate above.
With ``reference: initial`` h also carries earlier iterations' changes: a known bias.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from prefloop.losses import length_neutral_alpha


def length_estimates(h: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor) -> Tensor:
    """(b, 2): per pair, ``|y_l| + d·σ(h)`` (the current policy's importance-weighted
    length of the pair's two responses) and ``(|y_w| + |y_l|)/2`` (the same at h = 0)."""
    h = h.detach().float()
    d = (chosen_lengths - rejected_lengths).float()
    now = rejected_lengths.float() + d * torch.sigmoid(h)
    start = (chosen_lengths.float() + rejected_lengths.float()) / 2
    return torch.stack([now, start], dim=1)


# κ of the drift factor c = (L̄_s / L*)^κ.
DRIFT_EXPONENT = 2.0


@dataclass
class LengthGoal:
    """What the target mode steers to: ``target`` (L*) given the measured mean length
    ``start`` (L̄_s) of the policy that sampled the pairs, both in the loss's length unit."""

    start: float
    target: float

    @property
    def drift_factor(self) -> float:
        """c = (L̄_s / L*)^κ: more α for a policy that already answers too long."""
        return (self.start / self.target) ** DRIFT_EXPONENT


@dataclass
class AlphaController:
    """α of one training run; `alpha` is what the next loss evaluation uses."""

    mode: str
    alpha: float
    goal: LengthGoal | None = None
    rate: float = 1.0
    gap_scale: float = 1.0  # mean |d| over the run's pairs
    correction: float = 0.0  # λ: the target mode's integrated correction on top of c·root
    root: float = 0.0  # the last per-step root
    smoothed: tuple[float, float] = (0.0, 0.0)  # running Σ ℓ̂_i and Σ ℓ̂_i(h=0)
    history: list[float] = field(default_factory=list)  # α of every optimizer step

    @classmethod
    def start(cls, mode: str, length_gaps: Tensor, fixed_alpha: float | None = None,
              goal: LengthGoal | None = None, rate: float = 1.0) -> AlphaController:
        """α before the first step: the given one (`fixed`), else the first-step root; the
        `per_step` and `target` modes start from `fixed_alpha` when no winner is shorter
        (no root), and correct it from there.

        Raises:
            ValueError: from `length_neutral_alpha` under `first_step` when no winner is
                shorter.
        """
        if mode == "fixed":
            return cls(mode, float(fixed_alpha))
        try:
            alpha = length_neutral_alpha(length_gaps)
        except ValueError:
            if mode == "first_step" or fixed_alpha is None:
                raise
            alpha = float(fixed_alpha)
        scale = float(length_gaps.abs().float().mean()) if length_gaps.numel() else 1.0
        goal = goal if mode == "target" else None
        first = alpha * goal.drift_factor if goal is not None else alpha
        return cls(mode, first, goal, rate, max(scale, 1e-8), root=alpha)

    def after_step(self, h: Tensor, chosen_lengths: Tensor, rejected_lengths: Tensor,
                   beta: float) -> dict[str, float]:
        """Record the α the step used and set the next step's from the step's pairs (their
        h, gathered over processes, so every process agrees): under `per_step` and
        `target` the root at margins β·h; under `target` scaled by c, plus λ moved by the
        dual update on the running length estimate; α ≥ 0. Returns the step's log fields:
        α used, and L̂, L* and λ under `target`."""
        record = {"alpha": self.alpha}
        self.history.append(self.alpha)
        if self.mode not in ("per_step", "target"):
            return record
        try:
            root = length_neutral_alpha(chosen_lengths - rejected_lengths, beta * h)
        except ValueError:  # no shorter winner in this step: keep the last root
            root = self.root
        self.root = root
        if self.goal is None:
            self.alpha = root
            return record
        c = self.goal.drift_factor
        estimates = length_estimates(h, chosen_lengths, rejected_lengths).sum(0)
        now, start = self.smoothed
        self.smoothed = (SMOOTHING * now + float(estimates[0]),
                         SMOOTHING * start + float(estimates[1]))
        ratio = self.smoothed[0] / self.smoothed[1]  # L̂_k / L̄_s
        self.correction = max(-c * root,
                              self.correction + self.rate * (ratio - 1) / self.gap_scale)
        self.alpha = max(0.0, c * root + self.correction)
        record.update(length_estimate=self.goal.start * ratio, length_target=self.goal.target,
                      alpha_correction=self.correction)
        return record


SMOOTHING = 0.8  # weight of the running sums at each step (an effective window of 5 steps)
