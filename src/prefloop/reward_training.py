"""Bradley–Terry reward-model training (`prefloop reward-model`).

    accelerate launch --num_processes N -m prefloop reward-model CONFIG   # unchanged for N = 1

The model is `AutoModelForSequenceClassification(num_labels=1)`: a causal LM gets a new,
randomly initialised scalar head (seeded by `training.seed`); an existing one-label
sequence-classification model is trained further. Its reward r(x, y) is the head's output
at the last non-padding token, so rows are right-padded and `config.pad_token_id` is set.

Text: `rewards.conversation_text(tokenizer, prompt, response)`, the function
`RewardModelScorer` uses at inference (the reward model's own chat template when it has
one), tokenised the same way (no added special tokens; over `max_length`, the *end* is
kept, as the scorer keeps it). Train-time and score-time inputs are therefore identical.

Loss per pair (Bradley & Terry, 1952; Ouyang et al., 2022, eq. 1), chosen and rejected in
one forward of 2B rows:

    ℓ = −log σ(r_w − r_l)  +  c · (r_w + r_l)²

The optional second term (`center_coef` = c ≥ 0, off by default; Eisenstein et al., 2023)
keeps rewards centred on 0: the Bradley–Terry loss only sees differences, so without it
the rewards' offset drifts freely. Typical c: 0.01.

Phases of `train_reward_model`:
  1. load the model (adding a head if needed), tokenizer and pairs; seeded train/eval split
  2. optimiser, scheduler, output directory
  3. per optimizer step: micro-batches → forward (2B rows) → BT loss → backward; clip; step
  4. held-out accuracy; export an HF sequence-classification directory atomically
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from prefloop import batching, harness
from prefloop.config import TrainingConfig, config_hash, validate_common
from prefloop.data import (
    PreferenceExample,
    Text,
    TruncationStats,
    load_rows,
    preference_examples,
)
from prefloop.errors import PrefloopError, where
from prefloop.models import (
    check_source,
    load_error,
    load_tokenizer,
)
from prefloop.rewards import conversation_text

# ---------------------------------------------------------------- configuration


@dataclass
class RewardDataConfig:
    path: str = ""
    split: str = "train"
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"

    def validate(self, key: str = "data") -> None:
        """Only names of the data; the truncation policy is the config's own `truncation`."""


@dataclass
class RewardTrainingConfig(TrainingConfig):
    """TrainingConfig with a reward model's usual learning rate."""

    lr: float = 1e-5


@dataclass
class RewardModelConfig:
    """`prefloop reward-model`: a Bradley–Terry reward model from preference pairs."""

    model: str = ""  # a causal LM (a head is added) or a 1-label sequence-classification model
    output_dir: str = "runs/reward_model"
    trust_remote_code: bool = False
    data: RewardDataConfig = field(default_factory=RewardDataConfig)
    eval_fraction: float = 0.1  # held-out share of the pairs for accuracy, split by training.seed
    max_length: int = 1024  # tokens per conversation
    truncation: str = "truncate"  # truncate (keep the end, as the scorer does) | skip | error
    center_coef: float = 0.0  # c of c·(r_w + r_l)²; 0 = plain Bradley–Terry
    training: RewardTrainingConfig = field(default_factory=RewardTrainingConfig)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers

    def validate(self, require_data: bool = False) -> None:
        """`require_data`: data.path must be set (asked unless rows come in memory)."""
        validate_common(self, require_data=require_data, pairs=False)
        if not 0 <= self.eval_fraction < 1:
            raise PrefloopError(f"eval_fraction: must be in [0, 1), got {self.eval_fraction}")
        if self.max_length < 2:
            raise PrefloopError(f"max_length: must be ≥ 2, got {self.max_length}")
        if self.center_coef < 0:
            raise PrefloopError(f"center_coef: must be ≥ 0, got {self.center_coef}")


# ---------------------------------------------------------------- the loss


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, center_coef: float = 0.0) -> Tensor:
    """(B,) per-pair loss −log σ(r_w − r_l) + c·(r_w + r_l)² from (B,) rewards.

    log σ is computed as `logsigmoid` (stable for large margins). At r_w = r_l the loss is
    log 2 ≈ 0.693; a margin of 2 gives ≈ 0.127, of −2 ≈ 2.127.
    """
    return -F.logsigmoid(chosen - rejected) + center_coef * (chosen + rejected) ** 2


# ---------------------------------------------------------------- data


@dataclass
class RewardPair:
    chosen_ids: list[int]
    rejected_ids: list[int]
    row: int = 0

    @property
    def length(self) -> int:
        return len(self.chosen_ids) + len(self.rejected_ids)


