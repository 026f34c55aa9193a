"""An LLM judge through any OpenAI-compatible server, AlpacaEval 2 style.

For each prompt, the judge is shown the instruction and two answers — the policy's (A, the
model evaluated) and the baseline's (B) — under two one-token labels, and asked for the
label of the better answer in at most one token, at temperature 0, with the top log-probs of
its answer token. Which answer carries which label (the *order*) is either both ways, one
request each, averaged, or one seeded random way per prompt (``order="random"``), against
the judge's position bias.

Preference of one request, from the log-probs of the judge's answer token (AlpacaEval 2's
``weighted_alpaca_eval_gpt4_turbo`` reads its judge the same way)::

    P(second) = Σ_{t ∈ T₂} e^{lp_t} / (Σ_{t ∈ T₁} e^{lp_t} + Σ_{t ∈ T₂} e^{lp_t})

where ``T_k`` are the tokens among the returned top log-probs (and the chosen token) that
equal label k once surrounding white space is stripped, and ``lp_t`` their log-probs; a
label absent from the list has probability 0. When neither label is in the list, or the
server returned no log-probs, the answer's text is read instead: exactly a label (after
stripping white space, quotes, brackets and a final full stop) gives P(second) = 0 or 1.
Anything else is *unparseable*: recorded per row, counted, and left out of the rates (with a
warning), never read as ½.

The policy's preference (1 = policy better) of one request is ``P(second)`` when the policy's
answer was shown second and ``1 − P(second)`` when it was shown first; with ``order="both"``
a prompt's preference is the mean of its two requests', ``p = ½·(P₂(policy second) + 1 −
P₂(policy first))``, and the prompt counts only when both were read.

Requests run ``concurrency`` at a time (a thread pool), each with a timeout, retried with
exponential back-off (``backoff · 2^attempt`` seconds, at most ``max_backoff``, or the
server's ``Retry-After`` when it sends one) on 429, 5xx, timeouts and connection errors, at
most ``max_retries`` times; a request that still fails is recorded on its row with the
reason and the run goes on. 401, 403 and 404 (wrong key, wrong model) stop the run: every
request would fail the same way.

Every answer the judge gave (parseable or not) is appended to a JSONL cache, one line per
request, flushed at once, keyed by a hash of the judge model, the messages sent (prompt
template version, instruction, both answers in their order) and the decoding parameters —
not the server's URL — so a re-run or a resume after a crash sends only the requests that
are missing. Tokens spent (from the responses' ``usage``) are counted; cached answers cost 0.

Outputs (:func:`write_judge_files`): per-prompt judgements (JSONL), a summary (``judge.json``:
win rate and length-controlled win rate with standard errors, counts, tokens), and the files
``alpaca_eval`` reads: the policy's and the baseline's outputs and the annotations
(``output_1`` = baseline, ``output_2`` = policy, ``preference`` = 1 + p on AlpacaEval's 1..2
scale).

Exact AlpacaEval numbers come from running ``alpaca_eval`` itself on the exported outputs
with its own judge; this module reproduces the protocol, not GPT-4's prompt.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prefloop import evaluate as ev
from prefloop.data import response_text
from prefloop.errors import PrefloopError
from prefloop.judge_config import BASE_URL_ENV, JudgeConfig

__all__ = [
    "BASE_URL_ENV",
    "TEMPLATE_VERSION",
    "JudgeCache",
    "JudgeConfig",
    "JudgeResult",
    "instruction_text",
    "judge_messages",
    "judge_pairs",
    "lc_standard_error",
    "load_alpaca_eval_outputs",
    "match_rows",
    "parse_judgement",
    "policy_preference",
    "reward_judgements",
    "second_label_probability",
    "write_alpaca_eval_files",
    "write_judge_files",
]

#: Changes whenever the wording of :func:`judge_messages` changes: part of the cache key.
TEMPLATE_VERSION = "prefloop-pairwise-v1"
POLICY_FIRST, POLICY_SECOND = "policy_first", "policy_second"
# HTTP statuses that say the configuration is wrong (key, permission, model name): stop.
_FATAL_STATUS = (401, 403, 404)


# ------------------------------------------------------------------------- prompt wording


def instruction_text(prompt: Any) -> str:
    """A prompt as the instruction text the judge reads.

    A string is itself; chat messages with a single user turn are that turn's content; any
    other conversation is one ``role: content`` line per message.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        users = [m for m in prompt if m.get("role") == "user"]
        if len(prompt) == 1 and users:
            return str(users[0].get("content", ""))
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


