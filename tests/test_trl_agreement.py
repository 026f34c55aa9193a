"""prefloop's losses agree with TRL's ``DPOTrainer`` on the loss types both implement.

Skipped when TRL is not installed (``pip install prefloop[compare]``). Written against
TRL 1.16.0, where the losses are branches inside ``DPOTrainer._compute_loss`` (no separate
loss function exists). That method also runs the model forward pass, so it is driven here
without a training run:

- the trainer is created with ``object.__new__`` and given only the attributes
  ``_compute_loss`` reads (``beta``, ``loss_types``, ``label_smoothing``, an accelerator
  whose ``gather`` is the identity, ...);
- the "model" is a stub returning preset per-token log-probs in the fields TRL's fused LM
  head returns. Pair i's whole summed log-prob sits on its first completion token and the
  other positions are 0, so TRL's sum over positions reproduces our per-sequence value
  exactly;
- reference log-probs go in as precomputed (``precompute_ref_logps = True``), as TRL does
  when the reference pass is cached.

TRL specifics accounted for:

- TRL returns the *batch mean* of the per-pair losses; prefloop returns per-pair losses. We
  compare the mean and its gradient with respect to every pair's log-probs on a batch, and
  the per-pair values by calling TRL once per pair.
- ``ipo``: TRL 1.16 divides each log-ratio by its completion token count inside the loss
  branch, counting the ones of ``completion_mask``. TRL gets summed log-probs and a
  completion mask with n_i completion tokens; prefloop gets the same sums and
  ``chosen_tokens``/``rejected_tokens`` = n_i.
- ``bco_pair``: TRL 1.16 computes ``−log σ(r_w) − log σ(−r_l)`` with no reward shift.
  Earlier TRL releases subtracted a running mean δ of the rewards from both logits;
  prefloop implements δ = 0 (METHODS.md), so with TRL 1.16 no neutralising is needed. A TRL
  that reintroduces δ would make this test fail, on purpose.
- ``robust`` is TRL's name for rDPO; its ε is ``label_smoothing``.
- ``sigmoid`` in TRL 1.16 ignores ``label_smoothing``; prefloop's cDPO therefore has no TRL
  counterpart and is not compared.

Tolerances: float64 rtol = atol = 1e-12; float32 rtol = atol = 1e-6. Both libraries apply
the same formulas in the same order: with TRL 1.16 the mean losses came out bitwise equal
and the gradients within one ulp. The gradient check matters: IPO's value is dominated by
the 1/(2β) target, so an off-by-one token count moves the loss by only ~1e-5 relative, but
its gradient by up to tens of percent (the gradient check catches it).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from prefloop.losses import PreferenceLogps, compute_loss

trl = pytest.importorskip("trl")

TOL = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-6, "atol": 1e-6}}
BETAS = [0.01, 0.1, 0.5, 2.0]
# (TRL loss_type, prefloop loss, TRL label_smoothing ↔ prefloop epsilon values to try)
CASES = [
    ("sigmoid", "dpo", [None]),
    ("ipo", "ipo", [None]),
    ("hinge", "hinge", [None]),
    ("robust", "rdpo", [0.0, 0.1, 0.25, 0.45]),
    ("nca_pair", "nca_pair", [None]),
    ("bco_pair", "bco_pair", [None]),
    ("sppo_hard", "sppo_hard", [None]),
]
PARAMS = [
    pytest.param(
        trl_type, ours, beta, eps, id=f"{ours}-beta{beta}" + ("" if eps is None else f"-eps{eps}")
    )
    for trl_type, ours, epsilons in CASES
    for beta in BETAS
    for eps in epsilons
]


class _StubLM(torch.nn.Module):
    """Stands in for the policy: returns preset per-token log-probs of shape (2B, T−1)."""

    def __init__(self, per_token_logps: torch.Tensor) -> None:
        super().__init__()
        self.per_token_logps = per_token_logps

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=None, **_):
        zeros = torch.zeros_like(self.per_token_logps).detach()
        return SimpleNamespace(
            log_probs=self.per_token_logps,
            entropy=zeros,
            mean_logits=zeros,
            is_top1=zeros.bool(),
        )


def _trl_trainer(loss_type: str, beta: float, label_smoothing: float, model: torch.nn.Module):
    """A DPOTrainer carrying only what ``_compute_loss`` reads (no model loading, no data)."""
    trainer = object.__new__(trl.DPOTrainer)
    identity = lambda x: x  # noqa: E731 - single process: gathering is the identity
    attributes = {
        "model": model,
        "accelerator": SimpleNamespace(
            device=torch.device("cpu"), gather=identity, gather_for_metrics=identity
        ),
        "beta": beta,
        "label_smoothing": label_smoothing,
        "loss_types": [loss_type],
        "loss_weights": [1.0],
        "f_divergence_type": "reverse_kl",  # plain log-ratios
        "ld_alpha": None,  # no length-desensitised log-probs
        "precompute_ref_logps": True,
        "use_weighting": False,
        "aux_loss_enabled": False,
        "_metrics": {"train": defaultdict(list), "eval": defaultdict(list)},
        "_total_train_tokens": 0,
        "_tp_size": 1,
    }
    for key, value in attributes.items():
        setattr(trainer, key, value)
    return trainer


def _trl_run(loss_type, beta, eps, pc, pr, rc, rr, n_w, n_l):
    """TRL's batch-mean loss, its gradient w.r.t. (pc, pr), and its logged metrics."""
    b = pc.shape[0]
    longest = int(max(n_w.max(), n_l.max()))
    seq_len = longest + 1  # position 0 is a prompt token, then the completion, then padding
    completion_mask = torch.zeros(2 * b, seq_len, dtype=torch.long)
    for row, n in enumerate(torch.cat([n_w, n_l]).tolist()):
        completion_mask[row, 1 : 1 + int(n)] = 1
    # TRL's batch is [chosen; rejected]; the whole sum on the first completion token.
    per_token = torch.zeros(2 * b, seq_len - 1, dtype=pc.dtype)
    per_token[:, 0] = torch.cat([pc, pr]).detach()
    per_token.requires_grad_()
    model = _StubLM(per_token).eval()
    trainer = _trl_trainer(loss_type, beta, 0.0 if eps is None else eps, model)
    inputs = {
        "input_ids": torch.zeros(2 * b, seq_len, dtype=torch.long),
        "attention_mask": torch.ones(2 * b, seq_len, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grad_w, grad_l = per_token.grad[:, 0].chunk(2)
    return loss.detach(), grad_w, grad_l, trainer._metrics["eval"]


def _ours(name, beta, eps, pc, pr, rc, rr, n_w, n_l):
    """prefloop's per-pair losses, rewards and the gradient of their mean.

    Token counts are always passed; only IPO reads them.
    """
    logps = PreferenceLogps(
        policy_chosen=pc.detach().clone().requires_grad_(),
        policy_rejected=pr.detach().clone().requires_grad_(),
        ref_chosen=rc,
        ref_rejected=rr,
        chosen_tokens=n_w.to(pc.dtype),
        rejected_tokens=n_l.to(pc.dtype),
    )
    params = {"beta": beta} if eps is None else {"beta": beta, "epsilon": eps}
    out = compute_loss(name, logps, **params)
    out.losses.mean().backward()
    return out, logps.policy_chosen.grad, logps.policy_rejected.grad


def _random_batch(seed: int, b: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    pc = -(torch.rand(b, generator=g, dtype=dtype) * 75 + 5)  # summed log-probs in [−80, −5]
    pr = -(torch.rand(b, generator=g, dtype=dtype) * 75 + 5)
    rc = pc + torch.randn(b, generator=g, dtype=dtype) * 3  # reference near the policy
    rr = pr + torch.randn(b, generator=g, dtype=dtype) * 3
    n_w = torch.randint(1, 40, (b,), generator=g)
    n_l = torch.randint(1, 40, (b,), generator=g)
    return pc, pr, rc, rr, n_w, n_l


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("trl_type", "ours", "beta", "eps"), PARAMS)
def test_agrees_with_trl(trl_type, ours, beta, eps, dtype):
    tol = TOL[dtype]
    batch = _random_batch(seed=zlib.crc32(f"{ours}-{beta}-{eps}".encode()), b=8, dtype=dtype)

    # Batch: mean loss, gradient of the mean w.r.t. every pair's log-probs, logged rewards.
    trl_loss, trl_grad_w, trl_grad_l, metrics = _trl_run(trl_type, beta, eps, *batch)
    out, grad_w, grad_l = _ours(ours, beta, eps, *batch)
    torch.testing.assert_close(out.losses.mean().detach(), trl_loss, **tol)
    torch.testing.assert_close(grad_w, trl_grad_w, **tol)
    torch.testing.assert_close(grad_l, trl_grad_l, **tol)
    for side, ours_rewards in (("chosen", out.chosen_rewards), ("rejected", out.rejected_rewards)):
        torch.testing.assert_close(ours_rewards.mean().item(), metrics[f"rewards/{side}"][0], **tol)

    # Per pair: TRL only reports a mean, so give it one pair at a time.
    for i in range(batch[0].shape[0]):
        one = tuple(x[i : i + 1] for x in batch)
        trl_one = _trl_run(trl_type, beta, eps, *one)[0]
        torch.testing.assert_close(out.losses[i].detach(), trl_one, **tol)


def test_trl_version_is_the_one_this_harness_was_written_for():
    # The stub relies on DPOTrainer._compute_loss internals of TRL 1.x; a major version change
    # should be looked at, not silently trusted.
    assert int(trl.__version__.split(".")[0]) == 1, trl.__version__
