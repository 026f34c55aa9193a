"""Work shared by the loop's stages and the stand-alone commands (`prefloop sample|score|
pair|best-of-n`): each works on plain rows and spreads its work over processes."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from prefloop import faults
from prefloop.config import RewardConfig, SamplingConfig
from prefloop.errors import BadScore, PrefloopError, where
from prefloop.processes import Processes
from prefloop.sampling import PromptRecord, Sampler

# ---------------------------------------------------------------- releasing models

# `transformers` models sit in reference cycles, so `del` alone leaves their weights to the
# next automatic collection; a full `gc.collect()` frees them at once but costs ~0.5 s
# whatever the model's size (it walks every Python object of the process). Worth it for
# models big enough that two in memory at once matter, not for tiny ones.
RELEASE_BYTES = 256 * 2**20


def _weight_bytes(obj) -> int:
    """Bytes of parameters and buffers of `obj` (a module, or an object holding modules)."""
    import torch

    if isinstance(obj, torch.nn.Module):
        modules = [obj]
    else:  # a scorer or sampler: the models among its attributes
        modules = [v for v in getattr(obj, "__dict__", {}).values()
                   if isinstance(v, torch.nn.Module)]
    return sum(t.numel() * t.element_size() for m in modules
               for t in (*m.parameters(), *m.buffers()))


def _release(big: bool) -> None:
    """Free the weights of models just deleted: at once (full collection) when `big`."""
    if big:
        gc.collect()


class ScorerCache:
    """Keeps one small reward model loaded between calls of `score_rows`. The loop scores
    with the same reward model several times per iteration (its samples, then the
    evaluation's); a small one stays loaded instead of being read again, a large one
    (≥ RELEASE_BYTES) is released after each call so it never shares memory with the policy
    being trained. One entry: a different reward, or rewritten weights, replace it."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.scorer: Any = None

    @staticmethod
    def _key(reward: RewardConfig, trust_remote_code: bool) -> tuple:
        """What a loaded scorer depends on, including when its weights were last written."""
        import os

        stamps = []
        for path in (reward.model, reward.reference):
            weights = [os.path.join(path, f) for f in sorted(os.listdir(path))
                       if f.endswith(".safetensors")] if path and os.path.isdir(path) else []
            stamps.append(tuple(os.stat(w).st_mtime_ns for w in weights))
        return (repr(reward), trust_remote_code, tuple(stamps))

    def get(self, reward: RewardConfig, trust_remote_code: bool) -> Any:
        """The kept scorer of `reward`, or a newly built one (the kept one dropped)."""
        from prefloop.rewards import build_scorer

        key = self._key(reward, trust_remote_code)
        if self.key == key:
            return self.scorer
        self.key = self.scorer = None
        return build_scorer(reward, trust_remote_code)

    def keep_if_small(self, reward: RewardConfig, trust_remote_code: bool, scorer: Any) -> bool:
        """Keep a small reward model for the next call; True when the scorer is big, i.e.
        the caller should drop its references and `_release(True)` it."""
        big = _weight_bytes(scorer) >= RELEASE_BYTES
        if reward.type == "model" and not big:
            self.key, self.scorer = self._key(reward, trust_remote_code), scorer
        else:
            self.key = self.scorer = None
        return big


# ---------------------------------------------------------------- sampling and scoring


@contextmanager
def open_sampler(policy: str, sampling: SamplingConfig, device=None,
                 trust_remote_code: bool = False, tokenizer=None) -> Iterator[Sampler]:
    """The sampler of `sampling.backend` on `policy`, released when the block ends: HF
    `generate` on a model loaded here (its weights freed at once when big), or a vLLM engine
    (its processes stopped, so their memory is back before anything else runs). The one
    place a backend is chosen: every sampling stage opens its sampler through here."""
    from prefloop.models import load_causal_lm, load_tokenizer

    tok = tokenizer or load_tokenizer(policy, trust_remote_code)
    if sampling.backend == "vllm":
        from prefloop.vllm_sampler import VLLMSampler

        with VLLMSampler(policy, sampling, trust_remote_code, device, tok) as engine:
            yield engine
        return
    from prefloop.sampling import HFSampler

    model = load_causal_lm(policy, trust_remote_code).to(device or "cpu")
    sampler = HFSampler(model, tok)
    try:
        yield sampler
    finally:
        big = _weight_bytes(model) >= RELEASE_BYTES
        sampler.model = None  # the caller may still hold the sampler; not its weights
        del model
        _release(big)


def sample_prompts(policy: str, prompts: Sequence[PromptRecord], sampling: SamplingConfig,
                   procs: Processes | None = None, trust_remote_code: bool = False,
                   progress: bool = False, desc: str = "sample",
                   reward: RewardConfig | None = None) -> list[dict]:
    """K samples per prompt; generate batches spread over processes; rows in prompt order.
    With `sampling.refine.rounds` > 0 each sample is self-refined (prefloop.refine; `reward`
    scores the rounds for `select: reward`). `sampling.backend` picks HF `generate` or a
    vLLM engine (`open_sampler`), started for this call and released before it returns.

    Batches are cut from the prompt order before they are spread, and each batch draws from
    its own seed, so any number of processes writes the same rows.
    """
    from prefloop.models import load_tokenizer
    from prefloop.refine import with_refinement

    procs = procs or Processes()
    sampling.validate()
    tok = load_tokenizer(policy, trust_remote_code)
    chat = next((p for p in prompts if isinstance(p.prompt, list)), None)
    if chat is not None and not getattr(tok, "chat_template", None):
        raise PrefloopError(
            f"prompt {chat.prompt_id!r}: chat-message prompts need a tokenizer with a chat "
            f"template and {policy}'s has none (add one to its tokenizer_config.json or use "
            "plain-text prompts)"
        )
    bs = sampling.batch_size
    batches = [list(prompts[i : i + bs]) for i in range(0, len(prompts), bs)]
    mine = [b for j, b in enumerate(batches) if j % procs.world == procs.rank]
    rows = []
    if mine:  # a process without prompts starts no model
        with open_sampler(policy, sampling, procs.device, trust_remote_code, tok) as inner:
            sampler = with_refinement(inner, sampling, reward, trust_remote_code)
            for batch in bar(mine, progress and procs.is_main, desc):
                rows += sampler.sample(batch, sampling)
                faults.point()
            del sampler
    order = {p.prompt_id: i for i, p in enumerate(prompts)}
    rows = procs.gather(rows)
    return sorted(rows, key=lambda r: (order[r["prompt_id"]], r["sample_index"]))


def score_rows(rows: Sequence[dict], reward: RewardConfig, procs: Processes | None = None,
               trust_remote_code: bool = False, progress: bool = False,
               desc: str = "score", source: str = "<rows>",
               scorers: ScorerCache | None = None) -> list[float]:
    """One score per row (`prompt`, `response`); the scorer is loaded once per call, or
    taken from `scorers` (which keeps a small reward model for the next call with the same
    reward). A non-finite score is reported with its row of `source`."""
    procs = procs or Processes()
    scorers = scorers or ScorerCache()
    scorer = scorers.get(reward, trust_remote_code)
    mine = list(range(procs.rank, len(rows), procs.world))
    chunk = max(1, reward.batch_size * 4)
    local = _score_chunks(scorer, rows, [mine[i : i + chunk] for i in range(0, len(mine), chunk)],
                          progress and procs.is_main, desc, source)
    big = scorers.keep_if_small(reward, trust_remote_code, scorer)
    del scorer  # the last reference here: a full collection can now free its weights
    _release(big)
    out = [0.0] * len(rows)
    for i, s in procs.gather(local):
        out[i] = s
    return out


def _score_chunks(scorer, rows: Sequence[dict], chunks: list[list[int]], progress: bool,
                  desc: str, source: str) -> list[tuple[int, float]]:
    """(row index, score) for every row of `chunks`. A scorer split into `encode` (no model)
    and `score_encoded` gets the next chunk tokenised on a worker thread meanwhile."""

    def texts(idx: list[int]) -> tuple[list, list]:
        return [rows[i]["prompt"] for i in idx], [rows[i]["response"] for i in idx]

    if hasattr(scorer, "score_encoded"):
        inputs, run = one_ahead(lambda idx: scorer.encode(*texts(idx)), chunks), \
            scorer.score_encoded
    else:
        inputs, run = map(texts, chunks), lambda t: scorer.score(*t)
    local = []
    for idx, x in zip(bar(chunks, progress, desc), inputs, strict=True):
        try:
            scores = run(x)
        except BadScore as e:
            raise PrefloopError(f"{where(source, idx[e.index], 'response')}: {e.detail}") \
                from None
        local += list(zip(idx, scores, strict=True))
        faults.point()
    return local


def one_ahead(fn: Callable, items: Sequence) -> Iterator:
    """fn(item) for each item in order, the next one computed on a worker thread while the
    caller works on the current one (tokenizers and torch release the GIL, so CPU-side
    preparation hides behind the model). An error of fn surfaces at its item."""
    from concurrent.futures import ThreadPoolExecutor

    if len(items) < 2:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        ahead = pool.submit(fn, items[0])
        for item in items[1:]:
            current = ahead.result()
            ahead = pool.submit(fn, item)
            yield current
        yield ahead.result()


def best_of_n(rows: Sequence[dict], scores: Sequence[float]) -> list[dict]:
    """Per prompt, the highest-scoring sample (ties: the lowest sample_index)."""
    best: dict[str, dict] = {}
    for row, score in zip(rows, scores, strict=True):
        current = best.get(row["prompt_id"])
        if current is None or score > current["score"]:
            best[row["prompt_id"]] = {**row, "score": score}
    return list(best.values())


def bar(items, enabled: bool, desc: str, unit: str = "it"):
    """A progress bar over `items` when `enabled`, else `items` unchanged."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit, dynamic_ncols=True, leave=False)
