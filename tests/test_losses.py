"""Tests for prefloop.losses: hand-worked values, exact reductions, gradients, stability,
registry behaviour and properties (hypothesis).

Expected values are computed with Python's ``math`` from the formulas in METHODS.md, never
by calling the function under test.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefloop.losses import (
    FEATURE_FIELDS,
    LOSSES,
    LossOutput,
    PreferenceLogps,
    compute_loss,
    get_loss,
    length_neutral_alpha,
)

F64 = torch.float64
ALL_LOSSES = sorted(LOSSES)
EXPECTED_NAMES = {
    "dpo", "lr_dpo", "cdpo", "rdpo", "ipo", "hinge", "simpo", "dpop", "nca_pair", "bco_pair",
    "sppo_hard", "tdpo1", "tdpo2", "sppo", "xpo", "dadpo",
}  # fmt: skip


def nls(z: float) -> float:
    """−log σ(z) = log(1 + e^(−z)), in plain floating point (|z| small in these tests)."""
    return math.log1p(math.exp(-z))


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def assert_values(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# One small batch of two pairs, used by every hand-worked test below.
#
#   policy_chosen   lp(y_w) = [-10, -12]      ref_chosen   lr(y_w) = [-12, -11]
#   policy_rejected lp(y_l) = [-14, -11]      ref_rejected lr(y_l) = [-13, -13]
#   Δ_w = lp_w − lr_w = [2, -1]     Δ_l = lp_l − lr_l = [-1, 2]     h = Δ_w − Δ_l = [3, -3]
#   so pair 0 is ordered correctly by the policy, pair 1 wrongly.
#   At β = 0.1: β·h = [0.3, -0.3], rewards β·Δ_w = [0.2, -0.1], β·Δ_l = [-0.1, 0.2].
#
#   chosen_tokens n_w = [4, 10]     rejected_tokens n_l = [2, 5]
#   chosen_lengths |y_w| = [120, 40]   rejected_lengths |y_l| = [80, 100]  (Δlen = [40, -60])
#   chosen_kl D_w = [0.5, 2.0]      rejected_kl D_l = [1.5, 1.0]   (D_l − D_w = [1, -1])
#   teacher l_T(y_w) = [-9, -10]    l_T(y_l) = [-15, -16]
#   targets P̂_w = [0.75, 0.6]       P̂_l = [0.25, 0.4]
#   explore lp(ỹ) = [-30, -50]
# --------------------------------------------------------------------------------------------


def example(requires_grad: bool = False) -> PreferenceLogps:
    return PreferenceLogps(
        policy_chosen=t(-10, -12).requires_grad_(requires_grad),
        policy_rejected=t(-14, -11).requires_grad_(requires_grad),
        ref_chosen=t(-12, -11),
        ref_rejected=t(-13, -13),
        chosen_tokens=t(4, 10),
        rejected_tokens=t(2, 5),
        chosen_lengths=t(120, 40),
        rejected_lengths=t(80, 100),
        chosen_kl=t(0.5, 2.0).requires_grad_(requires_grad),
        rejected_kl=t(1.5, 1.0).requires_grad_(requires_grad),
        teacher_chosen=t(-9, -10),
        teacher_rejected=t(-15, -16),
        chosen_target=t(0.75, 0.6),
        rejected_target=t(0.25, 0.4),
        explore_logps=t(-30, -50).requires_grad_(requires_grad),
    )


BETA_REWARDS = ([0.2, -0.1], [-0.1, 0.2])  # β·Δ_w, β·Δ_l at β = 0.1


def check(out: LossOutput, losses: list[float], rewards=BETA_REWARDS) -> None:
    assert_values(out.losses, losses)
    assert_values(out.chosen_rewards, rewards[0])
    assert_values(out.rejected_rewards, rewards[1])


# --------------------------------------------------------------------------------------------
# Hand-worked values, one test per registered loss
# --------------------------------------------------------------------------------------------


def test_dpo_values():
    # −log σ(β·h), β·h = [0.3, -0.3]
    check(compute_loss("dpo", example(), beta=0.1), [nls(0.3), nls(-0.3)])


def test_lr_dpo_values():
    # z = β·h + α·(|y_w| − |y_l|) = [0.3, -0.3] + 0.01·[40, -60] = [0.3 + 0.4, -0.3 - 0.6]
    out = compute_loss("lr_dpo", example(), beta=0.1, alpha=0.01, lam=0.0)
    check(out, [nls(0.7), nls(-0.9)])


def test_lr_dpo_anchor_values():
    # anchor = max(0, lr_w − lp_w) = [0, 1] (the second chosen fell below its reference)
    # z = β·(h − λ·anchor) + α·Δlen = 0.1·[3 − 0, −3 − 5] + 0.01·[40, −60] = [0.7, −1.4]
    out = compute_loss("lr_dpo", example(), beta=0.1, alpha=0.01, lam=5.0)
    check(out, [nls(0.7), nls(-1.4)])
    # λ = 5 is the default
    check(compute_loss("lr_dpo", example(), beta=0.1, alpha=0.01), [nls(0.7), nls(-1.4)])


def test_cdpo_values():
    # (1−ε)·nls(β·h) + ε·nls(−β·h), ε = 0.1
    out = compute_loss("cdpo", example(), beta=0.1, epsilon=0.1)
    check(out, [0.9 * nls(0.3) + 0.1 * nls(-0.3), 0.9 * nls(-0.3) + 0.1 * nls(0.3)])


def test_rdpo_values():
    # [(1−ε)·nls(β·h) − ε·nls(−β·h)] / (1 − 2ε), ε = 0.1 → denominator 0.8
    out = compute_loss("rdpo", example(), beta=0.1, epsilon=0.1)
    expected = [
        (0.9 * nls(0.3) - 0.1 * nls(-0.3)) / 0.8,
        (0.9 * nls(-0.3) - 0.1 * nls(0.3)) / 0.8,
    ]
    check(out, expected)


def test_ipo_values():
    # h̄ = Δ_w/n_w − Δ_l/n_l = [2/4 − (−1)/2, −1/10 − 2/5] = [1.0, −0.5]
    # target 1/(2β) = 5 → (1 − 5)² = 16, (−0.5 − 5)² = 30.25
    check(compute_loss("ipo", example(), beta=0.1), [16.0, 30.25])


def test_hinge_values():
    # max(0, 1 − β·h): β = 0.1 → [1 − 0.3, 1 + 0.3] = [0.7, 1.3]
    check(compute_loss("hinge", example(), beta=0.1), [0.7, 1.3])
    # β = 0.5 → β·h = [1.5, −1.5] → [max(0, −0.5), 2.5] = [0, 2.5]; rewards 0.5·Δ
    out = compute_loss("hinge", example(), beta=0.5)
    check(out, [0.0, 2.5], rewards=([1.0, -0.5], [-0.5, 1.0]))


def test_simpo_values():
    # β = 2, γ = gamma_ratio·β = 0.5·2 = 1
    # r_w = β·lp_w/n_w = 2·[−10/4, −12/10] = [−5, −2.4]
    # r_l = β·lp_l/n_l = 2·[−14/2, −11/5]  = [−14, −4.4]
    # z = r_w − r_l − γ = [9 − 1, 2 − 1] = [8, 1]
    out = compute_loss("simpo", example(), beta=2.0, gamma_ratio=0.5)
    check(out, [nls(8.0), nls(1.0)], rewards=([-5.0, -2.4], [-14.0, -4.4]))


def test_dpop_values():
    # penalty = max(0, lr_w − lp_w) = max(0, [−12 + 10, −11 + 12]) = [0, 1]
    # z = β·(h − λ·penalty) = 0.1·[3 − 0, −3 − 50] = [0.3, −5.3]
    check(compute_loss("dpop", example(), beta=0.1, lam=50.0), [nls(0.3), nls(-5.3)])


def test_nca_pair_values():
    # r_w = β·Δ_w = [0.2, −0.1], r_l = β·Δ_l = [−0.1, 0.2]
    # nls(r_w) + ½·nls(−r_w) + ½·nls(−r_l)
    expected = [
        nls(0.2) + 0.5 * nls(-0.2) + 0.5 * nls(0.1),
        nls(-0.1) + 0.5 * nls(0.1) + 0.5 * nls(-0.2),
    ]
    check(compute_loss("nca_pair", example(), beta=0.1), expected)


def test_bco_pair_values():
    # nls(r_w) + nls(−r_l) with r_w = [0.2, −0.1], r_l = [−0.1, 0.2]
    expected = [nls(0.2) + nls(0.1), nls(-0.1) + nls(-0.2)]
    check(compute_loss("bco_pair", example(), beta=0.1), expected)


def test_sppo_hard_values():
    # target 1/(2β) = 5: (Δ_w − 5)² + (Δ_l + 5)²
    # pair 0: (2 − 5)² + (−1 + 5)² = 9 + 16 = 25;  pair 1: (−1 − 5)² + (2 + 5)² = 36 + 49 = 85
    check(compute_loss("sppo_hard", example(), beta=0.1), [25.0, 85.0])


def test_tdpo1_values():
    # z = β·[h − (D_l − D_w)] = 0.1·[3 − 1, −3 + 1] = [0.2, −0.2]
    check(compute_loss("tdpo1", example(), beta=0.1), [nls(0.2), nls(-0.2)])


def test_tdpo2_values():
    # z = β·[h − α·(D_l − D_w)] = 0.1·[3 − 0.5·1, −3 + 0.5·1] = [0.25, −0.25]
    check(compute_loss("tdpo2", example(), beta=0.1, alpha=0.5), [nls(0.25), nls(-0.25)])


def test_sppo_values():
    # β = 0.5: targets (P̂ − ½)/β: chosen [0.25/0.5, 0.1/0.5] = [0.5, 0.2],
    #                             rejected [−0.5, −0.2]
    # pair 0: ½[(2 − 0.5)² + (−1 + 0.5)²] = ½[2.25 + 0.25] = 1.25
    # pair 1: ½[(−1 − 0.2)² + (2 + 0.2)²] = ½[1.44 + 4.84] = 3.14
    out = compute_loss("sppo", example(), beta=0.5)
    check(out, [1.25, 3.14], rewards=([1.0, -0.5], [-0.5, 1.0]))


def test_xpo_values():
    # nls(β·h) + α·lp(ỹ), α = 0.01: [nls(0.3) − 0.3, nls(−0.3) − 0.5]
    out = compute_loss("xpo", example(), beta=0.1, alpha=0.01)
    check(out, [nls(0.3) - 0.3, nls(-0.3) - 0.5])


def test_dadpo_values():
    # β = 0.1, γ = 0.5:
    # (β+γ)[lp_w − lp_l] = 0.6·[4, −1]   = [2.4, −0.6]
    # β[lr_w − lr_l]     = 0.1·[1, 2]    = [0.1, 0.2]
    # γ[lT_w − lT_l]     = 0.5·[6, 6]    = [3, 3]
    # z = [2.4 − 0.1 − 3, −0.6 − 0.2 − 3] = [−0.7, −3.8]
    # r = 0.6·lp − 0.1·lr − 0.5·lT:
    #   r_w = [−6 + 1.2 + 4.5, −7.2 + 1.1 + 5] = [−0.3, −1.1]
    #   r_l = [−8.4 + 1.3 + 7.5, −6.6 + 1.3 + 8] = [0.4, 2.7]   (and r_w − r_l = z)
    out = compute_loss("dadpo", example(), beta=0.1, gamma=0.5)
    check(out, [nls(-0.7), nls(-3.8)], rewards=([-0.3, -1.1], [0.4, 2.7]))


def test_every_registered_loss_has_a_hand_worked_test():
    tested = {name.removeprefix("test_").removesuffix("_values") for name in globals()}
    assert set(LOSSES) <= tested
    assert set(LOSSES) == EXPECTED_NAMES


def test_defaults_are_used():
    # Defaults: dpo β = 0.1, so the same as test_dpo_values; simpo β = 2, gamma_ratio = 0.5.
    assert_values(compute_loss("dpo", example()).losses, [nls(0.3), nls(-0.3)])
    assert_values(compute_loss("simpo", example()).losses, [nls(8.0), nls(1.0)])


# --------------------------------------------------------------------------------------------
# Exact reductions to DPO
# --------------------------------------------------------------------------------------------


def random_logps(n: int = 64, seed: int = 0, dtype=torch.float32) -> PreferenceLogps:
    g = torch.Generator().manual_seed(seed)

    def r(scale: float = 20.0, shift: float = -40.0) -> torch.Tensor:
        return (torch.rand(n, generator=g, dtype=dtype) * scale + shift).requires_grad_()

    def pos(lo: float, hi: float) -> torch.Tensor:
        return torch.randint(int(lo), int(hi), (n,), generator=g).to(dtype)

    return PreferenceLogps(
        policy_chosen=r(),
        policy_rejected=r(),
        ref_chosen=r().detach(),
        ref_rejected=r().detach(),
        chosen_tokens=pos(1, 50),
        rejected_tokens=pos(1, 50),
        chosen_lengths=pos(1, 400),
        rejected_lengths=pos(1, 400),
        chosen_kl=r(2.0, 0.0),
        rejected_kl=r(2.0, 0.0),
        teacher_chosen=r().detach(),
        teacher_rejected=r().detach(),
        chosen_target=torch.rand(n, generator=g, dtype=dtype),
        rejected_target=torch.rand(n, generator=g, dtype=dtype),
        explore_logps=r(),
    )


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("lr_dpo", {"alpha": 0.0, "lam": 0.0}),
        ("cdpo", {"epsilon": 0.0}),
        ("rdpo", {"epsilon": 0.0}),
        ("dadpo", {"gamma": 0.0}),
        ("dpop", {"lam": 0.0}),
        ("tdpo2", {"alpha": 0.0}),
        ("xpo", {"alpha": 0.0}),
    ],
)
@pytest.mark.parametrize("beta", [0.05, 0.1, 0.7])
def test_reduces_exactly_to_dpo(name, params, beta):
    logps = random_logps(seed=int(beta * 100))
    reference = compute_loss("dpo", logps, beta=beta)
    out = compute_loss(name, logps, beta=beta, **params)
    assert torch.equal(out.losses, reference.losses)  # bitwise, not just close
    assert torch.equal(out.chosen_rewards, reference.chosen_rewards)
    assert torch.equal(out.rejected_rewards, reference.rejected_rewards)


def test_sppo_with_hard_targets_is_half_sppo_hard():
    logps = dataclasses.replace(
        random_logps(dtype=F64), chosen_target=torch.ones(64, dtype=F64),
        rejected_target=torch.zeros(64, dtype=F64),
    )  # fmt: skip
    soft = compute_loss("sppo", logps, beta=0.2).losses
    hard = compute_loss("sppo_hard", logps, beta=0.2).losses
    torch.testing.assert_close(soft, 0.5 * hard, rtol=1e-12, atol=1e-12)


def test_dadpo_with_teacher_equal_to_reference_is_dpo_at_beta_plus_gamma():
    # −log σ((β+γ)·Π − β·R − γ·R) = −log σ((β+γ)·h) when l_T = lr
    logps = random_logps(dtype=F64)
    logps = dataclasses.replace(
        logps, teacher_chosen=logps.ref_chosen, teacher_rejected=logps.ref_rejected
    )
    out = compute_loss("dadpo", logps, beta=0.1, gamma=0.3).losses
    torch.testing.assert_close(out, compute_loss("dpo", logps, beta=0.4).losses)


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def grad_wrt_chosen(name: str, logps: PreferenceLogps, **params) -> torch.Tensor:
    logps.policy_chosen.grad = None
    compute_loss(name, logps, **params).losses.sum().backward()
    return logps.policy_chosen.grad.clone()


def test_lr_dpo_gradient_shrinks_as_length_margin_grows():
    # Winner longer by 100 units; h = 0 so DPO alone gives the gradient −β·σ(0) = −β/2.
    # ∂L/∂lp_w = −β·σ(−(β·h + α·Δlen)): its magnitude must fall strictly as α grows.
    logps = PreferenceLogps(
        policy_chosen=t(-20.0).requires_grad_(),
        policy_rejected=t(-20.0).requires_grad_(),
        ref_chosen=t(-20.0),
        ref_rejected=t(-20.0),
        chosen_lengths=t(300.0),
        rejected_lengths=t(200.0),
    )
    alphas = [0.0, 0.001, 0.005, 0.01, 0.02, 0.05]
    grads = [grad_wrt_chosen("lr_dpo", logps, beta=0.1, alpha=a).item() for a in alphas]
    magnitudes = [abs(g) for g in grads]
    assert all(g < 0 for g in grads)  # still pushes lp(y_w) up, only less
    assert all(a > b for a, b in itertools.pairwise(magnitudes))
    for a, g in zip(alphas, grads, strict=True):  # and matches the closed form
        assert g == pytest.approx(-0.1 / (1.0 + math.exp(a * 100.0)), rel=1e-12)
    # With the loser longer the push toward the (shorter) winner grows instead.
    logps.chosen_lengths, logps.rejected_lengths = t(200.0), t(300.0)
    shorter = [abs(grad_wrt_chosen("lr_dpo", logps, beta=0.1, alpha=a).item()) for a in alphas]
    assert all(a < b for a, b in itertools.pairwise(shorter))


# --------------------------------------------------------------------------------------------
# loss.auto_alpha: the α whose first update is length-neutral
# --------------------------------------------------------------------------------------------


def test_length_neutral_alpha_hand_worked():
    # gaps (2, −1): 2·σ(−2α) = σ(α) ⇔ with u = e^α: 2(1 + u) = u(1 + u²) ⇔ u³ − u − 2 = 0,
    # whose real root is u = 1.52137970680457…, so α = ln u.
    u = 1.0
    for _ in range(60):  # Newton on u³ − u − 2
        u -= (u**3 - u - 2) / (3 * u**2 - 1)
    alpha = length_neutral_alpha(torch.tensor([2.0, -1.0]))
    assert alpha == pytest.approx(math.log(u), rel=1e-9)
    assert math.log(u) == pytest.approx(0.419618, abs=1e-6)


def test_length_neutral_alpha_balances_the_gradient_weights_of_lr_dpo():
    # at h = 0 the gradient of pair i in lp(y_w) is −β·σ(−α·d_i): at the returned α the
    # gradient-weighted length gap Σ_i |∂L_i/∂lp(y_w)|·d_i is zero
    gaps = torch.tensor([30.0, 12.0, 5.0, -4.0, -10.0, 22.0, 1.0], dtype=F64)
    alpha = length_neutral_alpha(gaps)
    n = len(gaps)
    logps = PreferenceLogps(policy_chosen=torch.zeros(n, dtype=F64, requires_grad=True),
                            policy_rejected=torch.zeros(n, dtype=F64),
                            ref_chosen=torch.zeros(n, dtype=F64),
                            ref_rejected=torch.zeros(n, dtype=F64),
                            chosen_lengths=gaps + 50, rejected_lengths=torch.full((n,), 50.0,
                                                                                  dtype=F64))
    weights = -grad_wrt_chosen("lr_dpo", logps, beta=0.1, alpha=alpha)
    assert float((weights * gaps).sum()) == pytest.approx(0.0, abs=1e-9)
    # a smaller α still leans towards longer winners, a larger one towards shorter
    for a, sign in ((0.9 * alpha, 1), (1.1 * alpha, -1)):
        w = -grad_wrt_chosen("lr_dpo", logps, beta=0.1, alpha=a)
        assert sign * float((w * gaps).sum()) > 0


def test_length_neutral_alpha_edge_cases():
    assert length_neutral_alpha(torch.tensor([-3.0, 1.0, 2.0])) == 0.0  # Σd ≤ 0: no penalty
    assert length_neutral_alpha(torch.tensor([])) == 0.0
    assert length_neutral_alpha(torch.zeros(4)) == 0.0
    with pytest.raises(ValueError, match="at least as long"):
        length_neutral_alpha(torch.tensor([3.0, 0.0, 5.0]))
    with pytest.raises(ValueError, match="finite"):
        length_neutral_alpha(torch.tensor([3.0, float("nan"), -5.0]))
    # integer gaps (token counts) work as they are
    assert length_neutral_alpha(torch.tensor([2, -1])) == pytest.approx(0.4196176, rel=1e-6)
    # per unit of length: gaps in characters (×c) give α / c
    gaps = torch.tensor([40.0, -8.0, 15.0, -2.0])
    assert length_neutral_alpha(gaps * 4.5) == pytest.approx(length_neutral_alpha(gaps) / 4.5,
                                                             rel=1e-9)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(-200, 200), min_size=2, max_size=60))
def test_length_neutral_alpha_is_the_root(gaps):
    d = torch.tensor(gaps, dtype=F64)
    if float(d.sum()) > 0 and bool((d < 0).any()):
        alpha = length_neutral_alpha(d)
        assert alpha > 0

        def f(a):
            return float((torch.sigmoid(-a * d) * d).sum())

        assert f(alpha * (1 - 1e-6)) >= -1e-9 and f(alpha * (1 + 1e-6)) <= 1e-9
    elif float(d.sum()) <= 0:
        assert length_neutral_alpha(d) == 0.0


def test_dpo_gradient_directions():
    logps = random_logps(dtype=F64)
    compute_loss("dpo", logps).losses.sum().backward()
    # Gradient descent moves against the gradient: lp(y_w) up, lp(y_l) down.
    assert (logps.policy_chosen.grad < 0).all()
    assert (logps.policy_rejected.grad > 0).all()
    # And the two are equal and opposite: the loss depends only on h.
    torch.testing.assert_close(logps.policy_chosen.grad, -logps.policy_rejected.grad)


def test_tdpo2_blocks_gradient_through_chosen_kl():
    logps = example(requires_grad=True)
    compute_loss("tdpo2", logps).losses.sum().backward()
    assert logps.chosen_kl.grad is None or torch.all(logps.chosen_kl.grad == 0)
    assert torch.all(logps.rejected_kl.grad != 0)
    # TDPO1 does let it through.
    logps = example(requires_grad=True)
    compute_loss("tdpo1", logps).losses.sum().backward()
    assert torch.all(logps.chosen_kl.grad != 0)


def test_rewards_are_detached():
    for name in ALL_LOSSES:
        out = compute_loss(name, random_logps())
        assert out.losses.requires_grad, name
        assert not out.chosen_rewards.requires_grad, name
        assert not out.rejected_rewards.requires_grad, name
        assert out.losses.shape == out.chosen_rewards.shape == out.rejected_rewards.shape == (64,)


# --------------------------------------------------------------------------------------------
# Stability: |β·h| ≈ 1e3 in float32
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_finite_at_extreme_margins(name, sign):
    beta = LOSSES[name].defaults["beta"]
    half = sign * 1e3 / beta / 2.0  # lp_w − lp_l = ±1e3/β, so β·h = ±1e3 (references 0)
    ones = torch.ones(3)
    logps = PreferenceLogps(
        policy_chosen=(half * ones).requires_grad_(),
        policy_rejected=(-half * ones).requires_grad_(),
        ref_chosen=torch.zeros(3),
        ref_rejected=torch.zeros(3),
        chosen_tokens=ones,  # one token each: SimPO's β·lp/n margin is ±1e3 as well
        rejected_tokens=ones,
        chosen_lengths=torch.tensor([10.0, 500.0, 2000.0]),
        rejected_lengths=torch.tensor([2000.0, 500.0, 10.0]),
        chosen_kl=torch.tensor([0.0, 5.0, 50.0]).requires_grad_(),
        rejected_kl=torch.tensor([50.0, 5.0, 0.0]).requires_grad_(),
        teacher_chosen=torch.full((3,), -half),
        teacher_rejected=torch.full((3,), half),
        chosen_target=torch.tensor([1.0, 0.5, 0.0]),
        rejected_target=torch.tensor([0.0, 0.5, 1.0]),
        explore_logps=torch.full((3,), -abs(half)).requires_grad_(),
    )
    out = compute_loss(name, logps)
    assert torch.isfinite(out.losses).all()
    assert torch.isfinite(out.chosen_rewards).all() and torch.isfinite(out.rejected_rewards).all()
    out.losses.sum().backward()
    for field in ("policy_chosen", "policy_rejected", "chosen_kl", "rejected_kl", "explore_logps"):
        grad = getattr(logps, field).grad
        assert grad is None or torch.isfinite(grad).all(), field


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------


def test_registry_names_and_specs():
    assert set(LOSSES) == EXPECTED_NAMES
    for name, spec in LOSSES.items():
        assert spec.name == name
        assert spec.needs <= set(FEATURE_FIELDS)
        assert spec.paper
        assert "beta" in spec.defaults
        # defaults are the loss function's own keyword defaults
        sig = inspect.signature(spec.fn).parameters
        assert {k: float(sig[k].default) for k in spec.defaults} == dict(spec.defaults)
        assert spec.fn.__doc__ and len(spec.fn.__doc__.splitlines()) >= 10, name
    assert get_loss("dpo") is LOSSES["dpo"]


def test_reference_free_only_simpo():
    assert {name for name, spec in LOSSES.items() if spec.reference_free} == {"simpo"}
    # And simpo really runs without reference fields.
    logps = PreferenceLogps(t(-4.0), t(-6.0), chosen_tokens=t(2.0), rejected_tokens=t(2.0))
    # z = 2·(−2) − 2·(−3) − 1 = 1
    assert_values(compute_loss("simpo", logps).losses, [nls(1.0)])


def test_preference_logps_fields_are_all_covered_by_features():
    names = {f.name for f in dataclasses.fields(PreferenceLogps)}
    grouped = [f for group in FEATURE_FIELDS.values() for f in group]
    assert len(grouped) == len(set(grouped))
    assert names == {"policy_chosen", "policy_rejected", *grouped}


def test_unknown_loss_lists_valid_names():
    with pytest.raises(ValueError, match="unknown loss 'dpoo'") as err:
        get_loss("dpoo")
    assert ", ".join(sorted(LOSSES)) in str(err.value)
    assert "did you mean 'dpo'" in str(err.value)
    with pytest.raises(ValueError, match="valid losses"):
        compute_loss("kto", example())


def test_unknown_parameter_lists_accepted_ones():
    with pytest.raises(ValueError, match=r"'dpo' does not take parameter\(s\) alpha") as err:
        compute_loss("dpo", example(), alpha=0.01)
    assert "accepts: beta" in str(err.value)
    # An option that does not apply to a loss raises (no silent ignoring).
    with pytest.raises(ValueError, match="accepts: beta, gamma_ratio"):
        compute_loss("simpo", example(), gamma=1.0)
    with pytest.raises(ValueError, match="accepts: alpha, beta"):
        compute_loss("lr_dpo", example(), epsilon=0.1)


def test_missing_field_is_named():
    bare = PreferenceLogps(t(-1.0), t(-2.0), ref_chosen=t(-1.0), ref_rejected=t(-2.0))
    with pytest.raises(ValueError, match=r"'lr_dpo' needs .*chosen_lengths, rejected_lengths"):
        compute_loss("lr_dpo", bare)
    with pytest.raises(ValueError, match=r"'ipo' needs .*chosen_tokens"):
        compute_loss("ipo", bare)
    with pytest.raises(ValueError, match=r"'xpo' needs .*explore_logps"):
        compute_loss("xpo", bare)
    with pytest.raises(ValueError, match=r"'dpo' needs .*ref_chosen, ref_rejected"):
        compute_loss("dpo", PreferenceLogps(t(-1.0), t(-2.0)))
    only_one = dataclasses.replace(bare, teacher_chosen=t(-1.0))
    with pytest.raises(ValueError, match=r"'dadpo' needs .*teacher_rejected") as err:
        compute_loss("dadpo", only_one)
    assert "teacher_chosen" not in str(err.value).split("(")[0]


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("dpo", {"beta": 0.0}, "beta must be > 0"),
        ("dpo", {"beta": -0.1}, "beta must be > 0"),
        ("dpo", {"beta": float("nan")}, "beta must be > 0"),
        ("dpo", {"beta": float("inf")}, "beta must be > 0"),
        ("lr_dpo", {"alpha": -0.01}, "alpha must be >= 0"),
        ("cdpo", {"epsilon": 0.5}, r"epsilon must be in \[0, 0.5\)"),
        ("rdpo", {"epsilon": -0.1}, r"epsilon must be in \[0, 0.5\)"),
        ("dpop", {"lam": -1.0}, "lam must be >= 0"),
        ("dadpo", {"gamma": -0.5}, "gamma must be >= 0"),
        ("simpo", {"gamma_ratio": -0.5}, "gamma_ratio must be >= 0"),
        ("tdpo2", {"alpha": -1.0}, "alpha must be >= 0"),
    ],
)
def test_parameter_ranges(name, params, message):
    with pytest.raises(ValueError, match=message):
        compute_loss(name, example(), **params)


def test_parameter_types_and_shapes():
    with pytest.raises(TypeError, match="beta must be a real number"):
        compute_loss("dpo", example(), beta="0.1")
    with pytest.raises(TypeError, match="beta must be a real number"):
        compute_loss("dpo", example(), beta=True)
    assert_values(compute_loss("dpo", example(), beta=1).losses, [nls(3.0), nls(-3.0)])  # int ok
    wrong = dataclasses.replace(example(), ref_rejected=t(-13.0))
    with pytest.raises(ValueError, match="ref_rejected has shape"):
        compute_loss("dpo", wrong)
    with pytest.raises(TypeError, match="PreferenceLogps"):
        compute_loss("dpo", {"policy_chosen": t(1.0)})
    with pytest.raises(TypeError, match=r"policy_chosen must be a torch\.Tensor"):
        compute_loss("dpo", dataclasses.replace(example(), policy_chosen=[-10.0, -12.0]))


def test_module_imports_without_transformers():
    # Load losses.py on its own (not through the package __init__) in a fresh interpreter.
    path = Path(__file__).resolve().parents[1] / "src" / "prefloop" / "losses.py"
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('losses_alone', {str(path)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "sys.modules['losses_alone'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "assert 'dpo' in mod.LOSSES\n"
        "heavy = ('transformers', 'accelerate', 'datasets', 'trl')\n"
        "assert not [m for m in heavy if m in sys.modules], sys.modules.keys()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------------------------
# Properties (hypothesis)
# --------------------------------------------------------------------------------------------

finite = st.floats(min_value=-200.0, max_value=200.0, allow_nan=False, allow_infinity=False)
betas = st.floats(min_value=0.01, max_value=1.0)
FAST = settings(max_examples=60, deadline=None)


def pair(lp_w: float, lp_l: float, lr_w: float = 0.0, lr_l: float = 0.0, **extra):
    return PreferenceLogps(t(lp_w), t(lp_l), ref_chosen=t(lr_w), ref_rejected=t(lr_l), **extra)


@FAST
@given(h1=finite, h2=finite, beta=betas)
def test_dpo_nonnegative_and_decreasing_in_h(h1, h2, beta):
    lo, hi = sorted((h1, h2))
    loss_lo = compute_loss("dpo", pair(lo, 0.0), beta=beta).losses.item()
    loss_hi = compute_loss("dpo", pair(hi, 0.0), beta=beta).losses.item()
    assert loss_lo >= 0.0 and loss_hi >= 0.0
    assert loss_lo >= loss_hi
    if hi - lo > 1e-6 and beta * hi < 30:  # strictly, away from float saturation
        assert loss_lo > loss_hi


@FAST
@given(lp_w=finite, lp_l=finite, lr_w=finite, lr_l=finite, beta=betas)
def test_dpo_swap_gives_negative_margin(lp_w, lp_l, lr_w, lr_l, beta):
    h = (lp_w - lr_w) - (lp_l - lr_l)
    swapped = compute_loss("dpo", pair(lp_l, lp_w, lr_l, lr_w), beta=beta).losses.item()
    # −log σ(−β·h) = log(1 + e^(β·h)), written stably for large β·h
    z = beta * h
    expected = z + math.log1p(math.exp(-z)) if z > 0 else math.log1p(math.exp(z))
    assert swapped == pytest.approx(expected, rel=1e-9, abs=1e-9)


@FAST
@given(
    lp_w=finite, lp_l=finite, lr_w=finite, lr_l=finite, beta=betas,
    alpha=st.floats(min_value=0.0, max_value=0.1),
    len_w=st.integers(1, 3000), len_l=st.integers(1, 3000),
)  # fmt: skip
def test_lr_dpo_is_dpo_at_shifted_margin(lp_w, lp_l, lr_w, lr_l, beta, alpha, len_w, len_l):
    lengths = {"chosen_lengths": t(len_w), "rejected_lengths": t(len_l)}
    lr = compute_loss("lr_dpo", pair(lp_w, lp_l, lr_w, lr_l, **lengths), beta=beta, alpha=alpha,
                      lam=0.0)
    # h + (α/β)·Δlen, realised by shifting lp(y_w)
    shift = alpha / beta * (len_w - len_l)
    dpo = compute_loss("dpo", pair(lp_w + shift, lp_l, lr_w, lr_l), beta=beta)
    torch.testing.assert_close(lr.losses, dpo.losses, rtol=1e-9, atol=1e-9)


@FAST
@given(
    lp_w=finite, lp_l=finite, lr_w=finite, lr_l=finite, beta=betas,
    lam=st.floats(min_value=0.0, max_value=50.0), len_w=st.integers(1, 3000),
)  # fmt: skip
def test_lr_dpo_without_length_margin_is_dpop(lp_w, lp_l, lr_w, lr_l, beta, lam, len_w):
    lengths = {"chosen_lengths": t(len_w), "rejected_lengths": t(len_w + 7)}
    lr = compute_loss("lr_dpo", pair(lp_w, lp_l, lr_w, lr_l, **lengths), beta=beta, alpha=0.0,
                      lam=lam)
    dpop = compute_loss("dpop", pair(lp_w, lp_l, lr_w, lr_l), beta=beta, lam=lam)
    torch.testing.assert_close(lr.losses, dpop.losses, rtol=1e-9, atol=1e-9)


def test_lr_dpo_anchor_pulls_a_fallen_chosen_back_up():
    # A long winner (α·Δlen = 3 already "wins" the pair) whose log-probability fell 2 nats
    # below the reference, while the loser fell further (h = 1 > 0). Without the anchor the
    # loss barely cares (σ(−3.1) ≈ 0.04); with it the chosen is pulled up ~13× harder.
    def logps():
        return PreferenceLogps(
            policy_chosen=t(-22.0).requires_grad_(), policy_rejected=t(-23.0).requires_grad_(),
            ref_chosen=t(-20.0), ref_rejected=t(-20.0), chosen_lengths=t(130.0),
            rejected_lengths=t(30.0))

    free = -grad_wrt_chosen("lr_dpo", logps(), beta=0.1, alpha=0.03, lam=0.0).item()
    anchored = -grad_wrt_chosen("lr_dpo", logps(), beta=0.1, alpha=0.03, lam=5.0).item()
    # ∂L/∂lp_w = −β·(1 + λ·[lp_w < lr_w])·σ(−z): z = 0.1 + 3 = 3.1 free, 0.1 − 1 + 3 = 2.1
    assert free == pytest.approx(0.1 * torch.sigmoid(t(-3.1)).item(), rel=1e-9)
    assert anchored == pytest.approx(0.1 * 6 * torch.sigmoid(t(-2.1)).item(), rel=1e-9)
    assert anchored > 10 * free


@FAST
@given(h=finite, beta=betas, eps=st.floats(min_value=0.0, max_value=0.45))
def test_rdpo_is_unbiased_under_label_flips(h, beta, eps):
    # E_flip[rdpo] = (1−ε)·rdpo(h) + ε·rdpo(−h) = dpo(h)   (Chowdhury et al. 2024, Lemma 3.1)
    kept = compute_loss("rdpo", pair(h, 0.0), beta=beta, epsilon=eps).losses.item()
    flipped = compute_loss("rdpo", pair(0.0, h), beta=beta, epsilon=eps).losses.item()
    clean = compute_loss("dpo", pair(h, 0.0), beta=beta).losses.item()
    assert (1 - eps) * kept + eps * flipped == pytest.approx(clean, rel=1e-7, abs=1e-7)


@FAST
@given(h=finite, beta=betas, eps=st.floats(min_value=0.0, max_value=0.49))
def test_cdpo_lies_between_its_two_terms(h, beta, eps):
    z = beta * h
    a, b = nls(z) if z > -700 else -z, nls(-z) if z < 700 else z
    value = compute_loss("cdpo", pair(h, 0.0), beta=beta, epsilon=eps).losses.item()
    assert min(a, b) - 1e-9 <= value <= max(a, b) + 1e-9


@FAST
@given(d_w=finite, d_l=finite, beta=betas)
def test_ipo_with_unit_token_counts_is_squared_margin_error(d_w, d_l, beta):
    one = {"chosen_tokens": t(1.0), "rejected_tokens": t(1.0)}
    out = compute_loss("ipo", pair(d_w, d_l, **one), beta=beta).losses.item()
    assert out == pytest.approx((d_w - d_l - 1 / (2 * beta)) ** 2, rel=1e-9, abs=1e-9)
