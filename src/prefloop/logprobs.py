"""Summed log-probabilities of response tokens, for pairs and for single sequences.

Two batch layouts give identical log-probs (tested):

* `shared_prompt` (default): each pair is ONE row `[prompt | chosen | rejected]`. A 4-D
  attention mask lets chosen tokens see the prompt and earlier chosen tokens, rejected
  tokens see the prompt and earlier rejected tokens, and the rejected segment's position
  ids restart where the prompt ends. The prompt is encoded once per pair instead of twice.
* `padded`: the usual 2B right-padded rows `[prompt | chosen]`, `[prompt | rejected]`.

In both, the LM head and log-softmax run only at the positions that predict response
tokens, never over the prompt or padding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from prefloop.data import TokenizedPair

PROMPT, CHOSEN, REJECTED, PAD = 0, 1, 2, 3
LAYOUTS = ("shared_prompt", "padded")


@dataclass
class ResponseBatch:
    """Model inputs plus, for every response token t (T in the batch), where it is predicted.

    `segment[t]` says which sequence the token belongs to: for a batch of B pairs it is
    i for pair i's chosen response and B + i for its rejected one.
    """

    input_ids: Tensor  # (N, L)
    position_ids: Tensor  # (N, L)
    attention_mask: Tensor  # (N, L) 0/1, or (N, 1, L, L) bool for shared_prompt
    source_row: Tensor  # (T,) row whose hidden state predicts token t
    source_col: Tensor  # (T,) column of that hidden state
    target: Tensor  # (T,) the response token id
    segment: Tensor  # (T,) sequence index of token t
    num_sequences: int  # 2B for pairs, B for single sequences

    def to(self, device) -> ResponseBatch:
        moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in vars(self).items()}
        return ResponseBatch(**moved)

    def token_counts(self) -> Tensor:
        """(num_sequences,) number of response tokens in each sequence."""
        counts = torch.zeros(self.num_sequences, dtype=torch.float32)
        return counts.index_add_(0, self.segment.cpu(), torch.ones(len(self.segment)))


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def collate_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int
) -> ResponseBatch:
    """Right-padded rows `[prompt | response]`, one per sequence."""
    rows, src_row, src_col, target, segment = [], [], [], [], []
    for i, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        if not p:
            raise ValueError(f"sequence {i}: empty prompt (a response needs a token to follow)")
        rows.append(list(p) + list(r))
        n = len(p)
        src_row += [i] * len(r)
        src_col += range(n - 1, n - 1 + len(r))
        target += r
        segment += [i] * len(r)
    ids = _pad(rows, pad_id)
    mask = _pad([[1] * len(r) for r in rows], 0)
    return ResponseBatch(
        input_ids=ids,
        position_ids=torch.arange(ids.shape[1]).expand_as(ids).clone(),
        attention_mask=mask,
        source_row=torch.tensor(src_row, dtype=torch.long),
        source_col=torch.tensor(src_col, dtype=torch.long),
        target=torch.tensor(target, dtype=torch.long),
        segment=torch.tensor(segment, dtype=torch.long),
        num_sequences=len(rows),
    )


def collate_pairs(pairs: Sequence[TokenizedPair], pad_id: int, layout: str = "shared_prompt"):
    """A ResponseBatch for B pairs; chosen of pair i is sequence i, rejected is B + i."""
    if layout == "padded":
        prompts = [p.prompt_ids for p in pairs] * 2
        responses = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
        return collate_sequences(prompts, responses, pad_id)
    if layout != "shared_prompt":
        raise ValueError(f"unknown batch layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    b = len(pairs)
    rows, segs, positions = [], [], []
    src_row, src_col, target, segment = [], [], [], []
    for i, pair in enumerate(pairs):
        p, c, r = pair.prompt_ids, pair.chosen_ids, pair.rejected_ids
        if not p:
            raise ValueError(f"pair {i}: empty prompt")
        n = len(p)
        rows.append(list(p) + list(c) + list(r))
        segs.append([PROMPT] * n + [CHOSEN] * len(c) + [REJECTED] * len(r))
        positions.append(list(range(n + len(c))) + list(range(n, n + len(r))))
        # chosen token k is predicted from column k-1; the first rejected token from the
        # prompt's last column, the next ones from the previous rejected column
        src_row += [i] * (len(c) + len(r))
        src_col += list(range(n - 1, n - 1 + len(c)))
        src_col += [n - 1, *range(n + len(c), n + len(c) + len(r) - 1)][: len(r)]
        target += list(c) + list(r)
        segment += [i] * len(c) + [b + i] * len(r)
    ids = _pad(rows, pad_id)
    seg = _pad(segs, PAD)
    width = ids.shape[1]
    pos = torch.tensor([q + list(range(len(q), len(q) + width - len(q))) for q in positions])
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same = seg[:, :, None] == seg[:, None, :]
    key_is_prompt = (seg[:, None, :] == PROMPT) & (seg[:, :, None] != PAD)
    mask = (causal & (same | key_is_prompt))[:, None]  # (N, 1, L, L), True = may attend
    return ResponseBatch(
        input_ids=ids,
        position_ids=pos,
        attention_mask=mask,
        source_row=torch.tensor(src_row, dtype=torch.long),
        source_col=torch.tensor(src_col, dtype=torch.long),
        target=torch.tensor(target, dtype=torch.long),
        segment=torch.tensor(segment, dtype=torch.long),
        num_sequences=2 * b,
    )


def causal_lm_of(model: nn.Module) -> nn.Module:
    """The `*ForCausalLM` module inside PEFT/DDP wrappers (LoRA layers stay injected)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        model = model.get_base_model()
    return model


