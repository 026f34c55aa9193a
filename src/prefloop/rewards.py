"""Scoring responses: the `Scorer` interface and its three backends.

* `RewardModelScorer` — an `AutoModelForSequenceClassification` reward model with its own
  tokenizer; the conversation is re-templated with the reward model's chat template.
* `FunctionScorer` — a Python function named `module:function` in the config, called as
  `fn(prompts, responses) -> list[float]`.
* `ImplicitRewardScorer` — the DPO implicit reward `β·(log π(y|x) − log π_ref(y|x))`.

Every score must be finite; a NaN or inf names the offending sample.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch

from prefloop.config import RewardConfig
from prefloop.data import Text, encode_prompts, render_prompt_response
from prefloop.errors import BadScore, PrefloopError


class Scorer(Protocol):
    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]: ...


def check_scores(scores: Sequence[float], n: int, what: str = "reward") -> list[float]:
    if len(scores) != n:
        raise PrefloopError(f"{what}: returned {len(scores)} scores for {n} responses")
    out = []
    for i, s in enumerate(scores):
        try:
            value = float(s)
        except (TypeError, ValueError):
            value = None
        if value is None or not math.isfinite(value):
            shown = s if value is None else value
            detail = f"{what} scored it {shown!r} (must be a finite number)"
            raise BadScore(f"{what}: score of response {i} is {shown!r} (must be a finite "
                           "number)", i, detail)
        out.append(value)
    return out


def conversation_text(tokenizer, prompt: Text, response: str) -> str:
    """The text a reward model reads: its own chat template when it has one."""
    return conversation_texts(tokenizer, [prompt], [response])[0]


def conversation_texts(tokenizer, prompts: Sequence[Text], responses: Sequence[str]
                       ) -> list[str]:
    """`conversation_text` of each (prompt, response): one chat-template call for all."""
    if getattr(tokenizer, "chat_template", None):
        conversations = [
            [*([{"role": "user", "content": p}] if isinstance(p, str) else p),
             {"role": "assistant", "content": r}]
            for p, r in zip(prompts, responses, strict=True)
        ]
        if not conversations:
            return []
        return tokenizer.apply_chat_template(conversations, tokenize=False)
    return [(p if isinstance(p, str) else "\n".join(m["content"] for m in p)) + r
            for p, r in zip(prompts, responses, strict=True)]


class RewardModelScorer:
    """A sequence-classification reward model; the score is its first logit."""

    def __init__(self, name_or_path: str, batch_size: int = 16, max_length: int = 2048,
                 trust_remote_code: bool = False, device: str | torch.device = "cpu"):
        from transformers import AutoModelForSequenceClassification

        from prefloop.models import load_tokenizer

        self.tokenizer = load_tokenizer(name_or_path, trust_remote_code)
        try:
            self.model = AutoModelForSequenceClassification.from_pretrained(
                name_or_path, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        except (OSError, ValueError) as e:
            raise PrefloopError(f"{name_or_path}: cannot load reward model ({e})") from None
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.batch_size, self.max_length, self.device = batch_size, max_length, device
        self.truncated = 0

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        return self.score_encoded(self.encode(prompts, responses))

    def encode(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[list[int]]:
        """Token ids of each (prompt, response) as the reward model reads it (its chat
        template; cut from the left to `max_length`). Model-free, so a caller may prepare
        the next rows with it while `score_encoded` runs (`stages.score_rows` does)."""
        texts = conversation_texts(self.tokenizer, prompts, responses)
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]  # one batch call
        for i, ids in enumerate(encoded):
            if len(ids) > self.max_length:
                # keep the end: the response is what is being judged
                encoded[i] = ids[-self.max_length:]
                self.truncated += 1
        return encoded

    @torch.no_grad()
    def score_encoded(self, encoded: list[list[int]]) -> list[float]:
        """Scores of rows from `encode`, in length-sorted batches."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [0.0] * len(encoded)
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.tensor([encoded[i] + [pad] * (width - len(encoded[i])) for i in idx])
            mask = torch.tensor([[1] * len(encoded[i]) + [0] * (width - len(encoded[i]))
                                 for i in idx])
            logits = self.model(input_ids=ids.to(self.device),
                                attention_mask=mask.to(self.device)).logits
            for i, value in zip(idx, logits[:, 0].float().tolist(), strict=True):
                scores[i] = value
        return check_scores(scores, len(encoded), "reward model")


FUNCTION_SIGNATURE = "fn(prompts: list, responses: list[str]) -> list[float]"