def _conversation(tokenizer, prompt: Text, response: Text, source: str, row: int,
                  name: str) -> str:
    """`conversation_text` for a string or a message-list response (its last turn is the
    reply; any earlier response turns join the prompt)."""
    if isinstance(response, list):
        if response[-1]["role"] != "assistant":
            raise PrefloopError(f"{where(source, row, name)}: last message must be the assistant's")
        prompt = [*prompt, *response[:-1]]
        response = response[-1]["content"]
    return conversation_text(tokenizer, prompt, response)


def tokenize_reward_pairs(
    examples: Sequence[PreferenceExample],
    tokenizer,
    max_length: int = 1024,
    truncation: str = "truncate",
    source: str = "<rows>",
) -> tuple[list[RewardPair], TruncationStats]:
    """Token ids of both conversations, exactly as `RewardModelScorer` builds them.

    Over `max_length`, `truncate` keeps the end (counted in `prompts_truncated`: the start
    of the conversation goes), `skip` drops the pair, `error` stops.
    """
    stats = TruncationStats()
    out: list[RewardPair] = []
    for ex in examples:
        ids = [
            tokenizer(_conversation(tokenizer, ex.prompt, resp, source, ex.row, name),
                      add_special_tokens=False)["input_ids"]
            for resp, name in ((ex.chosen, "chosen"), (ex.rejected, "rejected"))
        ]
        if max(len(x) for x in ids) > max_length:
            if truncation == "skip":
                stats.skipped += 1
                stats.skipped_rows.append(ex.row)
                continue
            if truncation == "error":
                raise PrefloopError(
                    f"{where(source, ex.row)}: {max(len(x) for x in ids)} tokens exceed "
                    f"max_length={max_length} (set truncation to 'truncate' or 'skip')"
                )
            stats.prompts_truncated += 1
            ids = [x[-max_length:] for x in ids]
        out.append(RewardPair(ids[0], ids[1], ex.row))
    if not out:
        raise PrefloopError(f"{source}: no preference pairs left after truncation")
    return out, stats


def split_pairs(pairs: list[RewardPair], eval_fraction: float,
                seed: int) -> tuple[list[RewardPair], list[RewardPair]]:
    """(train, eval): a seeded shuffle; round(eval_fraction · n) pairs, at least 1, held out
    (none when eval_fraction is 0)."""
    if not eval_fraction:
        return pairs, []
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(pairs) - 1, max(1, round(eval_fraction * len(pairs))))
    if n_eval < 1:
        raise PrefloopError(f"eval_fraction: {len(pairs)} pair(s) leave nothing to hold out")
    held = set(order[:n_eval])
    return ([p for i, p in enumerate(pairs) if i not in held],
            [p for i, p in enumerate(pairs) if i in held])


def collate_rewards(pairs: Sequence[RewardPair], pad_id: int) -> tuple[Tensor, Tensor]:
    """(2B, L) input ids and attention mask, right-padded: chosen rows 0..B−1, rejected B..2B−1."""
    rows = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    return ids, mask


def batch_rewards(model: nn.Module, pairs: Sequence[RewardPair], pad_id: int,
                  device) -> tuple[Tensor, Tensor]:
    """(B,) chosen and (B,) rejected rewards from one forward over 2B rows, in fp32."""
    ids, mask = collate_rewards(pairs, pad_id)
    rewards = model(input_ids=ids.to(device), attention_mask=mask.to(device),
                    use_cache=False).logits[:, 0].float()  # (2B,)
    b = len(pairs)
    return rewards[:b], rewards[b:]


def pair_rewards(model: nn.Module, pairs: Sequence[RewardPair], pad_id: int,
                 batch_size: int = 16, accelerator=None) -> tuple[Tensor, Tensor]:
    """(chosen, rejected) rewards of every pair, no grad, sharded over processes."""
    device = next(model.parameters()).device
    return harness.map_pairs(model, pairs, batch_size, accelerator,
                             lambda batch: batch_rewards(model, batch, pad_id, device))


# ---------------------------------------------------------------- the model


def load_reward_backbone(name_or_path: str, pad_token_id: int,
                         trust_remote_code: bool = False) -> tuple[nn.Module, bool]:
    """(model, head_is_new): a 1-label sequence-classifier from a causal LM or a reward model."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    check_source(name_or_path)
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        existing = any(a.endswith("ForSequenceClassification")
                       for a in (config.architectures or []))
        if existing and config.num_labels != 1:
            raise PrefloopError(
                f"{name_or_path}: a sequence classifier with {config.num_labels} labels; a "
                "reward model has one (start from its causal LM instead)"
            )
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, num_labels=1, trust_remote_code=trust_remote_code,
            dtype=torch.float32, use_safetensors=True, attn_implementation="sdpa",
        )
    except (OSError, ValueError) as e:
        raise load_error(name_or_path, "as a reward model", e) from None
    model.config.pad_token_id = pad_token_id  # HF pools at the last token that is not padding
    return model, not existing


def _apply_lora(model: nn.Module, lora) -> nn.Module:
    """LoRA adapters with the reward head fully trained (peft's SEQ_CLS task)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules, task_type="SEQ_CLS",
    ))


