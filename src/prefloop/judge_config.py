"""The LLM judge's configuration (:class:`JudgeConfig`), apart from :mod:`prefloop.judge` so
that reading it (a config file, ``prefloop --help``) imports nothing heavy."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from prefloop.errors import PrefloopError

__all__ = ["BASE_URL_ENV", "ORDERS", "JudgeConfig"]

#: Environment variable read for the judge's base URL when the config gives none (then
#: ``OPENAI_BASE_URL``, then OpenAI's own API).
BASE_URL_ENV = "PREFLOOP_JUDGE_BASE_URL"
ORDERS = ("both", "random")


# ------------------------------------------------------------------------------- config


@dataclass
class JudgeConfig:
    """The LLM judge: which server and model, how it is asked, how requests are run.

    - ``model``: the judge model's name on the server (required);
    - ``base_url``: the OpenAI-compatible endpoint, e.g. ``http://127.0.0.1:8000/v1``; empty:
      ``$PREFLOOP_JUDGE_BASE_URL``, then ``$OPENAI_BASE_URL``, then OpenAI's API;
    - ``api_key_env``: the environment variable holding the API key (the key itself is never
      stored in a config); unset → the placeholder key ``EMPTY`` (local servers need none);
    - ``order``: ``both`` (each prompt judged in both orders, averaged) or ``random`` (one
      order per prompt, drawn from ``seed`` and the prompt id);
    - ``labels``: the two one-token labels of the first and the second answer;
    - ``temperature``, ``max_tokens``, ``top_logprobs``: decoding (AlpacaEval 2: 1 token,
      top-5 log-probs); ``top_logprobs`` 0 asks for no log-probs (the text is read).
      AlpacaEval's own config asks for temperature 1: OpenAI and vLLM (its default
      ``raw_logprobs``) return the model's log-probs whatever the temperature, which only
      changes the sampled text; 0 keeps the text fallback deterministic;
    - ``concurrency``: requests in flight; ``timeout``: seconds per request;
      ``max_retries``: retries after the first attempt; ``backoff``, ``max_backoff``: seconds
      of the exponential back-off ``min(max_backoff, backoff·2^k)`` before retry k+1;
    - ``lc_fit``: the length-controlled fit (:func:`prefloop.evaluate.length_controlled_win_rate`).
    """

    model: str = ""
    base_url: str = ""
    api_key_env: str = "OPENAI_API_KEY"
    order: str = "both"
    seed: int = 0
    labels: tuple[str, str] = ("A", "B")
    temperature: float = 0.0
    max_tokens: int = 1
    top_logprobs: int = 5
    concurrency: int = 8
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 30.0
    lc_fit: str = "glm"

    def validate(self, prefix: str = "judge") -> None:
        """Raise :class:`PrefloopError` naming the first bad key as ``{prefix}.key: …``."""

        def bad(key: str, why: str) -> PrefloopError:
            return PrefloopError(f"{prefix}.{key}: {why}")

        if not isinstance(self.model, str) or not self.model.strip():
            raise bad("model", "the judge model's name on the server is required")
        if self.order not in ORDERS:
            raise bad("order", f"must be one of {', '.join(ORDERS)}, got {self.order!r}")
        labels = tuple(self.labels) if isinstance(self.labels, list | tuple) else ()
        if len(labels) != 2 or not all(isinstance(s, str) and s.strip() for s in labels) \
                or labels[0].strip() == labels[1].strip():
            raise bad("labels", f"two different non-empty strings, got {self.labels!r}")
        self.labels = (labels[0], labels[1])
        if not isinstance(self.api_key_env, str) or not self.api_key_env:
            raise bad("api_key_env", "the name of an environment variable, e.g. OPENAI_API_KEY")
        checks: list[tuple[str, bool, str]] = [
            ("temperature", _number(self.temperature) and self.temperature >= 0, "a number ≥ 0"),
            ("max_tokens", _integer(self.max_tokens) and self.max_tokens >= 1, "an integer ≥ 1"),
            ("top_logprobs", _integer(self.top_logprobs) and self.top_logprobs >= 0,
             "an integer ≥ 0 (OpenAI allows up to 20)"),
            ("concurrency", _integer(self.concurrency) and self.concurrency >= 1,
             "an integer ≥ 1"),
            ("timeout", _number(self.timeout) and self.timeout > 0, "a number of seconds > 0"),
            ("max_retries", _integer(self.max_retries) and self.max_retries >= 0,
             "an integer ≥ 0"),
            ("backoff", _number(self.backoff) and self.backoff >= 0, "a number of seconds ≥ 0"),
            ("max_backoff", _number(self.max_backoff) and self.max_backoff >= 0,
             "a number of seconds ≥ 0"),
            ("seed", _integer(self.seed), "an integer"),
        ]
        for key, ok, what in checks:
            if not ok:
                raise bad(key, f"must be {what}, got {getattr(self, key)!r}")
        if self.lc_fit not in ("glm", "alpacaeval"):
            raise bad("lc_fit", f"must be glm or alpacaeval, got {self.lc_fit!r}")

    def resolved_base_url(self) -> str | None:
        """The endpoint used: the config's, else the environment's (None: OpenAI's API)."""
        return (self.base_url or os.environ.get(BASE_URL_ENV)
                or os.environ.get("OPENAI_BASE_URL") or None)

    def decoding(self) -> dict[str, Any]:
        """The parameters that change the judge's answer (part of the cache key)."""
        return {"temperature": self.temperature, "max_tokens": self.max_tokens,
                "top_logprobs": self.top_logprobs, "labels": list(self.labels)}


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _integer(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