def _needs_full_logits(lm: nn.Module) -> bool:
    cfg = getattr(lm, "config", None)
    return any(getattr(cfg, k, None) for k in ("final_logit_softcapping", "logit_scale"))


def response_logits(model: nn.Module, batch: ResponseBatch) -> Tensor:
    """(T, V) logits at the positions that predict the response tokens, in fp32."""
    lm = causal_lm_of(model)
    inputs = dict(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    )
    if _needs_full_logits(lm):
        logits = lm(**inputs).logits
        return logits[batch.source_row, batch.source_col].float()
    base = getattr(lm, lm.base_model_prefix)
    hidden = base(**inputs).last_hidden_state  # (N, L, H)
    picked = hidden[batch.source_row, batch.source_col]  # (T, H)
    return lm.get_output_embeddings()(picked).float()  # (T, V)


def token_logps_from_logits(logits: Tensor, target: Tensor) -> Tensor:
    """(T,) log π(target_t) from (T, V) logits."""
    return logits.gather(-1, target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def sum_by_sequence(values: Tensor, batch: ResponseBatch) -> Tensor:
    """(num_sequences,) sums of per-token `values` over each sequence's response."""
    out = torch.zeros(batch.num_sequences, dtype=values.dtype, device=values.device)
    return out.index_add(0, batch.segment, values)


class ResponseLogProbs(nn.Module):
    """Wraps a causal LM so one `forward` returns response-token log-probs.

    Training wraps this module (not the LM) with accelerate, so DDP/FSDP see the whole
    computation in one forward call.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch: ResponseBatch, return_logits: bool = False):
        logits = response_logits(self.model, batch)
        logps = token_logps_from_logits(logits, batch.target)
        return (logps, logits) if return_logits else logps


@torch.no_grad()
def sequence_logps(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    pad_id: int,
    batch_size: int = 16,
) -> Tensor:
    """(n,) summed response log-probs of each (prompt, response), in a no-grad pass."""
    device = next(model.parameters()).device
    out = []
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate_sequences([prompts[i] for i in idx], [responses[i] for i in idx], pad_id)
        batch = batch.to(device)
        logps = token_logps_from_logits(response_logits(model, batch), batch.target)
        out.append((idx, sum_by_sequence(logps, batch).cpu()))
    result = torch.zeros(len(prompts))
    for idx, values in out:
        result[torch.tensor(idx)] = values
    return result