# ---------------------------------------------------------------- the training run


def load_reward_data(cfg: RewardModelConfig, tokenizer, rows: list[dict] | None = None):
    """(pairs, truncation stats) from `rows` or `cfg.data.path`."""
    d = cfg.data
    source = "<rows>" if rows is not None else str(d.path)
    if rows is None:
        rows = load_rows(d.path, d.split)
    examples = preference_examples(rows, source, d.prompt_column, d.chosen_column,
                                   d.rejected_column)
    return tokenize_reward_pairs(examples, tokenizer, cfg.max_length, cfg.truncation, source)


@harness.guard_output
def train_reward_model(cfg: RewardModelConfig, rows: list[dict] | None = None,
                       progress: bool = True) -> harness.RunResult:
    """Train a Bradley–Terry reward model; `rows` (in memory) replaces `cfg.data.path`.

    The summary holds `train_accuracy` (r_w > r_l over the pairs of the last epoch's
    steps, each scored just before its update) and `eval_accuracy` / `eval_margin` of the
    final model on the held-out pairs (None without any).
    """
    cfg.validate(require_data=rows is None)
    t = cfg.training
    # the seed set here also seeds the new head's initialisation
    run = harness.TrainingRun(cfg, "prefloop-reward-model", "reward model", progress)
    accelerator, device = run.accelerator, run.device

    # 1. model, tokenizer, pairs, split -----------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    pairs, stats = load_reward_data(cfg, tokenizer, rows)  # bad data fails before the weights
    model, head_is_new = load_reward_backbone(cfg.model, tokenizer.pad_token_id,
                                              cfg.trust_remote_code)
    train, held_out = split_pairs(pairs, cfg.eval_fraction, t.seed)
    pad_id = tokenizer.pad_token_id
    model.to(device)

    # 2. optimiser, output directory -------------------------------------------------------------
    run.start(model, tokenizer, [p.length for p in train], lora=lambda m: _apply_lora(m, t.lora))
    per_epoch = batching.steps_per_epoch(len(train), run.global_batch, t.grad_accum)
    wrapped = run.wrapped

    # 3. optimisation --------------------------------------------------------------------------
    correct_per_step: list[tuple[float, int]] = []

    def forward(idx: list[int]) -> tuple[Tensor, Tensor]:
        """Per-pair losses and statistics of one micro-batch (`harness.accumulate_pairs`)."""
        r_w, r_l = batch_rewards(wrapped, [train[i] for i in idx], pad_id, device)
        losses = bradley_terry_loss(r_w, r_l, cfg.center_coef)  # (b,)
        r_w, r_l = r_w.detach(), r_l.detach()
        return losses, torch.stack([losses.detach(), (r_w > r_l).float(), r_w - r_l, r_w,
                                    r_l], dim=1)  # (b, 5)

    def step(k: int) -> tuple[dict, int, int]:
        sums = {"loss": 0.0, "accuracy": 0.0, "margin": 0.0, "chosen_reward": 0.0,
                "rejected_reward": 0.0}
        epoch, step_pairs = harness.accumulate_pairs(
            accelerator, wrapped, run.stream, t.grad_accum, train, forward, sums, k,
            run.partial, cfg.output_dir, cfg.model)
        correct_per_step.append((sums["accuracy"], step_pairs))
        return {key: v / step_pairs for key, v in sums.items()}, epoch, step_pairs

    seconds = run.loop(step)

    # 4. held-out accuracy, export ---------------------------------------------------------------
    last = correct_per_step[-min(per_epoch, len(correct_per_step)):]
    summary = {
        "steps": run.total_steps, "pairs_seen": run.items_seen, "seconds": seconds,
        "pairs_per_second": run.items_seen / seconds, "num_train_pairs": len(train),
        "num_eval_pairs": len(held_out), "processes": run.n_proc, "head": "new" if head_is_new
        else "loaded", "center_coef": cfg.center_coef, "truncation": stats.as_dict(),
        "train_accuracy": sum(c for c, _ in last) / sum(n for _, n in last),
        "eval_accuracy": None, "eval_margin": None, "eval_reward_mean": None,
        "trainable_parameters": run.trainable_parameters,
        "total_parameters": run.total_parameters, "config_hash": config_hash(cfg),
    }
    model = run.unwrapped()
    if held_out:
        chosen, rejected = pair_rewards(model, held_out, pad_id, t.batch_size * 2, accelerator)
        summary.update(eval_accuracy=(chosen > rejected).float().mean().item(),
                       eval_margin=(chosen - rejected).mean().item(),
                       eval_reward_mean=torch.cat([chosen, rejected]).mean().item())
    output_dir = run.finish(summary, tokenizer, model)
    return harness.RunResult(output_dir, run.total_steps, run.items_seen, seconds,
                             run.log.records, stats.as_dict(), run.main, summary)