def import_function(spec: str, key: str = "reward.function") -> Callable:
    """`package.module:function` or `path/to/file.py:function` → the function, checked to
    take (prompts, responses); only ever called with a config value (`key` names it in
    errors)."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise PrefloopError(f"{key}: {spec!r} is not module:function or file.py:function")
    if module_name.endswith(".py"):
        module = _module_from_file(Path(module_name).expanduser().resolve(), key)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise PrefloopError(f"{key}: cannot import module {module_name!r} ({e}); a file "
                                "works too: path/to/file.py:function") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise PrefloopError(f"{key}: {module_name!r} has no function {attr!r}")
    try:
        inspect.signature(fn).bind([], [])
    except TypeError:
        raise PrefloopError(f"{key}: {spec} must take two arguments, "
                            f"{FUNCTION_SIGNATURE}") from None
    except ValueError:  # a builtin without a signature: let the call decide
        pass
    return fn


@functools.cache
def _module_from_file(path: Path, key: str):
    """The module of a `.py` file, imported once per process like an installed one: under a
    name of its own in `sys.modules` (dataclasses need it) with its folder importable (for
    the files beside it)."""
    import sys

    if not path.is_file():
        raise PrefloopError(f"{key}: {path}: file not found")
    name = f"prefloop_user_{path.stem}_{abs(hash(str(path))):x}"
    loader = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(loader)
    sys.modules[name] = module
    if str(path.parent) not in sys.path:
        sys.path.insert(0, str(path.parent))
    try:
        loader.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise PrefloopError(f"{key}: {path} failed to import ({type(e).__name__}: {e})") \
            from None
    return module


def call_function(fn: Callable, spec: str, prompts: Sequence[Text],
                  responses: Sequence[str]) -> list:
    """`fn(prompts, responses)`, with whatever it raises turned into one line naming it."""
    try:
        return list(fn(list(prompts), list(responses)))
    except Exception as e:
        raise PrefloopError(f"{spec} raised {type(e).__name__} ({e}) on a batch of "
                            f"{len(responses)} responses; it must be {FUNCTION_SIGNATURE}"
                            ) from None


def gold_values(spec: str, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
    """`eval.gold`'s correctness of each response, checked: one finite value in [0, 1] each."""
    fn = import_function(spec, "eval.gold")
    values = check_scores(call_function(fn, f"eval.gold {spec}", prompts, responses),
                          len(responses), f"eval.gold {spec}")
    for i, v in enumerate(values):
        if not 0.0 <= v <= 1.0:
            raise PrefloopError(f"eval.gold {spec}: value of response {i} is {v} (must be in "
                                "[0, 1]: 1 = correct)")
    return values


class FunctionScorer:
    def __init__(self, spec: str):
        self.spec = spec
        self.fn = import_function(spec)

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        return check_scores(call_function(self.fn, f"reward function {self.spec}", prompts,
                                          responses), len(responses),
                            f"reward function {self.spec}")


class ImplicitRewardScorer:
    """DPO implicit reward β·(log π(y|x) − log π_ref(y|x)) of a trained model vs its reference."""

    def __init__(self, model: str, reference: str, beta: float = 0.1, batch_size: int = 16,
                 trust_remote_code: bool = False):
        from prefloop.models import load_causal_lm, load_tokenizer

        self.tokenizer = load_tokenizer(model, trust_remote_code)
        self.model = load_causal_lm(model, trust_remote_code).eval()
        self.reference = load_causal_lm(reference, trust_remote_code).eval()
        self.beta, self.batch_size = beta, batch_size

    def score(self, prompts: Sequence[Text], responses: Sequence[str]) -> list[float]:
        from prefloop.logprobs import sequence_logps

        tok = self.tokenizer
        prompt_ids = encode_prompts(tok, prompts)  # batched tokenizer calls
        texts = [render_prompt_response(tok, p, r)[1]
                 for p, r in zip(prompts, responses, strict=True)]
        response_ids = tok(texts, add_special_tokens=False)["input_ids"] if texts else []
        pad = tok.pad_token_id
        lp = sequence_logps(self.model, prompt_ids, response_ids, pad, self.batch_size)
        lr = sequence_logps(self.reference, prompt_ids, response_ids, pad, self.batch_size)
        return check_scores((self.beta * (lp - lr)).tolist(), len(responses), "implicit reward")


def build_scorer(config: RewardConfig, trust_remote_code: bool = False) -> Scorer:
    config.validate()
    if config.type == "none":
        raise PrefloopError("reward.type: none has no scorer; set a reward model, function or "
                            "implicit reward to score responses")
    if config.type == "model":
        return RewardModelScorer(config.model, config.batch_size, config.max_length,
                                 trust_remote_code)
    if config.type == "function":
        return FunctionScorer(config.function)
    return ImplicitRewardScorer(config.model, config.reference, config.beta, config.batch_size,
                                trust_remote_code)
