"""Pairing stage: turn K scored samples per prompt into preference pairs.

Reads the rows of ``scored.jsonl`` (one per sampled response) and writes the rows of
``pairs.jsonl`` in TRL's column names (``prompt``/``chosen``/``rejected`` plus token ids,
scores, lengths and, when the sampler kept them, the sampling policy's log-probs).

The rules, in the order they are applied to each prompt's samples:

0. **Rejection sampling** (RSO, optional): the candidates are first thinned by
   :func:`prefloop.online.rejection_sample` on their raw scores; the rules below see only the
   accepted ones (the α sweep included).
1. **Length shaping** (DICE): every sample's score becomes ``score − α·|y|`` with ``|y|`` in
   ``length_unit``. ``α = 0`` (the default) leaves scores unchanged; ``length_penalty="auto"``
   picks α by :func:`auto_length_penalty`. Length control can thus live at pair selection
   instead of (or besides) the ``lr_dpo`` loss term.
2. **Candidate pairs** by ``strategy``:
   ``best_vs_worst`` (iLR-DPO, the default) — the highest against the lowest shaped score;
   ``random`` — two distinct samples drawn with a per-prompt seeded generator;
   ``all_pairs`` — every unordered pair ``i < j``;
   ``sppo`` — best vs worst, each side carrying its win probability P̂ over the prompt's
   samples (:func:`prefloop.online.win_probabilities`) as ``chosen_target``/``rejected_target``;
   ``xpo`` — every policy sample against the prompt's one reference sample
   (``source: reference``), ordered by score, ``reference_sample`` naming the reference's side;
   ``spin`` — no scores: every sample (y_l) against the prompt's SFT target (y_w, the
   ``target``/``target_ids`` fields the loop's sample stage adds); rules 0, 1, 3 and 4 do not
   apply and their options must stay off.
3. **Ties** (equal shaped scores) give no pair and are counted: per candidate pair, or per
   prompt for ``best_vs_worst`` (all of its samples tied).
4. **Margin**: a pair whose shaped score gap ``s_w − s_l`` is below ``min_margin`` is dropped
   and counted.
5. **Replay** (DICE): a share γ of the final pairs is drawn from an offline preference set.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from prefloop.errors import PrefloopError, where
from prefloop.methods import METHODS, STRATEGIES, method
from prefloop.online import WIN_PROBABILITY_ESTIMATES, rejection_sample, win_probabilities

LENGTH_UNITS = {"tokens": "num_tokens", "chars": "num_chars"}
# Fields every scored row must carry (finish_reason and logprob are optional here).
REQUIRED_FIELDS = (
    "prompt_id",
    "prompt",
    "sample_index",
    "response",
    "response_ids",
    "num_tokens",
    "num_chars",
    "score",
)
SPIN_REQUIRED_FIELDS = (*(f for f in REQUIRED_FIELDS if f != "score"), "target",
                        "target_ids", "target_chars")
REPLAY_REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
# Reference log-probs stored with an offline set were computed under some other model than
# this iteration's reference (the previous policy), so replayed rows never carry them.
_STALE_REPLAY_FIELDS = ("chosen_ref_logps", "rejected_ref_logps")
_SCORED = "scored samples"
_REPLAY = "replay set"
# Upper bound on the elements of one (alphas × candidates) block in the α sweep: ~16 MB
# per float64 array, so the sweep stays vectorised without holding all α at once.
_SWEEP_BLOCK = 1 << 21


class PairingError(PrefloopError, ValueError):
    """Bad scored rows, replay rows or pairing options.

    A :class:`~prefloop.errors.PrefloopError` (the CLI prints it as one line) and a
    ``ValueError`` (what library callers catch).
    """


@dataclass
class RejectionSamplingConfig:
    """RSO's statistical rejection sampling of each prompt's candidates before pairing.

    Attributes:
        enabled: off by default.
        beta: β_rso > 0 in the acceptance probability ``exp((r − r_max)/β_rso)``; on the
            reward's scale (small β: nearly best-of-n; large β: nearly uniform).
        num_accepted: M ≥ 2, candidates kept per prompt (fewer when the prompt has fewer).
    """

    enabled: bool = False
    beta: float = 0.5
    num_accepted: int = 2

    def validate(self, key: str = "pairing.rejection_sampling") -> None:
        if not isinstance(self.enabled, bool):
            raise PairingError(f"{key}.enabled: expected true or false, "
                               f"got {self.enabled!r}")
        if not _is_number(self.beta) or not math.isfinite(self.beta) or self.beta <= 0:
            raise PairingError(f"{key}.beta: must be a finite number > 0, "
                               f"got {self.beta!r}")
        n = self.num_accepted
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise PairingError(f"{key}.num_accepted: must be an integer "
                               f"≥ 2 (a pair needs two candidates), got {n!r}")


@dataclass
class PairingConfig:
    """Options of the pairing stage (see the module docstring for the rules).

    Attributes:
        strategy: ``best_vs_worst`` | ``random`` | ``all_pairs`` | ``sppo`` | ``xpo`` |
            ``spin``.
        min_margin: drop pairs whose shaped score gap ``s_w − s_l`` is ``< min_margin``.
        length_penalty: α_pair ≥ 0 in ``shaped = score − α_pair·|y|``, or ``"auto"`` for the
            DICE sweep (:func:`auto_length_penalty`).
        length_unit: ``tokens`` | ``chars``: the ``|y|`` of the shaping and of the reported
            length gap (DICE and AlpacaEval use characters).
        auto_alpha_max: the sweep tries α = 0, step, 2·step, … up to this value.
        auto_alpha_step: the sweep's step.
        replay_fraction: γ ∈ [0, 1), the share of the final pairs drawn from the replay set.
        seed: seeds the ``random`` strategy (per prompt), rejection sampling (per prompt)
            and the replay draw; give each iteration its own seed to draw anew each time.
        win_probability: ``soft`` | ``hard``, SPPO's preference estimate (``sppo`` only).
        rejection_sampling: RSO's candidate filter (:class:`RejectionSamplingConfig`).
    """

    strategy: str = "best_vs_worst"
    min_margin: float = 0.0
    length_penalty: float | str = 0.0
    length_unit: str = "tokens"
    auto_alpha_max: float = 1.0
    auto_alpha_step: float = 1e-3
    replay_fraction: float = 0.0
    seed: int = 0
    win_probability: str = "soft"
    rejection_sampling: RejectionSamplingConfig = field(
        default_factory=RejectionSamplingConfig)

    def __post_init__(self) -> None:
        if isinstance(self.rejection_sampling, dict):
            self.rejection_sampling = RejectionSamplingConfig(**self.rejection_sampling)

    def validate(self, key: str = "pairing") -> None:
        """Raise :class:`PairingError` naming the first bad option and its valid values."""
        if self.strategy not in STRATEGIES:
            raise PairingError(
                f"{key}.strategy: unknown {self.strategy!r}; valid values: "
                f"{', '.join(STRATEGIES)}"
            )
        if self.length_unit not in LENGTH_UNITS:
            raise PairingError(
                f"{key}.length_unit: unknown {self.length_unit!r}; valid values: "
                f"{', '.join(LENGTH_UNITS)}"
            )
        penalty = self.length_penalty
        if isinstance(penalty, str):
            if penalty != "auto":
                raise PairingError(
                    f"{key}.length_penalty: {penalty!r} is not a number; give α ≥ 0 or 'auto'"
                )
        elif not _is_number(penalty) or not math.isfinite(penalty) or penalty < 0:
            raise PairingError(
                f"{key}.length_penalty: must be a finite number ≥ 0 or 'auto', got {penalty!r}"
            )
        for name, value, positive in (
            ("min_margin", self.min_margin, False),
            ("auto_alpha_max", self.auto_alpha_max, False),
            ("auto_alpha_step", self.auto_alpha_step, True),
        ):
            if not _is_number(value) or not math.isfinite(value) or value < 0:
                raise PairingError(f"{key}.{name}: must be a finite number ≥ 0, got {value!r}")
            if positive and value == 0:
                raise PairingError(f"{key}.{name}: must be > 0")
        gamma = self.replay_fraction
        if not _is_number(gamma) or not 0 <= gamma < 1:
            raise PairingError(f"{key}.replay_fraction: must be in [0, 1), got {gamma!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PairingError(f"{key}.seed: must be an integer, got {self.seed!r}")
        self.rejection_sampling.validate(f"{key}.rejection_sampling")
        self._validate_method_options(key)

    def _validate_method_options(self, key: str) -> None:
        """Options that do not apply to the strategy must stay at their defaults."""
        if self.win_probability not in WIN_PROBABILITY_ESTIMATES:
            raise PairingError(f"{key}.win_probability: unknown {self.win_probability!r}; "
                               f"valid values: {', '.join(WIN_PROBABILITY_ESTIMATES)}")
        m = method(self.strategy)
        if self.win_probability != "soft" and "win_probabilities" not in m.pair_fields:
            users = [s for s, x in METHODS.items() if "win_probabilities" in x.pair_fields]
            raise PairingError(f"{key}.win_probability: only strategy {', '.join(users)} "
                               "uses it")
        if self.rejection_sampling.enabled and not m.rejection_sampling:
            raise PairingError(f"{key}.rejection_sampling: does not apply to strategy "
                               f"{self.strategy} (one candidate pair per sample)")
        if not m.scored:
            for name, default in (("length_penalty", 0.0), ("min_margin", 0.0)):
                if getattr(self, name) != default:
                    raise PairingError(f"{key}.{name}: strategy {self.strategy} pairs "
                                       f"without scores; leave {name} at {default}")


@dataclass
class PairingStats:
    """What the pairing stage did; ``as_dict`` goes into the manifest and the report.

    For ``best_vs_worst`` and ``random`` (one candidate per prompt):
    ``online_pairs + ties_dropped + below_margin_dropped + single_sample_prompts == prompts``.
    For ``all_pairs``: ``online_pairs + ties_dropped + below_margin_dropped == Σ C(K, 2)``.
    For ``xpo`` and ``spin``: the same sum is the number of policy samples. With rejection
    sampling, ``rso_accepted + rso_rejected`` is the number of samples and K above is the
    number accepted.
    """

    prompts: int = 0
    pairs: int = 0  # online + replay
    online_pairs: int = 0
    replay_pairs: int = 0
    ties_dropped: int = 0  # candidate pairs (whole prompts for best_vs_worst) with equal scores
    below_margin_dropped: int = 0
    single_sample_prompts: int = 0  # prompts with < 2 samples
    alpha: float = 0.0  # the α_pair used (picked by the sweep when "auto")
    mean_length_gap: float = math.nan  # mean |y_w| − |y_l| over online pairs, in length_unit
    mean_score_gap: float = math.nan  # mean shaped s_w − s_l over online pairs
    # lr_dpo's α whose first update on the online pairs is length-neutral, per length_unit
    # (losses.length_neutral_alpha; what loss.auto_alpha would use); NaN when none exists
    neutral_alpha: float = math.nan
    rso_accepted: int = 0  # candidates kept by rejection sampling (RSO)
    rso_rejected: int = 0  # candidates it dropped

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-safe dict: NaN (no pairs) becomes ``None``."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, float) and math.isnan(value):
                out[key] = None
        return out


# ---------------------------------------------------------------- validation and grouping


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_rows(rows: Sequence[dict], required: Sequence[str] = REQUIRED_FIELDS,
                source: str = _SCORED) -> None:
    """Raise :class:`PairingError` at the first scored row that cannot be paired."""
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise PairingError(f"{where(source, i)}: expected an object, got {type(row).__name__}")
        for key in required:
            if row.get(key) is None:
                raise PairingError(f"{where(source, i, key)}: missing; row has {sorted(row)}")
        if not isinstance(row["prompt_id"], str):
            raise PairingError(
                f"{where(source, i, 'prompt_id')}: expected a string, got {row['prompt_id']!r}"
            )
        for key in ("sample_index", "num_tokens", "num_chars"):
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise PairingError(
                    f"{where(source, i, key)}: expected an integer ≥ 0, got {value!r}"
                )
        for key in ("score", "logprob"):
            value = row.get(key)
            if value is None and (key == "logprob" or key not in required):
                continue
            if not _is_number(value) or not math.isfinite(value):
                raise PairingError(
                    f"{where(source, i, key)}: expected a finite number, got {value!r}"
                )


def _check_replay(replay: Sequence[dict], source: str = _REPLAY) -> None:
    for i, row in enumerate(replay):
        if not isinstance(row, dict):
            raise PairingError(f"{where(source, i)}: expected an object, got {type(row).__name__}")
        for key in REPLAY_REQUIRED_FIELDS:
            if row.get(key) is None:
                raise PairingError(f"{where(source, i, key)}: missing; row has {sorted(row)}")


def group_by_prompt(rows: Sequence[dict], source: str = _SCORED) -> dict[str, list[dict]]:
    """Group scored rows by ``prompt_id``.

    Prompts keep their first-seen order; each prompt's samples are sorted by
    ``sample_index`` (so "lowest sample_index" tie-breaking is "first in the list"). The row
    dicts are not copied. A repeated ``(prompt_id, sample_index)`` raises
    :class:`PairingError`: it means the same samples were scored or concatenated twice.
    """
    groups: dict[str, list[dict]] = {}
    first_row: dict[tuple[str, int], int] = {}
    for i, row in enumerate(rows):
        for key in ("prompt_id", "sample_index"):
            if key not in row:
                raise PairingError(f"{where(source, i, key)}: missing; row has {sorted(row)}")
        key = (row["prompt_id"], row["sample_index"])
        if key in first_row:
            raise PairingError(
                f"{where(source, i, 'sample_index')}: duplicate sample {key[1]} of prompt "
                f"{key[0]!r} (first seen at {where(source, first_row[key])})"
            )
        first_row[key] = i
        groups.setdefault(row["prompt_id"], []).append(row)
    for samples in groups.values():
        samples.sort(key=lambda r: r["sample_index"])
    return groups


# ---------------------------------------------------------------- candidate pairs


def _stable_seed(seed: int, name: str) -> int:
    """A 64-bit seed from (seed, name) that is the same in every process (unlike ``hash``)."""
    digest = hashlib.sha256(f"{seed}\x00{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _candidates(samples: list[dict], shaped: list[float], config: PairingConfig,
                prompt_id: str, source: str) -> list[tuple[int, int]]:
    """Candidate position pairs of one prompt by its method's rule (methods.CANDIDATE_RULES)."""
    rule = method(config.strategy).candidates
    if rule == "extremes":
        # max/min return the first extreme, i.e. the lowest sample_index.
        return [(max(range(len(samples)), key=shaped.__getitem__),
                 min(range(len(samples)), key=shaped.__getitem__))]
    if rule == "vs_reference":
        return _reference_candidates(samples, prompt_id, config.strategy, source)
    if rule == "random_two":
        rng = random.Random(_stable_seed(config.seed, prompt_id))
        return [tuple(rng.sample(range(len(samples)), 2))]
    return list(itertools.combinations(range(len(samples)), 2))


