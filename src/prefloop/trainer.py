"""Preference training on `accelerate`: one code path for 1 CPU, N processes, or N GPUs.

    accelerate launch --num_processes N -m prefloop train CONFIG   # unchanged for N = 1

Phases of `train_preferences`:
  1. load policy, tokenizer and pairs; tokenise (truncation counted)
  2. reference (and teacher) log-probs: one no-grad pass over the data, cached
  3. per optimizer step: micro-batches → forward → loss → backward; clip; step; log
  4. export an HF model directory atomically, with train_log.jsonl and a summary
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from prefloop import harness
from prefloop.config import TrainConfig, config_hash
from prefloop.data import TokenizedPair, load_rows, pairs_from_rows
from prefloop.errors import PrefloopError
from prefloop.length_control import AlphaController, LengthGoal
from prefloop.logprobs import (
    ResponseBatch,
    ResponseLogProbs,
    collate_pairs,
    response_logits,
    sum_by_sequence,
    token_logps_from_logits,
)
from prefloop.losses import LOSSES, PreferenceLogps, compute_loss
from prefloop.models import (
    apply_lora,
    load_causal_lm,
    load_tokenizer,
)


@dataclass
class TrainResult:
    output_dir: Path
    steps: int
    pairs_seen: int
    seconds: float
    log: list[dict] = field(default_factory=list)
    truncation: dict = field(default_factory=dict)
    is_main_process: bool = True
    reference_seconds: float = 0.0  # the cached no-grad reference/teacher passes
    loss_params: dict = field(default_factory=dict)  # as trained; α: its first step's
    alpha_steps: list[float] = field(default_factory=list)  # lr_dpo's α at every step
    length_control: dict = field(default_factory=dict)  # lr_dpo: AlphaController.summary()

    @property
    def total_seconds(self) -> float:
        """Reference pass plus optimisation: the cost of training, loading excluded."""
        return self.seconds + self.reference_seconds

    @property
    def pairs_per_second(self) -> float:
        return self.pairs_seen / self.seconds if self.seconds else 0.0


def load_training_pairs(cfg: TrainConfig, tokenizer):
    """Pairs from `cfg.data`: TRL-style rows, or the loop's pairs.jsonl with token ids."""
    d = cfg.data
    rows = load_rows(d.path, d.split)
    return pairs_from_rows(rows, tokenizer, d.max_length, d.max_prompt_length, d.truncation,
                           str(d.path), d.prompt_column, d.chosen_column, d.rejected_column)


# ---------------------------------------------------------------- cached no-grad passes


def pair_logps_no_grad(
    model: nn.Module, pairs: list[TokenizedPair], pad_id: int, layout: str, batch_size: int,
    accelerator=None,
) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) summed log-probs of every pair under `model`, sharded over processes."""
    device = next(model.parameters()).device

    def score(batch_pairs: list[TokenizedPair]) -> tuple[Tensor, Tensor]:
        batch = collate_pairs(batch_pairs, pad_id, layout).to(device)
        logps = token_logps_from_logits(response_logits(model, batch), batch.target)
        seq = sum_by_sequence(logps, batch).cpu()
        return seq[: len(batch_pairs)], seq[len(batch_pairs) :]

    return harness.map_pairs(model, pairs, batch_size, accelerator, score)


def reference_logps(
    cfg: TrainConfig, policy: nn.Module, pairs: list[TokenizedPair], pad_id: int, accelerator
) -> tuple[Tensor, Tensor]:
    """Reference log-probs of every pair: reused from sampling where the pairs carry them
    (the loop, reference = the sampling policy), else one no-grad pass over the rest."""
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    missing = []
    for i, p in enumerate(pairs):
        if cfg.reuse_sampling_logps and "chosen_ref_logps" in p.extras:
            chosen[i], rejected[i] = p.extras["chosen_ref_logps"], p.extras["rejected_ref_logps"]
        else:
            missing.append(i)
    if missing:
        ref_model = load_causal_lm(cfg.reference).to(accelerator.device) if cfg.reference \
            else policy
        c, r = pair_logps_no_grad(ref_model, [pairs[i] for i in missing], pad_id,
                                  cfg.training.layout, cfg.training.batch_size * 2, accelerator)
        chosen[missing], rejected[missing] = c, r
    return chosen, rejected


# ---------------------------------------------------------------- one micro-batch


def loss_parameters(cfg: TrainConfig, pairs: list[TokenizedPair],
                    goal: LengthGoal | None = None) -> tuple[dict[str, float],
                                                             AlphaController | None]:
    """The loss's keyword parameters at the first step (its defaults, the config's values
    over them) and, for lr_dpo, the controller of α (`prefloop.length_control`) whose
    first α they hold. `goal` is the loop's measured start length and target; without it
    the target mode holds the pairs' mean response length (or `length_control.target`)."""
    params = {**LOSSES[cfg.loss.name].defaults, **cfg.loss.params}
    mode = cfg.loss.alpha_mode
    if mode == "none":
        return params, None
    chosen, rejected = _lengths(pairs, cfg.loss.length_unit)
    lc = cfg.loss.length_control
    if mode == "target" and goal is None:
        start = float((chosen + rejected).mean() / 2) if pairs else 0.0
        goal = LengthGoal(start, lc.target or start)
    try:
        controller = AlphaController.start(mode, chosen, rejected, params["alpha"], goal,
                                           lc.rate)
    except ValueError as e:
        key = "loss.auto_alpha" if cfg.loss.auto_alpha else f"loss.length_control.mode={mode}"
        raise PrefloopError(f"{key}: {e}; set loss.alpha instead (with "
                            "loss.length_control.mode=fixed)") from None
    params["alpha"] = controller.alpha
    return params, controller