def judge_messages(instruction: str, first: str, second: str,
                   labels: tuple[str, str] = ("A", "B")) -> list[dict[str, str]]:
    """The chat messages of one comparison, ``first`` shown under ``labels[0]``."""
    one, two = labels
    system = ("You are an impartial reviewer of answers written by AI assistants. You read "
              "an instruction and two candidate answers to it, and you name the answer that "
              "would serve the person who wrote the instruction better.")
    user = "\n".join([
        "Compare the two answers below and decide which one is better.",
        "",
        "Weigh whether each answer does what was asked, whether it is correct, and whether it "
        "is clear and complete. Extra length is only a merit when the added text is useful, "
        "and the order of the answers tells you nothing about their quality.",
        "",
        "=== Instruction ===",
        instruction,
        "",
        f"=== Answer {one} ===",
        first,
        "",
        f"=== Answer {two} ===",
        second,
        "",
        f"Which answer is better? Reply with the label alone: {one} or {two}.",
    ])
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


# ---------------------------------------------------------------------- reading a verdict


def second_label_probability(top_logprobs: Sequence[tuple[str, float]],
                             labels: tuple[str, str]) -> float | None:
    """P(second label) from the answer token's top log-probs, or None when neither is there.

    ``P = Σ_{t∈T₂} e^{lp_t} / Σ_{t∈T₁∪T₂} e^{lp_t}``, ``T_k`` the listed tokens equal to
    label k after stripping white space (each token counted once). Computed as
    ``exp(logsumexp(T₂) − logsumexp(T₁ ∪ T₂))``; a label that is absent has probability 0.
    """
    seen: dict[str, float] = {}
    for token, lp in top_logprobs:
        seen.setdefault(token, lp)
    first = [lp for t, lp in seen.items() if t.strip() == labels[0].strip()]
    second = [lp for t, lp in seen.items() if t.strip() == labels[1].strip()]
    if not first and not second:
        return None
    if not second:
        return 0.0
    lse2 = float(np.logaddexp.reduce(second))
    lse_all = float(np.logaddexp.reduce(first + second))
    return math.exp(lse2 - lse_all)


def _text_verdict(text: str, labels: tuple[str, str]) -> float | None:
    """1.0 / 0.0 when the text is exactly the second / first label, else None."""
    cleaned = text.strip(" \t\n\"'`*()[]<>.:")
    if cleaned == labels[1].strip():
        return 1.0
    if cleaned == labels[0].strip():
        return 0.0
    return None


def parse_judgement(text: str | None, top_logprobs: Sequence[tuple[str, float]] | None,
                    labels: tuple[str, str]) -> tuple[float | None, str | None]:
    """(P(second label), method) of one answer: method ``logprobs`` or ``text``, or
    (None, None) when the answer is unparseable (see the module's docstring)."""
    if top_logprobs:
        p = second_label_probability(top_logprobs, labels)
        if p is not None:
            return p, "logprobs"
    p = _text_verdict(text or "", labels)
    return (p, "text") if p is not None else (None, None)


def policy_preference(p_second: float, order: str) -> float:
    """The policy's preference from P(second label): ``p_second`` when the policy's answer was
    shown second, ``1 − p_second`` when it was shown first."""
    if order == POLICY_SECOND:
        return p_second
    if order == POLICY_FIRST:
        return 1.0 - p_second
    raise PrefloopError(f"order: must be {POLICY_FIRST} or {POLICY_SECOND}, got {order!r}")


def _orders(cfg: JudgeConfig, prompt_id: str) -> list[str]:
    if cfg.order == "both":
        return [POLICY_SECOND, POLICY_FIRST]
    digest = hashlib.sha256(f"{cfg.seed}:{prompt_id}".encode()).digest()
    return [POLICY_SECOND if digest[0] & 1 else POLICY_FIRST]


# ------------------------------------------------------------------------------- cache


def _cache_key(cfg: JudgeConfig, messages: list[dict[str, str]], order: str) -> str:
    payload = {"template": TEMPLATE_VERSION, "model": cfg.model, "messages": messages,
               "order": order, "decoding": cfg.decoding()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False)
                          .encode()).hexdigest()