def _reference_candidates(samples: list[dict], prompt_id: str, strategy: str,
                          source: str) -> list[tuple[int, int]]:
    """(policy sample, reference sample) positions: every policy sample against the one ỹ."""
    sources = [s.get("source") for s in samples]
    if sources.count("reference") != 1:
        raise PairingError(
            f"{source}: prompt {prompt_id!r} has {sources.count('reference')} samples with "
            f"source 'reference'; strategy {strategy} needs exactly one (the loop's sample "
            "stage draws it from the reference model)"
        )
    ref = sources.index("reference")
    return [(i, ref) for i in range(len(samples)) if i != ref]


def _shaped_scores(samples: list[dict], alpha: float, length_key: str) -> list[float]:
    # Same float operations as the vectorised sweep, so both agree on ties and margins.
    return [float(s["score"]) - alpha * s[length_key] for s in samples]


def _pair_row(chosen: dict, rejected: dict, s_w: float | None = None,
              s_l: float | None = None) -> dict[str, Any]:
    """One pair row from two sample rows; the scores only for the scored strategies, the
    chosen side's index only when it is a sample (SPIN's target is not)."""
    row: dict[str, Any] = {"prompt_id": chosen["prompt_id"], "prompt": chosen["prompt"]}
    if chosen.get("prompt_ids") is not None:
        row["prompt_ids"] = chosen["prompt_ids"]
    row.update(
        chosen=chosen["response"],
        rejected=rejected["response"],
        chosen_ids=chosen["response_ids"],
        rejected_ids=rejected["response_ids"],
    )
    if s_w is not None:
        row.update(
            chosen_score=s_w,
            rejected_score=s_l,
            chosen_raw_score=float(chosen["score"]),
            rejected_raw_score=float(rejected["score"]),
        )
    if "sample_index" in chosen:
        row["chosen_index"] = chosen["sample_index"]
    row.update(
        rejected_index=rejected["sample_index"],
        chosen_tokens=chosen["num_tokens"],
        rejected_tokens=rejected["num_tokens"],
        chosen_chars=chosen["num_chars"],
        rejected_chars=rejected["num_chars"],
        source="online",
    )
    if chosen.get("logprob") is not None and rejected.get("logprob") is not None:
        row["chosen_ref_logps"] = float(chosen["logprob"])
        row["rejected_ref_logps"] = float(rejected["logprob"])
    return row


