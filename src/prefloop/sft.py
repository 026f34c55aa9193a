"""Supervised fine-tuning (`prefloop sft`), optionally with PAFT's sparse delta.

    accelerate launch --num_processes N -m prefloop sft CONFIG   # unchanged for N = 1

Data, one format per row (detected per row; plain text and chat are not mixed):
  * `prompt` + `completion`, each a string or chat messages: loss on the completion only;
  * `messages`, a whole conversation: loss on every assistant turn (`data.assistant_turns:
    all`, the default) or on the final one (`last`); system, user and tool turns and the
    template's own markup before each reply carry no loss.
Templating is the DPO trainer's (`data.render_prompt_response`): plain text is
`prompt + completion + EOS`, chat goes through the tokenizer's chat template, so the
tokens an SFT model learns to emit are the tokens preference training later scores.

Loss of an optimizer step s over its examples S_s and their completion tokens C_s (all
micro-batches, all processes; prompt and padding positions are never fed to the LM head):

    L_s(θ) = −1/(|S_s|·c̄) Σ_{c∈C_s} log π_θ(y_c | x, y_<c)  +  λ₁ · Σ_i |θ_i − θ₀_i|

c̄ is the mean number of completion tokens per example over the whole data set, a constant
of the run. Dividing by the step's own token count |C_s| instead would give every step the
same weight whatever its tokens, so with length-grouped batches a token of a short example
would weigh more than one of a long example and the model would learn to answer shorter
than its data. With the constant, every completion token of an epoch weighs alike whatever
the batching, and the step's loss is still a per-token mean on average.

The second term is PAFT's sparse SFT (Pentyala et al., 2024, arXiv:2406.17923): θ₀ are
the starting weights of the trainable parameters, frozen. An L1 term only makes weights
*exactly* equal to θ₀ when the optimiser can land on the kink, so the penalty is applied
the OWL-QN way (Andrew & Gao, 2007) around AdamW:
  * gradient: ∂L/∂θ_i + λ₁·sign(δ_i) where δ_i = θ_i − θ₀_i ≠ 0; at δ_i = 0 the
    smallest subgradient, sign(g_i)·max(|g_i| − λ₁, 0), which is 0 while the data's pull
    is weaker than the penalty;
  * after the step, an entry that left its orthant (crossed or, from δ = 0, moved against
    its pseudo-gradient) is put back on θ₀.
The summary reports `delta_sparsity`, the fraction of trainable entries with
|δ| ≤ `DELTA_TOLERANCE` (1e-8), for λ₁ = 0 too, so runs can be compared.

Phases of `train_sft`:
  1. load model, tokenizer and rows; render and tokenise (truncation counted)
  2. optimiser, scheduler, θ₀ snapshot, output directory
  3. per optimizer step: micro-batches → forward → token NLL → backward; clip; L1; step; log
  4. export an HF model directory atomically, with train_log.jsonl and a summary
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from prefloop import batching, harness
from prefloop.config import TRUNCATION, TrainingConfig, check_choice, config_hash, validate_common
from prefloop.data import (
    Message,
    Text,
    TruncationStats,
    check_text,
    fit_to_length,
    load_rows,
    render_prompt_response,
)
from prefloop.errors import PrefloopError, where
from prefloop.logprobs import ResponseBatch, ResponseLogProbs, collate_sequences
from prefloop.models import (
    apply_lora,
    load_causal_lm,
    load_tokenizer,
)

DELTA_TOLERANCE = 1e-8  # |θ − θ₀| at or below this counts as unchanged in `delta_sparsity`


# ---------------------------------------------------------------- configuration


@dataclass
class SFTDataConfig:
    path: str = ""
    split: str = "train"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    assistant_turns: str = "all"  # all | last: which assistant turns of `messages` carry loss
    max_length: int = 1024
    max_prompt_length: int = 512
    truncation: str = "truncate"  # truncate | skip | error, as for preference data

    def validate(self, key: str = "data") -> None:
        check_choice(f"{key}.truncation", self.truncation, TRUNCATION)
        check_choice(f"{key}.assistant_turns", self.assistant_turns, ("all", "last"))
        if self.max_prompt_length >= self.max_length:
            raise PrefloopError(f"{key}.max_prompt_length must be smaller than "
                                f"{key}.max_length")


@dataclass
class SFTTrainingConfig(TrainingConfig):
    """TrainingConfig with SFT's usual learning rate (DPO's default 5e-7 barely moves SFT)."""

    lr: float = 2e-5


@dataclass
class SFTConfig:
    """`prefloop sft`: supervised fine-tuning on completions, optionally L1-sparse (PAFT)."""

    model: str = ""
    output_dir: str = "runs/sft"
    trust_remote_code: bool = False
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    training: SFTTrainingConfig = field(default_factory=SFTTrainingConfig)
    l1_delta: float = 0.0  # λ₁ of λ₁·Σ|θ − θ₀|; 0 = plain SFT
    report_to: list[str] = field(default_factory=list)  # accelerate trackers

    def validate(self, require_data: bool = False) -> None:
        """`require_data`: data.path must be set (train_sft asks unless rows come in memory)."""
        validate_common(self, require_data=require_data, pairs=False)
        if self.l1_delta < 0:
            raise PrefloopError(f"l1_delta: must be ≥ 0, got {self.l1_delta}")


# ---------------------------------------------------------------- rows → examples


@dataclass
class SFTExample:
    """A prompt/completion row, or (prompt and completion None) a `messages` row."""

    row: int
    prompt: Text | None = None
    completion: Text | None = None
    messages: list[Message] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None or isinstance(self.prompt, list)


def sft_examples(rows: Sequence[dict], source: str = "<rows>",
                 data: SFTDataConfig | None = None) -> list[SFTExample]:
    """Validate rows into examples; every error names the source, row and field."""
    d = data or SFTDataConfig()
    if not rows:
        raise PrefloopError(f"{source}: no rows")
    examples: list[SFTExample] = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PrefloopError(f"{where(source, i)}: expected a mapping, got {type(row).__name__}")
        if row.get(d.messages_column) is not None:
            messages = check_text(row[d.messages_column], source, i, d.messages_column)
            if isinstance(messages, str):
                raise PrefloopError(
                    f"{where(source, i, d.messages_column)}: expected a list of messages, "
                    "got a string (plain text goes in prompt/completion columns)"
                )
            if not any(m["role"] == "assistant" for m in messages):
                raise PrefloopError(
                    f"{where(source, i, d.messages_column)}: no assistant turn to train on"
                )
            ex = SFTExample(i, messages=messages)
        else:
            for col in (d.prompt_column, d.completion_column):
                if row.get(col) is None:
                    raise PrefloopError(
                        f"{where(source, i, col)}: missing; row has {sorted(row)} (an SFT row "
                        f"needs {d.prompt_column!r} + {d.completion_column!r} or "
                        f"{d.messages_column!r}; map them with data.*_column)"
                    )
            prompt = check_text(row[d.prompt_column], source, i, d.prompt_column)
            completion = check_text(row[d.completion_column], source, i, d.completion_column)
            if isinstance(prompt, list) and isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            if isinstance(prompt, str) and isinstance(completion, list):
                raise PrefloopError(
                    f"{where(source, i)}: a plain-text prompt with a chat-message completion"
                )
            ex = SFTExample(i, prompt=prompt, completion=completion)
        if examples and ex.is_chat != examples[0].is_chat:
            raise PrefloopError(
                f"{where(source, i)}: mixes plain-text and conversational rows; use one format"
            )
        examples.append(ex)
    return examples


# ---------------------------------------------------------------- tokenisation


@dataclass
class SFTSequence:
    """`prompt_ids` then `response_ids`; `trained[k]` says whether response token k carries
    loss (None: all do). Multi-turn rows put later user turns inside the response, untrained."""

    prompt_ids: list[int]
    response_ids: list[int]
    trained: list[bool] | None = None
    row: int = 0

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    @property
    def num_trained(self) -> int:
        return len(self.response_ids) if self.trained is None else sum(self.trained)


def render_segments(tokenizer, ex: SFTExample, assistant_turns: str = "all",
                    source: str = "<rows>") -> list[tuple[str, bool]]:
    """The example as consecutive (text, trained) pieces; the first is the prompt."""
    field = "messages" if ex.messages is not None else "prompt"

    def render(prompt: Text, response: Text) -> tuple[str, str]:
        try:
            return render_prompt_response(tokenizer, prompt, response)
        except PrefloopError as e:  # no chat template, or one that cannot be split
            raise PrefloopError(f"{where(source, ex.row, field)}: {e}") from None

    if ex.messages is None:
        prompt_text, completion_text = render(ex.prompt, ex.completion)
        return [(prompt_text, False), (completion_text, True)]
    msgs = ex.messages
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if assistant_turns == "last":
        turns = turns[-1:]
    segments: list[tuple[str, bool]] = []
    done = ""
    for k in turns:
        # text up to and including turn k's generation prompt, and turn k's reply (+ EOS)
        before, reply = render(msgs[:k], msgs[k : k + 1])
        if not before.startswith(done):
            raise PrefloopError(
                f"{where(source, ex.row, 'messages')}: the chat template renders earlier turns "
                "differently once later turns follow; set data.assistant_turns=last"
            )
        segments += [(before[len(done):], False), (reply, True)]
        done = before + reply
    return [(text, trained) for n, (text, trained) in enumerate(segments) if text or n == 0]


def tokenize_sft(
    examples: Sequence[SFTExample],
    tokenizer,
    max_length: int = 1024,
    max_prompt_length: int = 512,
    truncation: str = "truncate",
    assistant_turns: str = "all",
    source: str = "<rows>",
) -> tuple[list[SFTSequence], TruncationStats]:
    """Tokenise each piece separately (as DPO tokenises prompt and response) and apply the
    preference data's truncation policy: cut the prompt's start, then the response's end.
    A sequence left with no trained token is dropped and counted as skipped."""
    stats = TruncationStats()
    out: list[SFTSequence] = []
    for ex in examples:
        segments = render_segments(tokenizer, ex, assistant_turns, source)
        plain = isinstance(ex.prompt, str)
        prompt_ids = tokenizer(segments[0][0], add_special_tokens=plain)["input_ids"]
        if not prompt_ids:
            raise PrefloopError(f"{where(source, ex.row)}: nothing precedes the first reply")
        response_ids: list[int] = []
        trained: list[bool] = []
        for text, is_trained in segments[1:]:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            response_ids += ids
            trained += [is_trained] * len(ids)
        fitted = fit_to_length(prompt_ids, [response_ids], max_length, max_prompt_length,
                               truncation, stats, ex.row, source)
        if fitted is None:
            continue
        prompt_ids, (response_ids,) = fitted
        trained = trained[: len(response_ids)]
        if not any(trained):
            stats.skipped += 1
            stats.skipped_rows.append(ex.row)
            continue
        out.append(SFTSequence(prompt_ids, response_ids, None if all(trained) else trained,
                               ex.row))
    if not out:
        raise PrefloopError(f"{source}: no SFT examples left after truncation")
    return out, stats


def collate_sft(seqs: Sequence[SFTSequence], pad_id: int) -> ResponseBatch:
    """Right-padded `[prompt | response]` rows whose targets are the trained tokens only."""
    batch = collate_sequences([s.prompt_ids for s in seqs], [s.response_ids for s in seqs],
                              pad_id)
    if all(s.trained is None for s in seqs):
        return batch
    keep = torch.tensor([t for s in seqs for t in (s.trained or [True] * len(s.response_ids))])
    return dataclasses.replace(
        batch, source_row=batch.source_row[keep], source_col=batch.source_col[keep],
        target=batch.target[keep], segment=batch.segment[keep],
    )


# ---------------------------------------------------------------- the sparse delta (PAFT)


@torch.no_grad()
def l1_pseudo_gradient_(params: Sequence[nn.Parameter], anchors: Sequence[Tensor],
                        coef: float) -> list[Tensor | None]:
    """Add λ₁·∂Σ|θ − θ₀| to each `.grad` in place (OWL-QN pseudo-gradient, module docstring);
    returns each entry's allowed orthant: sign(δ), or −sign(pseudo-gradient) where δ = 0."""
    orthants: list[Tensor | None] = []
    for p, p0 in zip(params, anchors, strict=True):
        if p.grad is None:
            orthants.append(None)
            continue
        g = p.grad
        sign = (p - p0).sign()
        at_zero = sign == 0
        shrunk = g.sign() * (g.abs() - coef).clamp_min(0)
        g.copy_(torch.where(at_zero, shrunk, g + coef * sign))
        orthants.append(torch.where(at_zero, -g.sign(), sign).to(torch.int8))
    return orthants


