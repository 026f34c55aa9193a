"""Sampling responses from a policy: the `Sampler` interface and its HF `generate` backend
(the vLLM backend is prefloop.vllm_sampler; `stages.open_sampler` picks one by
`sampling.backend`). Both write their rows through `response_rows`.

A sample row (one line of samples.jsonl):

    {"prompt_id", "prompt", "prompt_ids", "sample_index", "response", "response_ids",
     "num_tokens", "num_chars", "finish_reason": "eos" | "length", "logprob"}

`logprob` is the summed log-probability of `response_ids` under the sampling policy, read
from the raw (untempered) logits of the generation pass; the trainer reuses it as the
reference log-prob when the reference is the policy that sampled, so no second pass is
needed (HF backend only: vLLM's come from other kernels). It is `null` when it was not
recorded (beam search, or logits too large to keep).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from prefloop.config import SamplingConfig
from prefloop.data import Text, encode_prompts


@dataclass
class PromptRecord:
    prompt_id: str
    prompt: Text


class Sampler(Protocol):
    """Anything that turns prompts into K sample rows each (HF generate, vLLM, a service)."""

    def sample(self, prompts: Sequence[PromptRecord], config: SamplingConfig,
               progress: bool = False) -> list[dict]: ...


def batch_seed(seed: int, batch_key: str) -> int:
    """A seed per generate batch, so a batch draws the same samples on any process."""
    digest = hashlib.sha256(f"{seed}:{batch_key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


class HFSampler:
    """Batched `model.generate` with left padding and KV cache; n samples per prompt."""

    def __init__(self, model, tokenizer):
        self.model = model
        self.tokenizer = tokenizer

    def _generate_kwargs(self, config: SamplingConfig) -> dict[str, Any]:
        greedy = config.temperature == 0
        kwargs: dict[str, Any] = dict(
            max_new_tokens=config.max_new_tokens,
            num_return_sequences=config.num_samples,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            return_dict_in_generate=True,
            use_cache=True,
        )
        if config.num_beams > 1:
            kwargs.update(num_beams=config.num_beams, do_sample=False)
        elif greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(do_sample=True, temperature=config.temperature, top_p=config.top_p,
                          top_k=config.top_k or None)
        return kwargs

    def _keep_logits(self, config: SamplingConfig, n_prompts: int) -> bool:
        if not config.record_logprobs or config.num_beams > 1:
            return False
        vocab = self.model.get_output_embeddings().weight.shape[0]
        size = n_prompts * config.num_samples * config.max_new_tokens * vocab * 4
        return size <= config.logprob_budget_mb * 2**20

    @torch.no_grad()
    def sample(self, prompts: Sequence[PromptRecord], config: SamplingConfig,
               progress: bool = False) -> list[dict]:
        """K samples per prompt; rows ordered by prompt then sample_index."""
        config.validate()
        if config.temperature == 0 and config.num_samples > 1 and config.num_beams == 1:
            # greedy decoding gives K identical answers; one is enough
            config = SamplingConfig(**{**vars(config), "num_samples": 1})
        model, tok = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        encoded = encode_prompts(tok, [p.prompt for p in prompts])
        rows: list[dict] = []
        starts = range(0, len(prompts), config.batch_size)
        bar = _progress(len(prompts), progress)
        for start in starts:
            idx = list(range(start, min(start + config.batch_size, len(prompts))))
            keep = self._keep_logits(config, len(idx))
            width = max(len(encoded[i]) for i in idx)
            pad = tok.pad_token_id
            input_ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in idx])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i])
                                 for i in idx])
            torch.manual_seed(batch_seed(config.seed, prompts[idx[0]].prompt_id))
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=mask.to(device),
                output_logits=keep, **self._generate_kwargs(config),
            )
            new = out.sequences[:, width:].cpu()  # (b·K, steps)
            logps = sampled_token_logps(out.logits, new) if keep else None
            rows += response_rows(
                tok, [prompts[i] for i in idx], [encoded[i] for i in idx],
                config.num_samples, new.tolist(),
                None if logps is None else summed_logps(logps),
            )
            if bar is not None:
                bar.update(len(idx))
        if bar is not None:
            bar.close()
        model.train(was_training)
        return rows


def response_rows(tokenizer, prompts: Sequence[PromptRecord], prompt_ids: Sequence[list[int]],
                  k: int, generated: Sequence[list[int]],
                  logprob: Callable[[int, list[int]], float] | None = None) -> list[dict]:
    """Sample rows of `prompts` from what a backend generated: `generated[n]` is sample
    n % k of prompt n // k, cut here after its first EOS (or kept whole: ``length``) and
    decoded in one call; `logprob(n, kept_ids)` gives its summed log-prob (None: not
    recorded). Every backend writes its rows through here, so they share one schema."""
    eos = tokenizer.eos_token_id
    cut = [(ids[: ids.index(eos) + 1], "eos") if eos in ids else (list(ids), "length")
           for ids in generated]
    texts = tokenizer.batch_decode([ids for ids, _ in cut], skip_special_tokens=True)
    rows = []
    for n, ((ids, finish), text) in enumerate(zip(cut, texts, strict=True)):
        prompt, index = prompts[n // k], n % k
        rows.append({
            "prompt_id": prompt.prompt_id,
            "prompt": prompt.prompt,
            "prompt_ids": prompt_ids[n // k],
            "sample_index": index,
            "response": text,
            "response_ids": ids,
            "num_tokens": len(ids),
            "num_chars": len(text),
            "finish_reason": finish,
            "logprob": None if logprob is None else logprob(n, ids),
        })
    return rows


def summed_logps(logps: torch.Tensor) -> Callable[[int, list[int]], float]:
    """`response_rows`' log-prob of row n from per-token log-probs (b·K, steps): the sum over
    its kept tokens."""
    return lambda n, ids: float(logps[n, : len(ids)].sum())


def sampled_token_logps(step_logits: Sequence[torch.Tensor], new: torch.Tensor
                        ) -> torch.Tensor:
    """log π(y_j | x, y_<j) of each sampled token, from `generate`'s raw logits (before
    temperature / top-p), one step at a time: (b·K, steps).

    The same values as a log-softmax over the stacked (b·K, steps, V) logits without
    building that tensor twice (~4× faster); these are the reference log-probs the trainer
    reuses instead of a reference forward pass.
    """
    return torch.stack([
        step.float().cpu().log_softmax(-1).gather(-1, new[:, j, None]).squeeze(-1)
        for j, step in enumerate(step_logits)  # step: (b·K, V)
    ], dim=1)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sample", unit="prompt", dynamic_ncols=True)