def _spin_target(sample: dict) -> dict[str, Any]:
    """SPIN's y_w, the prompt's SFT target, in the shape of a sample row (no index, score
    or log-prob)."""
    return {
        "prompt_id": sample["prompt_id"],
        "prompt": sample["prompt"],
        "prompt_ids": sample.get("prompt_ids"),
        "response": sample["target"],
        "response_ids": sample["target_ids"],
        "num_tokens": len(sample["target_ids"]),
        "num_chars": sample["target_chars"],
    }


def _target_pairs(groups: dict[str, list[dict]], stats: PairingStats) -> list[dict]:
    """SPIN: y_w = the prompt's SFT target, y_l = each policy sample; no scores."""
    pairs = [_pair_row(_spin_target(s), s) for samples in groups.values() for s in samples]
    stats.online_pairs = len(pairs)
    return pairs


def _annotate(row: dict, config: PairingConfig, samples: list[dict], shaped: list[float],
              w: int, lo: int) -> dict:
    """The method's pair fields (methods.PAIR_FIELDS): SPPO's win-probability targets,
    XPO's reference side."""
    fields = method(config.strategy).pair_fields
    if "win_probabilities" in fields:
        p_hat = win_probabilities(shaped, config.win_probability)
        row["chosen_target"], row["rejected_target"] = p_hat[w], p_hat[lo]
    if "reference_side" in fields:
        row["reference_sample"] = "chosen" if samples[w].get("source") == "reference" \
            else "rejected"
    return row