@torch.no_grad()
def project_to_orthants_(params: Sequence[nn.Parameter], anchors: Sequence[Tensor],
                         orthants: Sequence[Tensor | None]) -> None:
    """Put every entry whose δ left its orthant (including δ that became 0) back on θ₀."""
    for p, p0, o in zip(params, anchors, orthants, strict=True):
        if o is not None:
            left = (p - p0).sign().to(torch.int8) != o
            p.copy_(torch.where(left, p0, p))


@torch.no_grad()
def delta_stats(params: Sequence[Tensor], anchors: Sequence[Tensor],
                tolerance: float = DELTA_TOLERANCE) -> dict[str, float]:
    """`delta_sparsity` (share of entries with |θ − θ₀| ≤ tolerance), Σ|δ| and mean |δ|."""
    zero, total, l1 = 0, 0, 0.0
    for p, p0 in zip(params, anchors, strict=True):
        d = (p.detach() - p0.to(p.device)).abs()
        zero += int((d <= tolerance).sum())
        total += d.numel()
        l1 += float(d.double().sum())
    return {"delta_sparsity": zero / max(total, 1), "delta_l1": l1,
            "delta_mean_abs": l1 / max(total, 1)}


# ---------------------------------------------------------------- the training run


def load_sft_data(cfg: SFTConfig, tokenizer, rows: list[dict] | None = None):
    """Tokenised sequences and truncation counts from `rows` or `cfg.data.path`."""
    d = cfg.data
    source = "<rows>" if rows is not None else str(d.path)
    if rows is None:
        rows = load_rows(d.path, d.split)
    examples = sft_examples(rows, source, d)
    return tokenize_sft(examples, tokenizer, d.max_length, d.max_prompt_length, d.truncation,
                        d.assistant_turns, source)