class JudgeCache:
    """Append-only JSONL of the judge's answers, one line per request, flushed per line.

    A line is ``{"key", "prompt_id", "order", "model", "text", "top_logprobs",
    "prompt_tokens", "completion_tokens", "time"}``. A malformed line (a write cut by a kill)
    is skipped with a warning; appending after it starts on a fresh line.
    """

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.entries: dict[str, dict] = {}
        self.skipped = 0
        self._lock = threading.Lock()
        self._file = None
        if self.path is None:
            return
        if self.path.is_dir():
            raise PrefloopError(f"{self.path}: the judge cache is a directory, not a .jsonl file")
        if self.path.exists():
            with open(self.path, "rb") as f:
                for raw in f:
                    try:
                        row = json.loads(raw)
                        self.entries[row["key"]] = row
                    except (ValueError, KeyError, TypeError):
                        self.skipped += 1
            if self.skipped:
                warnings.warn(f"{self.path}: skipped {self.skipped} malformed line(s) of the "
                              "judge cache (a write cut short?); those requests are re-sent",
                              stacklevel=2)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> dict | None:
        return self.entries.get(key)

    def put(self, entry: dict) -> None:
        with self._lock:
            self.entries[entry["key"]] = entry
            if self.path is None:
                return
            if self._file is None:
                ends_clean = True
                if self.path.exists() and self.path.stat().st_size:
                    with open(self.path, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        ends_clean = f.read(1) == b"\n"
                self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
                if not ends_clean:
                    self._file.write("\n")
            self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


# ------------------------------------------------------------------------ requests


class _Fatal(Exception):
    """A configuration error every request would hit (wrong key, model or URL)."""


def _client(cfg: JudgeConfig):
    try:
        import openai
    except ImportError:
        raise PrefloopError("the LLM judge needs the openai client: pip install "
                            "'prefloop[judge]'") from None
    key = os.environ.get(cfg.api_key_env) or "EMPTY"
    return openai.OpenAI(base_url=cfg.resolved_base_url(), api_key=key, max_retries=0,
                         timeout=cfg.timeout)


def _retry_after(error: Exception) -> float | None:
    response = getattr(error, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _request(client, cfg: JudgeConfig, messages: list[dict[str, str]],
             stop: threading.Event) -> tuple[dict | None, str | None, int]:
    """(answer, None, attempts) on success, (None, reason, attempts) when it failed for good."""
    import openai

    kwargs: dict[str, Any] = dict(model=cfg.model, messages=messages, max_tokens=cfg.max_tokens,
                                  temperature=cfg.temperature)
    if cfg.top_logprobs:
        kwargs.update(logprobs=True, top_logprobs=cfg.top_logprobs)
    reason = "not sent"
    for attempt in range(cfg.max_retries + 1):
        if stop.is_set():
            return None, "run stopped", attempt
        wait = None
        try:
            response = client.chat.completions.create(**kwargs)
            return _answer(response), None, attempt + 1
        except openai.APIStatusError as e:
            reason = f"HTTP {e.status_code}: {_short(e)}"
            if e.status_code in _FATAL_STATUS:
                raise _Fatal(reason) from None
            if e.status_code != 429 and e.status_code < 500:
                return None, reason, attempt + 1
            wait = _retry_after(e)
        except openai.APITimeoutError:
            reason = f"timed out after {cfg.timeout:g} s"
        except openai.APIConnectionError as e:
            reason = f"connection error: {_short(e)}"
        except openai.APIResponseValidationError as e:
            return None, f"malformed response: {_short(e)}", attempt + 1
        except openai.APIError as e:  # anything else the client raises: this row fails
            return None, f"{type(e).__name__}: {_short(e)}", attempt + 1
        if attempt < cfg.max_retries:
            delay = min(cfg.max_backoff, cfg.backoff * 2.0 ** attempt)
            if wait is not None:
                delay = min(cfg.max_backoff, max(wait, 0.0))
            stop.wait(delay * (1.0 if wait is not None else random.uniform(0.8, 1.2)))
    return None, f"{reason} (after {cfg.max_retries + 1} attempts)", cfg.max_retries + 1


def _short(error: Exception) -> str:
    text = " ".join(str(error).split())
    cause = error.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text += f" ({' '.join(str(cause).split())})"
    return text[:300]


def _answer(response: Any) -> dict:
    """Text, (token, logprob) list and token usage of a chat completion."""
    choice = response.choices[0] if response.choices else None
    text = (choice.message.content or "") if choice is not None and choice.message else ""
    top: list[tuple[str, float]] = []
    content = getattr(getattr(choice, "logprobs", None), "content", None) or []
    if content:
        first = content[0]
        top = [(t.token, float(t.logprob)) for t in (first.top_logprobs or [])]
        if first.token is not None and first.logprob is not None:
            top.append((first.token, float(first.logprob)))
    usage = response.usage
    return {"text": text, "top_logprobs": top,
            "prompt_tokens": int(getattr(usage, "prompt_tokens", 0) or 0),
            "completion_tokens": int(getattr(usage, "completion_tokens", 0) or 0)}


# ------------------------------------------------------------------------- rows


def load_alpaca_eval_outputs(path: str | Path) -> list[dict]:
    """Rows of an alpaca_eval outputs JSON (a list of ``{instruction, output, generator}``) as
    response rows ``{prompt, response, generator, dataset?, num_chars}`` (no ``prompt_id``:
    they are matched to other rows by instruction text)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PrefloopError(f"{path}: file not found") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PrefloopError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, list):
        raise PrefloopError(f"{path}: expected a JSON list of {{instruction, output, "
                            f"generator}}, got {type(data).__name__}")
    rows = []
    for i, item in enumerate(data):
        for key in ("instruction", "output"):
            if not isinstance(item, dict) or not isinstance(item.get(key), str):
                raise PrefloopError(f"{path}, item {i}, field {key!r}: missing or not a string")
        row = {"prompt": item["instruction"], "response": item["output"],
               "num_chars": len(item["output"])}
        for key in ("generator", "dataset"):
            if key in item:
                row[key] = item[key]
        rows.append(row)
    return rows


def match_rows(rows_a: Sequence[dict], rows_b: Sequence[dict]) -> list[tuple[int, int]]:
    """(row of A, row of B) on the prompts both answer, in A's order, first row per prompt:
    by ``prompt_id`` when every row of both has one, else by instruction text."""
    if all("prompt_id" in r for r in rows_a) and all("prompt_id" in r for r in rows_b):
        return ev.pair_by_prompt(rows_a, rows_b)
    first_b: dict[str, int] = {}
    for j, r in enumerate(rows_b):
        first_b.setdefault(instruction_text(r["prompt"]).strip(), j)
    seen: set[str] = set()
    pairs = []
    for i, r in enumerate(rows_a):
        text = instruction_text(r["prompt"]).strip()
        if text in first_b and text not in seen:
            seen.add(text)
            pairs.append((i, first_b[text]))
    return pairs


# ----------------------------------------------------------------------- results


@dataclass
class JudgeResult:
    """What :func:`judge_pairs` returns.

    - ``rows``: one judgement per matched prompt (see :func:`judge_pairs`);
    - ``summary``: the numbers of ``judge.json`` (rates in percent, counts, tokens);
    - ``config``: the judge's config; ``names``: (policy, baseline) generator names.
    """

    rows: list[dict]
    summary: dict[str, Any]
    config: JudgeConfig
    names: tuple[str, str] = ("policy", "baseline")
    warnings: list[str] = field(default_factory=list)

    @property
    def judged(self) -> list[dict]:
        """The rows with a preference (status ``ok``)."""
        return [r for r in self.rows if r["status"] == "ok"]


def lc_standard_error(lc: ev.LCWinRate, len_a: Sequence[float], len_b: Sequence[float],
                      preference: Sequence[float]) -> float:
    """Standard error (percent) of an LC win rate fitted without difficulty or baselines.

    Delta method with the sandwich (robust) covariance of the GLM's θ = (θ_len, θ_m), which
    holds for soft labels: with ``x_i = (tanh(d_i/sd), 1)``, ``p_i = σ(x_iᵀθ)``,

        H = Σ_i p_i(1−p_i) x_i x_iᵀ,  M = Σ_i (y_i − p_i)² x_i x_iᵀ,  V = H⁺ M H⁺,
        se(LC) = 100 · σ(θ_m)(1 − σ(θ_m)) · √V_mm.

    With no length effect (θ_len = 0) this is ``√(Σ(y_i − ȳ)²)/n``, the raw win rate's
    standard error (with ddof 0). For ``fit="alpacaeval"`` (an L1 fit) it is evaluated at the
    penalised θ, an approximation. alpaca_eval's own ``lc_standard_error`` (the spread of the
    per-instruction predictions) is a different quantity.
    """
    y = np.asarray(preference, dtype=np.float64)
    x = np.stack([ev.length_feature(len_a, len_b), np.ones(y.size)], axis=1)  # (n, 2)
    theta = np.array([lc.theta_length, lc.theta_model])
    p = 1.0 / (1.0 + np.exp(-(x @ theta)))
    h = (x * (p * (1.0 - p))[:, None]).T @ x
    m = (x * ((y - p) ** 2)[:, None]).T @ x
    h_inv = np.linalg.pinv(h)
    v = h_inv @ m @ h_inv
    s = 1.0 / (1.0 + math.exp(-lc.theta_model))
    return 100.0 * s * (1.0 - s) * math.sqrt(max(float(v[1, 1]), 0.0))


def _summarise(cfg: JudgeConfig, rows: list[dict], calls: dict[str, int],
               notes: list[str], cached: bool = True) -> dict[str, Any]:
    ok = [r for r in rows if r["status"] == "ok"]
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "unparseable", "failed")}
    summary: dict[str, Any] = {
        "model": cfg.model, "base_url": cfg.resolved_base_url() or "https://api.openai.com/v1",
        "template": TEMPLATE_VERSION, "order": cfg.order, "labels": list(cfg.labels),
        "n_prompts": len(rows), "n": counts["ok"], "n_unparseable": counts["unparseable"],
        "n_failed": counts["failed"],
        "methods": {m: sum(r["method"] == m for r in ok)
                    for m in ("logprobs", "text", "mixed", "identical")},
        "win_rate": None, "win_rate_se": None, "discrete_win_rate": None,
        "discrete_win_rate_se": None, "lc_win_rate": None, "lc_win_rate_se": None,
        "lc_fit": cfg.lc_fit, "lc_warnings": [],
        **calls,
    }
    if ok:
        pref = np.array([r["preference"] for r in ok])
        wr = ev.win_rate_from_preferences(pref)
        summary.update(win_rate=wr.soft, win_rate_se=wr.soft_se, discrete_win_rate=wr.hard,
                       discrete_win_rate_se=wr.hard_se)
    if len(ok) >= 2:
        len_a = [r["num_chars_policy"] for r in ok]
        len_b = [r["num_chars_baseline"] for r in ok]
        pref = [r["preference"] for r in ok]
        lc = ev.length_controlled_win_rate(pref, len_a, len_b, fit=cfg.lc_fit)
        summary.update(lc_win_rate=lc.lc, lc_win_rate_se=lc_standard_error(lc, len_a, len_b,
                                                                          pref),
                       lc_theta_length=lc.theta_length, lc_theta_model=lc.theta_model,
                       # the hint at prompted baselines is for the reward path's flags
                       lc_warnings=[w.split("; the baseline's verbose/concise answers")[0]
                                    for w in lc.warnings])
    elif ok:
        notes.append("fewer than 2 judged prompts: no length-controlled win rate")
    if counts["unparseable"]:
        notes.append(f"{counts['unparseable']} of {len(rows)} prompts had an unparseable judge "
                     "answer and are left out of the rates")
    if counts["failed"]:
        notes.append(f"{counts['failed']} of {len(rows)} prompts failed (see their 'reason') "
                     "and are left out of the rates; "
                     + ("re-run with the same cache to retry only them" if cached else
                        "without a cache a re-run asks for every prompt again"))
    summary["warnings"] = list(notes)
    return summary


def _identical_record(order: str) -> dict:
    """Two identical answers: preference ½ without a request (alpaca_eval does the same)."""
    return {"order": order, "status": "ok", "reason": None, "preference": 0.5,
            "p_second": 0.5, "method": "identical", "text": None, "cached": False,
            "attempts": 0, "prompt_tokens": 0, "completion_tokens": 0}


def _call_record(order: str, answer: dict | None, reason: str | None, cached: bool,
                 attempts: int, labels: tuple[str, str]) -> dict:
    if answer is None:
        return {"order": order, "status": "failed", "reason": reason, "preference": None,
                "p_second": None, "method": None, "text": None, "cached": False,
                "attempts": attempts, "prompt_tokens": 0, "completion_tokens": 0}
    p_second, method = parse_judgement(answer["text"], answer["top_logprobs"], labels)
    return {
        "order": order,
        "status": "ok" if p_second is not None else "unparseable",
        "reason": None if p_second is not None else
        f"neither label {labels[0]!r} nor {labels[1]!r} in the answer {answer['text']!r} or "
        "its top log-probs",
        "preference": None if p_second is None else policy_preference(p_second, order),
        "p_second": p_second, "method": method, "text": answer["text"], "cached": cached,
        "attempts": attempts,
        "prompt_tokens": 0 if cached else answer["prompt_tokens"],
        "completion_tokens": 0 if cached else answer["completion_tokens"],
    }


def _text(row: dict) -> str:
    return response_text(row["response"])


def _row(prompt_id: str, a: dict, b: dict, names: tuple[str, str], calls: list[dict]) -> dict:
    statuses = {c["status"] for c in calls}
    status = "failed" if "failed" in statuses else \
        "unparseable" if "unparseable" in statuses else "ok"
    methods = {c["method"] for c in calls}
    return {
        "prompt_id": prompt_id,
        "instruction": instruction_text(a["prompt"]),
        "output_policy": _text(a),
        "output_baseline": _text(b),
        "generator_policy": names[0], "generator_baseline": names[1],
        "num_chars_policy": int(a.get("num_chars", len(_text(a)))),
        "num_chars_baseline": int(b.get("num_chars", len(_text(b)))),
        "preference": (sum(c["preference"] for c in calls) / len(calls)
                       if status == "ok" else None),
        "method": (methods.pop() if len(methods) == 1 else "mixed") if status == "ok" else None,
        "status": status,
        "reason": "; ".join(f"{c['order']}: {c['reason']}" for c in calls if c["reason"]) or None,
        "orders": calls,
        "prompt_tokens": sum(c["prompt_tokens"] for c in calls),
        "completion_tokens": sum(c["completion_tokens"] for c in calls),
        "cached": all(c["cached"] for c in calls),
    }


def judge_pairs(
    cfg: JudgeConfig,
    rows_a: Sequence[dict],
    rows_b: Sequence[dict],
    cache_path: str | Path | None = None,
    progress: bool | Callable[[int, int], None] = False,
    names: tuple[str, str] = ("policy", "baseline"),
) -> JudgeResult:
    """Judge the policy's responses ``rows_a`` against the baseline's ``rows_b``.

    Rows are dicts with ``prompt`` (text or chat messages), ``response`` and optionally
    ``prompt_id`` and ``num_chars``; they are matched by :func:`match_rows`. ``cache_path``
    is the JSONL cache (None: no cache). ``progress``: True for a progress bar, or a
    callable ``(done, total)`` called after each request. ``names`` are the generators'
    names written into the alpaca_eval files.

    Each returned row: ``prompt_id``, ``instruction``, ``output_policy``,
    ``output_baseline``, ``generator_*``, ``num_chars_*``, ``preference`` (in [0, 1], 1 =
    policy better; None unless ``status`` is ``ok``), ``method`` (logprobs | text | mixed),
    ``status`` (ok | unparseable | failed), ``reason``, ``orders`` (one record per request:
    order, status, reason, preference, p_second, method, text, cached, attempts, tokens),
    ``prompt_tokens``, ``completion_tokens`` (spent in this call; 0 when cached) and
    ``cached``. The summary holds the win rate (mean preference), the discrete win rate
    (preference > ½ wins, = ½ half), the LC win rate (``cfg.lc_fit``), all ± standard error
    in percent, counts and tokens. Raises :class:`PrefloopError` on a bad config, a row
    without ``prompt`` or ``response``, no shared prompt, or when the server refuses the key
    or the model (401/403/404). In a multi-process run, call it on the main process only: it
    sends the requests and appends to the cache.
    """
    cfg.validate("judge")
    for name, rows in (("rows_a", rows_a), ("rows_b", rows_b)):
        for i, row in enumerate(rows):
            for key in ("prompt", "response"):
                if not isinstance(row, dict) or key not in row:
                    raise PrefloopError(f"{name}, row {i}, field {key!r}: missing")
    pairs = match_rows(rows_a, rows_b)
    if not pairs:
        raise PrefloopError("the policy's and the baseline's responses share no prompt "
                            "(matched by prompt_id, or by instruction text without ids)")
    cache = JudgeCache(cache_path)
    notes: list[str] = []
    if cache.skipped:
        notes.append(f"{cache.skipped} malformed cache line(s) skipped")
    jobs = []  # (pair index, order, messages, key)
    results: dict[tuple[int, str], dict] = {}
    for k, (i, j) in enumerate(pairs):
        a, b = rows_a[i], rows_b[j]
        pid = str(a.get("prompt_id", i))
        text = instruction_text(a["prompt"])
        if _text(a) == _text(b):  # a tie, as alpaca_eval scores it: no judge asked
            for order in _orders(cfg, pid):
                results[(k, order)] = _identical_record(order)
            continue
        for order in _orders(cfg, pid):
            first, second = ((_text(a), _text(b))
                             if order == POLICY_FIRST else
                             (_text(b), _text(a)))
            messages = judge_messages(text, first, second, cfg.labels)
            jobs.append((k, pid, order, messages, _cache_key(cfg, messages, order)))

    n_identical = len(results)
    todo = []
    for k, pid, order, messages, key in jobs:
        hit = cache.get(key)
        if hit is not None:
            results[(k, order)] = _call_record(order, hit, None, True, 0, cfg.labels)
        else:
            todo.append((k, pid, order, messages, key))
    n_cached = len(results) - n_identical

    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(jobs), initial=n_cached, desc=f"judge {cfg.model}", unit="req")
    stop = threading.Event()
    fatal: list[str] = []
    if todo:
        client = _client(cfg)

        def run(job):
            _, pid, order, messages, key = job
            try:
                answer, reason, attempts = _request(client, cfg, messages, stop)
            except _Fatal as e:
                stop.set()
                fatal.append(str(e))
                return job, None, str(e), 1
            if answer is not None:
                cache.put({"key": key, "prompt_id": pid, "order": order, "model": cfg.model,
                           "template": TEMPLATE_VERSION, **answer, "time": time.time()})
            return job, answer, reason, attempts

        try:
            with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
                futures = [pool.submit(run, job) for job in todo]
                done = n_cached
                try:
                    for future in as_completed(futures):
                        (k, _, order, _, _), answer, reason, attempts = future.result()
                        results[(k, order)] = _call_record(order, answer, reason, False,
                                                           attempts, cfg.labels)
                        done += 1
                        if bar is not None:
                            bar.update(1)
                        elif callable(progress):
                            progress(done, len(jobs))
                except BaseException:
                    # Ctrl-C or a bug: queued requests are dropped and in-flight ones give up
                    # their retries before the pool is waited for; answers so far are cached
                    stop.set()
                    for f in futures:
                        f.cancel()
                    raise
        finally:
            cache.close()
            if bar is not None:
                bar.close()
    if fatal:
        raise PrefloopError(f"judge {cfg.model} at {cfg.resolved_base_url() or 'api.openai.com'}"
                            f": {fatal[0]} (check the judge's model name, base URL and "
                            f"${cfg.api_key_env})"
                            + ("; the answers so far are in the cache" if cache_path else ""))

    rows = []
    for k, (i, j) in enumerate(pairs):
        a = rows_a[i]
        pid = str(a.get("prompt_id", i))
        calls = [results[(k, order)] for order in _orders(cfg, pid)]
        rows.append(_row(pid, a, rows_b[j], names, calls))
    spent = {"requests": len(jobs), "requests_cached": n_cached,
             "requests_sent": len(todo),
             "prompt_tokens": sum(r["prompt_tokens"] for r in rows),
             "completion_tokens": sum(r["completion_tokens"] for r in rows)}
    summary = _summarise(cfg, rows, spent, notes, cached=cache_path is not None)
    return JudgeResult(rows=rows, summary=summary, config=cfg, names=names, warnings=notes)


def reward_judgements(rows_a: Sequence[dict], rows_b: Sequence[dict],
                      names: tuple[str, str] = ("policy", "baseline")) -> list[dict]:
    """Per-prompt rows of a reward-judged comparison, in the judge's row format.

    ``rows_a[i]`` and ``rows_b[i]`` answer the same prompt and carry a ``score``; each row
    holds ``prompt_id``, ``instruction``, both outputs, generators and lengths, ``score_policy``,
    ``score_baseline`` and ``preference = σ(s_A − s_B)`` (1 = policy better), ``status`` ok.
    """
    pref = ev.preferences([r["score"] for r in rows_a], [r["score"] for r in rows_b])
    return [{
        "prompt_id": str(a.get("prompt_id", i)), "instruction": instruction_text(a["prompt"]),
        "output_policy": _text(a), "output_baseline": _text(b),
        "generator_policy": names[0], "generator_baseline": names[1],
        "num_chars_policy": int(a.get("num_chars", len(_text(a)))),
        "num_chars_baseline": int(b.get("num_chars", len(_text(b)))),
        "score_policy": float(a["score"]), "score_baseline": float(b["score"]),
        "preference": float(p), "status": "ok",
    } for i, (a, b, p) in enumerate(zip(rows_a, rows_b, pref, strict=True))]


# ------------------------------------------------------------------------ files


def write_alpaca_eval_files(directory: str | Path, rows: Sequence[dict],
                            annotator: str | None = None) -> dict[str, Path]:
    """alpaca_eval's files from judgement rows (as :func:`judge_pairs` returns, or any rows
    with ``instruction``, ``output_policy``, ``output_baseline``, ``generator_*``):

    - ``model_outputs.json``: the policy's ``[{instruction, output, generator}]`` (every row);
    - ``reference_outputs.json``: the baseline's, same form;
    - ``annotations.json`` (when ``annotator`` is given): the rows with a preference, as
      ``{instruction, output_1, generator_1, output_2, generator_2, annotator, preference}``
      with the baseline as 1 and the policy as 2, ``preference = 1 + p`` (AlpacaEval's
      scale: 1 = output_1 better, 2 = output_2 better).

    Returns the paths written (atomically).
    """
    from prefloop.io import write_text

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    def dump(name: str, items: list[dict]) -> Path:
        path = out / name
        write_text(path, json.dumps(items, indent=2, ensure_ascii=False) + "\n")
        return path

    paths = {
        "model_outputs": dump("model_outputs.json", [
            {"instruction": r["instruction"], "output": r["output_policy"],
             "generator": r["generator_policy"]} for r in rows]),
        "reference_outputs": dump("reference_outputs.json", [
            {"instruction": r["instruction"], "output": r["output_baseline"],
             "generator": r["generator_baseline"]} for r in rows]),
    }
    if annotator is not None:
        paths["annotations"] = dump("annotations.json", [
            {"instruction": r["instruction"],
             "output_1": r["output_baseline"], "generator_1": r["generator_baseline"],
             "output_2": r["output_policy"], "generator_2": r["generator_policy"],
             "annotator": annotator, "preference": 1.0 + r["preference"]}
            for r in rows if r.get("status", "ok") == "ok" and r.get("preference") is not None])
    return paths


def write_judge_files(result: JudgeResult, judgements: str | Path | None = None,
                      summary: str | Path | None = None,
                      alpaca_eval_dir: str | Path | None = None) -> dict[str, Path]:
    """Write what was asked of a :class:`JudgeResult`, each file atomically:
    ``judgements`` (JSONL, one row per prompt), ``summary`` (``judge.json``: the summary
    and the config, without any key) and ``alpaca_eval_dir`` (see
    :func:`write_alpaca_eval_files`; annotator ``prefloop_judge_<model>``)."""
    from prefloop.io import write_json, write_jsonl

    paths: dict[str, Path] = {}
    if judgements is not None:
        Path(judgements).parent.mkdir(parents=True, exist_ok=True)
        write_jsonl(judgements, result.rows)
        paths["judgements"] = Path(judgements)
    if summary is not None:
        Path(summary).parent.mkdir(parents=True, exist_ok=True)
        write_json(summary, {**result.summary, "config": asdict(result.config),
                             "names": list(result.names)})
        paths["summary"] = Path(summary)
    if alpaca_eval_dir is not None:
        annotator = "prefloop_judge_" + "".join(c if c.isalnum() or c in "-_." else "_"
                                                for c in result.config.model)
        paths.update(write_alpaca_eval_files(alpaca_eval_dir, result.rows, annotator))
    return paths