def _lengths(pairs: list[TokenizedPair], unit: str) -> tuple[Tensor, Tensor]:
    if unit == "chars":
        return (torch.tensor([float(p.chosen_chars) for p in pairs]),
                torch.tensor([float(p.rejected_chars) for p in pairs]))
    return (torch.tensor([float(len(p.chosen_ids)) for p in pairs]),
            torch.tensor([float(len(p.rejected_ids)) for p in pairs]))


def _extra(pairs: list[TokenizedPair], name: str, loss: str) -> Tensor:
    try:
        return torch.tensor([float(p.extras[name]) for p in pairs])
    except KeyError:
        raise PrefloopError(f"loss {loss!r} needs a {name!r} column in the data") from None


def batch_logps(
    wrapped: nn.Module,
    batch: ResponseBatch,
    pairs: list[TokenizedPair],
    idx: list[int],
    spec,
    unit: str,
    cache: dict[str, Tensor],
    reference: nn.Module | None,
) -> PreferenceLogps:
    """Everything the loss needs for these pairs: one policy forward for chosen+rejected."""
    b = len(idx)
    needs = spec.needs
    # token-level losses: the reference runs inside the policy's forward, and the LM heads,
    # log-probs and D(y) = Σ_t KL(π_ref ‖ π_θ) are computed in chunks of response positions
    terms = wrapped(batch, reference=reference) if "token_kl" in needs else None
    token_logps = terms.logps if terms is not None else wrapped(batch)
    seq = sum_by_sequence(token_logps, batch)
    counts = batch.token_counts().to(seq.device)
    out = PreferenceLogps(policy_chosen=seq[:b], policy_rejected=seq[b:])
    dev = seq.device
    if terms is not None:
        ref_seq = sum_by_sequence(terms.ref_logps, batch)
        kl = sum_by_sequence(terms.kl, batch)
        out.ref_chosen, out.ref_rejected = ref_seq[:b], ref_seq[b:]
        out.chosen_kl, out.rejected_kl = kl[:b], kl[b:]
    elif "reference" in needs:
        out.ref_chosen = cache["ref_chosen"][idx].to(dev)
        out.ref_rejected = cache["ref_rejected"][idx].to(dev)
    if "teacher" in needs:
        out.teacher_chosen = cache["teacher_chosen"][idx].to(dev)
        out.teacher_rejected = cache["teacher_rejected"][idx].to(dev)
    out.chosen_tokens, out.rejected_tokens = counts[:b], counts[b:]
    chosen_len, rejected_len = _lengths([pairs[i] for i in idx], unit)
    out.chosen_lengths, out.rejected_lengths = chosen_len.to(dev), rejected_len.to(dev)
    if "targets" in needs:
        out.chosen_target = _extra([pairs[i] for i in idx], "chosen_target", spec.name).to(dev)
        out.rejected_target = _extra([pairs[i] for i in idx], "rejected_target", spec.name).to(dev)
    if "explore" in needs:
        which = [pairs[i].extras.get("reference_sample") for i in idx]
        if None in which:
            raise PrefloopError(f"loss {spec.name!r} needs a 'reference_sample' column")
        from_ref_chosen = torch.tensor([w == "chosen" for w in which], device=dev)
        out.explore_logps = torch.where(from_ref_chosen, seq[:b], seq[b:])
    return out


# ---------------------------------------------------------------- the training run

# The per-pair statistics of a micro-batch, in the columns `forward` stacks: their step means
# go to train_log.jsonl. lr_dpo's adapting α adds two columns after them (ALPHA_INPUTS).
STATS = ("loss", "chosen_reward", "rejected_reward", "accuracy", "chosen_logps",
         "rejected_logps", "chosen_length", "rejected_length")
ALPHA_INPUTS = ("pair_index", "h")