def _rejection_filter(groups: dict[str, list[dict]], config: PairingConfig,
                      stats: PairingStats) -> dict[str, list[dict]]:
    """RSO: each prompt keeps the candidates :func:`rejection_sample` accepts (raw scores,
    per-prompt seeded draw), in ``sample_index`` order; counts go to ``stats``."""
    rso = config.rejection_sampling
    kept: dict[str, list[dict]] = {}
    for prompt_id, samples in groups.items():
        rng = random.Random(_stable_seed(config.seed, "\x00rso\x00" + prompt_id))
        accepted = rejection_sample([float(s["score"]) for s in samples], rso.beta,
                                    rso.num_accepted, rng)
        kept[prompt_id] = [samples[i] for i in sorted(accepted)]
        stats.rso_accepted += len(accepted)
        stats.rso_rejected += len(samples) - len(accepted)
    return kept


# ---------------------------------------------------------------- the DICE α sweep


def _alpha_grid(config: PairingConfig) -> np.ndarray:
    """α_k = k·step for k = 0..n, n = ⌊max/step⌋ (integer k: no accumulated float drift)."""
    n = math.floor(config.auto_alpha_max / config.auto_alpha_step + 1e-9)
    return np.arange(n + 1, dtype=np.float64) * config.auto_alpha_step