@harness.guard_output
def train_sft(cfg: SFTConfig, rows: list[dict] | None = None,
              progress: bool = True) -> harness.RunResult:
    """Fine-tune `cfg.model` on completions; `rows` (in memory) replaces `cfg.data.path`."""
    cfg.validate(require_data=rows is None)
    t = cfg.training
    run = harness.TrainingRun(cfg, "prefloop-sft", "sft", progress)
    accelerator, device, n_proc = run.accelerator, run.device, run.n_proc

    # 1. model, tokenizer, data ----------------------------------------------------------------
    tokenizer = load_tokenizer(cfg.model, cfg.trust_remote_code)
    seqs, stats = load_sft_data(cfg, tokenizer, rows)  # bad data fails before loading weights
    model = load_causal_lm(cfg.model, cfg.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    model.to(device)

    # 2. optimiser, θ₀, output directory ---------------------------------------------------------
    model = run.start(model, tokenizer, [s.length for s in seqs], wrap=ResponseLogProbs,
                      lora=lambda m: apply_lora(m, t.lora.r, t.lora.alpha, t.lora.dropout,
                                                t.lora.target_modules))
    params, wrapped = run.params, run.wrapped
    # θ₀: on the device when the penalty needs it every step, else on the CPU for the summary
    anchors = [p.detach().clone() if cfg.l1_delta else p.detach().to("cpu", copy=True)
               for p in params]
    tokens_per_example = sum(s.num_trained for s in seqs) / len(seqs)  # c̄
    tokens_seen = 0

    # 3. optimisation --------------------------------------------------------------------------
    def step(k: int) -> tuple[dict, int, int]:
        nonlocal tokens_seen
        micro = [next(run.stream) for _ in range(t.grad_accum)]
        step_tokens = sum(seqs[i].num_trained for _, b, _ in micro for i in b)
        # every process knows the step's example count, so the summed NLL scaled by
        # n_proc / (examples · c̄) weighs every token of the epoch alike (DDP averages)
        normaliser = micro[0][2] * tokens_per_example
        nll_sum = torch.zeros((), device=device)
        for j, (_, global_idx, _) in enumerate(micro):
            idx = batching.shard(global_idx, accelerator.process_index, n_proc)
            batch = collate_sft([seqs[i] for i in idx], pad_id).to(device)
            sync = j == t.grad_accum - 1
            ctx = contextlib.nullcontext() if sync else accelerator.no_sync(wrapped)
            with ctx, accelerator.autocast():
                nll = -wrapped(batch).sum()  # (T,) completion-token log-probs → summed NLL
                loss = nll * (n_proc / normaliser)
                if not torch.isfinite(loss):
                    raise harness.non_finite_loss(loss, k, j, [seqs[i].row for i in idx],
                                                  run.partial, cfg.output_dir, cfg.model,
                                                  run.main)
                accelerator.backward(loss)
            nll_sum += nll.detach().float()
        if n_proc > 1:
            nll_sum = accelerator.reduce(nll_sum, reduction="sum")
        tokens_seen += step_tokens
        record = {"loss": nll_sum.item() / step_tokens, "tokens": step_tokens}
        return record, micro[-1][0], sum(len(b) for _, b, _ in micro)

    def before_update():
        return l1_pseudo_gradient_(params, anchors, cfg.l1_delta) if cfg.l1_delta else None

    def after_update(record: dict, orthants) -> None:
        if cfg.l1_delta:
            project_to_orthants_(params, anchors, orthants)
            delta = delta_stats(params, anchors)
            record.update(l1=cfg.l1_delta * delta["delta_l1"],
                          delta_sparsity=delta["delta_sparsity"])

    seconds = run.loop(step, before_update, after_update, count="examples",
                       shown={"loss": "loss"})

    # 4. export --------------------------------------------------------------------------------
    truncation = stats.as_dict()
    summary = {
        "steps": run.total_steps, "examples_seen": run.items_seen, "tokens_seen": tokens_seen,
        "seconds": seconds, "tokens_per_second": tokens_seen / seconds,
        "num_examples": len(seqs), "processes": n_proc, "truncation": truncation,
        "final_loss": run.log.records[-1]["loss"], "l1_delta": cfg.l1_delta,
        **delta_stats(params, anchors), "delta_tolerance": DELTA_TOLERANCE,
        "trainable_parameters": run.trainable_parameters,
        "total_parameters": run.total_parameters, "config_hash": config_hash(cfg),
    }
    output_dir = run.finish(summary, tokenizer)
    return harness.RunResult(output_dir, run.total_steps, run.items_seen, seconds,
                             run.log.records, truncation, run.main, summary)