@harness.guard_output
def train_preferences(
    cfg: TrainConfig,
    pairs: list[TokenizedPair] | None = None,
    progress: bool = True,
    length_goal: LengthGoal | None = None,
) -> TrainResult:
    """Train `cfg.model` on preference pairs; returns where the model was written and the log.
    `length_goal`: the loop's measured length of the sampling policy and its target, for
    lr_dpo's α under `loss.length_control.mode=target`."""
    cfg.validate()
    t_cfg = cfg.training
    spec = LOSSES[cfg.loss.name]
    run = harness.TrainingRun(cfg, "prefloop", "train", progress)
    accelerator, device = run.accelerator, run.device

    # 1. policy, tokenizer, pairs -------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    truncation = {}
    if pairs is None:  # before the model: bad data fails without loading any weights
        pairs, stats = load_training_pairs(cfg, tokenizer)
        truncation = stats.as_dict()
    loss_params, alpha = loss_parameters(cfg, pairs, length_goal)
    first_params = dict(loss_params)
    policy = load_causal_lm(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    policy.to(device)

    # 2. reference / teacher log-probs: once, no grad ---------------------------------------------
    cache: dict[str, Tensor] = {}
    reference = None
    ref_start = time.perf_counter()
    if "token_kl" in spec.needs:
        reference = load_causal_lm(cfg.reference) if cfg.reference else copy.deepcopy(policy)
        reference.to(device).eval().requires_grad_(False)
    elif "reference" in spec.needs:
        cache["ref_chosen"], cache["ref_rejected"] = reference_logps(
            cfg, policy, pairs, pad_id, accelerator
        )
    if "teacher" in spec.needs:
        teacher = load_causal_lm(cfg.teacher).to(device)
        cache["teacher_chosen"], cache["teacher_rejected"] = pair_logps_no_grad(
            teacher, pairs, pad_id, t_cfg.layout, t_cfg.batch_size * 2, accelerator
        )
        del teacher
    reference_seconds = time.perf_counter() - ref_start

    # 3. optimisation ------------------------------------------------------------------------------
    lora = t_cfg.lora
    run.start(policy, tokenizer, [p.length for p in pairs], wrap=ResponseLogProbs,
              lora=lambda m: apply_lora(m, lora.r, lora.alpha, lora.dropout,
                                        lora.target_modules))
    wrapped = run.wrapped

    def forward(idx: list[int]) -> tuple[Tensor, Tensor]:
        """Per-pair losses and statistics of one micro-batch (`harness.accumulate_pairs`)."""
        batch = collate_pairs([pairs[i] for i in idx], pad_id, t_cfg.layout).to(device)
        logps = batch_logps(wrapped, batch, pairs, idx, spec, cfg.loss.length_unit, cache,
                            reference)
        h = []
        if alpha is not None and alpha.adapts:  # ALPHA_INPUTS, for the next step's α
            h = [torch.tensor(idx, dtype=torch.float32, device=device),
                 ((logps.policy_chosen - logps.ref_chosen)
                  - (logps.policy_rejected - logps.ref_rejected)).detach().float()]
        out = compute_loss(cfg.loss.name, logps, **loss_params)
        return out.losses, torch.stack([
            out.losses.detach().float(), out.chosen_rewards.float(),
            out.rejected_rewards.float(),
            (out.chosen_rewards > out.rejected_rewards).float(),
            logps.policy_chosen.detach().float(), logps.policy_rejected.detach().float(),
            logps.chosen_lengths.float(), logps.rejected_lengths.float(), *h,
        ], dim=1)  # (b, len(STATS)), then ALPHA_INPUTS when α adapts

    per_pair: list[Tensor] = []

    def step(k: int) -> tuple[dict, int, int]:
        sums = dict.fromkeys(STATS, 0.0)
        per_pair.clear()
        epoch, step_pairs = harness.accumulate_pairs(
            accelerator, wrapped, run.stream, t_cfg.grad_accum, pairs, forward, sums, k,
            run.partial, cfg.output_dir, cfg.model, per_pair)
        record = {key: v / step_pairs for key, v in sums.items()}
        record["margin"] = record["chosen_reward"] - record["rejected_reward"]
        return record, epoch, step_pairs

    def after_update(record: dict, _: object) -> None:
        if alpha is not None:  # α of the next step, from this step's pairs (every process)
            inputs = torch.cat(per_pair).double()[:, len(STATS):].T  # ALPHA_INPUTS, if any
            record.update(alpha.after_step(*inputs, beta=loss_params["beta"]))
            loss_params["alpha"] = alpha.alpha

    seconds = run.loop(step, after_update=after_update)

    # 4. export --------------------------------------------------------------------------------
    summary = {
        "steps": run.total_steps, "pairs_seen": run.items_seen, "seconds": seconds,
        "pairs_per_second": run.items_seen / seconds, "num_pairs": len(pairs),
        "reference_seconds": reference_seconds,
        "processes": run.n_proc, "loss": cfg.loss.name,
        "loss_params": first_params,
        "truncation": truncation, "trainable_parameters": run.trainable_parameters,
        "total_parameters": run.total_parameters, "config_hash": config_hash(cfg),
    }
    if alpha is not None:
        summary["length_control"] = alpha.summary()
    output_dir = run.finish(summary, tokenizer)
    return TrainResult(output_dir, run.total_steps, run.items_seen, seconds, run.log.records,
                       truncation, run.main,
                       reference_seconds, first_params, alpha.history if alpha else [],
                       alpha.summary() if alpha else {})