def _sweep_best_vs_worst(
    groups: list[list[dict]], length_key: str, grid: np.ndarray, min_margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per α: (sum of |y_w| − |y_l|, number of pairs) of the best-vs-worst pairs."""
    n_prompts, k_max = len(groups), max(len(g) for g in groups)
    scores = np.zeros((n_prompts, k_max))
    lengths = np.zeros((n_prompts, k_max))
    valid = np.zeros((n_prompts, k_max), dtype=bool)
    for p, samples in enumerate(groups):
        k = len(samples)
        scores[p, :k] = [float(s["score"]) for s in samples]
        lengths[p, :k] = [s[length_key] for s in samples]
        valid[p, :k] = True
    sums, counts = np.zeros(len(grid)), np.zeros(len(grid), dtype=np.int64)
    prompt_rows = np.arange(n_prompts)[None, :]
    chunk = max(1, _SWEEP_BLOCK // (n_prompts * k_max))
    for start in range(0, len(grid), chunk):
        alphas = grid[start : start + chunk, None, None]
        shaped = scores[None] - alphas * lengths[None]  # (A, P, K)
        # argmax/argmin return the first extreme: the lowest sample_index, as in make_pairs.
        w = np.where(valid, shaped, -np.inf).argmax(axis=-1)  # (A, P)
        lo = np.where(valid, shaped, np.inf).argmin(axis=-1)  # (A, P)
        s_w = np.take_along_axis(shaped, w[..., None], axis=-1)[..., 0]
        s_l = np.take_along_axis(shaped, lo[..., None], axis=-1)[..., 0]
        keep = (s_w > s_l) & (s_w - s_l >= min_margin)
        gap = lengths[prompt_rows, w] - lengths[prompt_rows, lo]  # (A, P)
        sums[start : start + chunk] = np.where(keep, gap, 0.0).sum(axis=-1)
        counts[start : start + chunk] = keep.sum(axis=-1)
    return sums, counts


def _sweep_fixed(
    pairs: list[tuple[dict, dict]], length_key: str, grid: np.ndarray, min_margin: float
) -> tuple[np.ndarray, np.ndarray]:
    """Per α: (sum of |y_w| − |y_l|, number of pairs) over fixed candidate pairs (a, b)."""
    s_a = np.array([float(a["score"]) for a, _ in pairs])
    s_b = np.array([float(b["score"]) for _, b in pairs])
    l_a = np.array([a[length_key] for a, _ in pairs], dtype=np.float64)
    l_b = np.array([b[length_key] for _, b in pairs], dtype=np.float64)
    sums, counts = np.zeros(len(grid)), np.zeros(len(grid), dtype=np.int64)
    chunk = max(1, _SWEEP_BLOCK // len(pairs))
    for start in range(0, len(grid), chunk):
        alphas = grid[start : start + chunk, None]
        diff = (s_a - alphas * l_a) - (s_b - alphas * l_b)  # (A, N): shaped s_a − s_b
        keep = (diff != 0) & (np.abs(diff) >= min_margin)
        gap = np.where(diff > 0, l_a - l_b, l_b - l_a)  # chosen minus rejected length
        sums[start : start + chunk] = np.where(keep, gap, 0.0).sum(axis=-1)
        counts[start : start + chunk] = keep.sum(axis=-1)
    return sums, counts


def auto_length_penalty(groups: dict[str, list[dict]], config: PairingConfig) -> float:
    """DICE's automatic α_pair: the α whose pairs have mean length gap closest to 0.

    For every α in ``0, step, 2·step, …, auto_alpha_max`` the pairs are formed exactly as
    :func:`make_pairs` would form them with that fixed α (the configured ``strategy``,
    ties and ``min_margin`` dropped; DICE itself uses best-vs-worst, the default), and the
    mean of ``|y_w| − |y_l|`` (in ``length_unit``) over them is measured. Returns the α with
    the smallest ``|mean gap|``, the smallest such α on ties; ``0.0`` when no α yields a pair.

    Vectorised over α in blocks with numpy: ~1000 prompts × 16 samples × 1001 α values take
    a fraction of a second. ``groups`` is :func:`group_by_prompt` of validated rows.
    """
    config.validate()
    length_key = LENGTH_UNITS[config.length_unit]
    grid = _alpha_grid(config)
    multi = {pid: g for pid, g in groups.items() if len(g) >= 2}
    if not multi:
        return 0.0
    if method(config.strategy).candidates == "extremes":
        sums, counts = _sweep_best_vs_worst(
            list(multi.values()), length_key, grid, config.min_margin
        )
    else:
        pairs = [
            # these rules do not read the scores
            (g[a], g[b]) for pid, g in multi.items()
            for a, b in _candidates(g, [], config, pid, _SCORED)
        ]
        sums, counts = _sweep_fixed(pairs, length_key, grid, config.min_margin)
    # Lengths are integers, so each |sum|/count is the correctly rounded value of an exact
    # fraction: equal gaps compare equal and argmin's first hit is the smallest α.
    gaps = np.full(len(grid), np.inf)
    has_pairs = counts > 0
    gaps[has_pairs] = np.abs(sums[has_pairs]) / counts[has_pairs]
    if not has_pairs.any():
        return 0.0
    return float(grid[int(np.argmin(gaps))])


# ---------------------------------------------------------------- replay and the stage


def _draw_replay(replay: Sequence[dict], n_online: int, config: PairingConfig) -> list[dict]:
    """round(n_online·γ/(1−γ)) offline rows (half up), without replacement, seeded by ``seed``.

    Then replayed rows are the share γ of online + replayed. Rows are shallow copies with
    ``source="replay"``; fields the offline set lacks stay absent, and stored reference
    log-probs are dropped (they belong to another reference model).
    """
    gamma = config.replay_fraction
    if gamma == 0:
        return []
    wanted = math.floor(n_online * gamma / (1 - gamma) + 0.5)
    rng = random.Random(_stable_seed(config.seed, "\x00replay"))
    picked = rng.sample(range(len(replay)), min(wanted, len(replay)))
    out = []
    for j in picked:
        row = {k: v for k, v in replay[j].items() if k not in _STALE_REPLAY_FIELDS}
        row["source"] = "replay"
        out.append(row)
    return out


def make_pairs(
    rows: Sequence[dict], config: PairingConfig, replay: Sequence[dict] = (),
    source: str = _SCORED, replay_source: str = _REPLAY,
) -> tuple[list[dict], PairingStats]:
    """Pair scored samples by the module's rules; returns (online pairs then replay, stats).

    Each online pair of a scored strategy has ``chosen_score > rejected_score`` (shaped
    scores; raw scores in ``*_raw_score``); ``spin`` pairs carry no scores and ``rows`` need
    no ``score`` for it. ``chosen_ref_logps``/``rejected_ref_logps`` are the sampling policy's
    summed log-probs, present when both samples carry ``logprob``: they are valid reference
    log-probs only when the reference is the policy that sampled (the paper's π_{t−1}).

    Raises:
        PairingError (a ValueError): a row missing a required field or with a non-finite
            score, a duplicate sample, a bad option, or ``replay_fraction > 0`` with no
            replay rows.
    """
    config.validate()
    rows = list(rows)
    scored = method(config.strategy).scored
    _check_rows(rows, REQUIRED_FIELDS if scored else SPIN_REQUIRED_FIELDS, source)
    if config.replay_fraction > 0:
        if len(replay) == 0:
            raise PairingError(
                f"pairing.replay_fraction is {config.replay_fraction} but the replay set is "
                "empty; give an offline preference set or set replay_fraction to 0"
            )
        _check_replay(replay, replay_source)
    groups = group_by_prompt(rows, source)
    stats = PairingStats(prompts=len(groups))
    if not scored:
        pairs = _target_pairs(groups, stats)
    else:
        if config.rejection_sampling.enabled:
            groups = _rejection_filter(groups, config, stats)
        pairs = _scored_pairs(groups, config, stats, source)
    if pairs:
        unit = config.length_unit
        gaps = [p[f"chosen_{unit}"] - p[f"rejected_{unit}"] for p in pairs]
        stats.mean_length_gap = float(np.mean(gaps))
        stats.neutral_alpha = _neutral_alpha(gaps)
    replayed = _draw_replay(replay, len(pairs), config)
    stats.replay_pairs = len(replayed)
    stats.pairs = len(pairs) + len(replayed)
    return pairs + replayed, stats


def _neutral_alpha(gaps: Sequence[float]) -> float:
    import torch

    from prefloop.losses import length_neutral_alpha

    try:
        return length_neutral_alpha(torch.tensor(gaps, dtype=torch.float64))
    except ValueError:  # no winner shorter than its loser
        return math.nan


def _scored_pairs(groups: dict[str, list[dict]], config: PairingConfig,
                  stats: PairingStats, source: str = _SCORED) -> list[dict]:
    """Rules 1–4 over every prompt's (accepted) samples; fills the stats' counts."""
    if config.length_penalty == "auto":
        alpha = auto_length_penalty(groups, config)
    else:
        alpha = float(config.length_penalty)
    length_key = LENGTH_UNITS[config.length_unit]
    stats.alpha = alpha
    m = method(config.strategy)
    pairs: list[dict] = []
    for prompt_id, samples in groups.items():
        if len(samples) < 2 and not m.reference_samples:
            stats.single_sample_prompts += 1
            continue
        shaped = _shaped_scores(samples, alpha, length_key)
        for a, b in _candidates(samples, shaped, config, prompt_id, source):
            if shaped[a] == shaped[b]:
                stats.ties_dropped += 1
                continue
            w, lo = (a, b) if shaped[a] > shaped[b] else (b, a)
            if shaped[w] - shaped[lo] < config.min_margin:
                stats.below_margin_dropped += 1
                continue
            row = _annotate(_pair_row(samples[w], samples[lo], shaped[w], shaped[lo]),
                            config, samples, shaped, w, lo)
            if row.get("chosen_target", 1.0) <= row.get("rejected_target", 0.0):
                # scores a hair apart (1e-311) whose win probabilities are equal in float:
                # no preference left to train SPPO on, a tie like equal scores
                stats.ties_dropped += 1
                continue
            pairs.append(row)
    stats.online_pairs = len(pairs)
    if pairs:
        stats.mean_score_gap = float(
            np.mean([p["chosen_score"] - p["rejected_score"] for p in pairs])
        )
    return pairs
