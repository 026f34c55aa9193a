"""Pairing stage: selection rules, tie/margin accounting, DICE length shaping, replay."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys
from math import comb

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefloop.pairing import (
    PairingConfig,
    PairingStats,
    auto_length_penalty,
    group_by_prompt,
    make_pairs,
)


def sample(pid, idx, score, tokens=10, chars=None, logprob=None, **extra):
    row = {
        "prompt_id": pid,
        "prompt": f"question {pid}",
        "prompt_ids": [1, 2, 3],
        "sample_index": idx,
        "response": f"answer {pid}/{idx}",
        "response_ids": list(range(tokens)),
        "num_tokens": tokens,
        "num_chars": 5 * tokens if chars is None else chars,
        "finish_reason": "eos",
        "score": score,
    }
    if logprob is not None:
        row["logprob"] = logprob
    row.update(extra)
    return row


def prompt_rows(pid, scores, tokens=None):
    tokens = tokens or [10] * len(scores)
    return [sample(pid, i, s, t) for i, (s, t) in enumerate(zip(scores, tokens, strict=True))]


def offline(n):
    return [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(n)]


# ---------------------------------------------------------------- grouping and best-vs-worst


def test_group_by_prompt_keeps_prompt_order_and_sorts_samples():
    rows = [sample("b", 2, 0.0), sample("a", 1, 0.0), sample("b", 0, 0.0), sample("a", 0, 0.0)]
    groups = group_by_prompt(rows)
    assert list(groups) == ["b", "a"]
    assert [r["sample_index"] for r in groups["b"]] == [0, 2]
    assert [r["sample_index"] for r in groups["a"]] == [0, 1]


def test_best_vs_worst_picks_max_and_min_with_all_fields():
    rows = prompt_rows("p", [0.5, 2.0, -1.0, 1.0], tokens=[4, 7, 3, 9])
    pairs, stats = make_pairs(rows, PairingConfig())
    assert len(pairs) == 1
    pair = pairs[0]
    assert (pair["chosen_index"], pair["rejected_index"]) == (1, 2)
    assert pair["chosen"] == "answer p/1" and pair["rejected"] == "answer p/2"
    assert pair["chosen_ids"] == list(range(7)) and pair["rejected_ids"] == list(range(3))
    assert pair["chosen_score"] == pair["chosen_raw_score"] == 2.0
    assert pair["rejected_score"] == pair["rejected_raw_score"] == -1.0
    assert (pair["chosen_tokens"], pair["rejected_tokens"]) == (7, 3)
    assert (pair["chosen_chars"], pair["rejected_chars"]) == (35, 15)
    assert pair["prompt"] == "question p" and pair["prompt_ids"] == [1, 2, 3]
    assert pair["source"] == "online"
    assert "chosen_ref_logps" not in pair
    assert stats.prompts == stats.pairs == stats.online_pairs == 1
    assert stats.mean_length_gap == 4.0 and stats.mean_score_gap == 3.0 and stats.alpha == 0.0
    assert math.isnan(stats.neutral_alpha)  # one pair, its winner longer: no α balances it


def test_prompt_ids_absent_when_input_lacks_them():
    rows = prompt_rows("p", [0.0, 1.0])
    for row in rows:
        del row["prompt_ids"]
    pairs, _ = make_pairs(rows, PairingConfig())
    assert "prompt_ids" not in pairs[0]


def test_all_tied_prompt_is_dropped_and_counted():
    rows = prompt_rows("tied", [1.0, 1.0, 1.0]) + prompt_rows("ok", [0.0, 1.0])
    pairs, stats = make_pairs(rows, PairingConfig())
    assert [p["prompt_id"] for p in pairs] == ["ok"]
    assert stats.ties_dropped == 1 and stats.prompts == 2 and stats.online_pairs == 1


def test_ties_among_extremes_break_to_lowest_sample_index():
    rows = prompt_rows("p", [1.0, 3.0, 3.0, 0.0, 0.0])
    random.Random(0).shuffle(rows)  # input order must not matter
    pairs, _ = make_pairs(rows, PairingConfig())
    assert (pairs[0]["chosen_index"], pairs[0]["rejected_index"]) == (1, 3)


def test_min_margin_drops_and_counts():
    rows = prompt_rows("small", [0.0, 0.05]) + prompt_rows("big", [0.0, 1.0])
    pairs, stats = make_pairs(rows, PairingConfig(min_margin=0.1))
    assert [p["prompt_id"] for p in pairs] == ["big"]
    assert stats.below_margin_dropped == 1 and stats.ties_dropped == 0


def test_single_sample_prompts_are_counted():
    rows = prompt_rows("one", [1.0]) + prompt_rows("two", [0.0, 1.0])
    _, stats = make_pairs(rows, PairingConfig())
    assert stats.single_sample_prompts == 1 and stats.online_pairs == 1 and stats.prompts == 2


def test_no_pairs_gives_nan_gaps_and_json_safe_dict():
    _, stats = make_pairs(prompt_rows("tied", [1.0, 1.0]), PairingConfig())
    assert math.isnan(stats.mean_length_gap) and math.isnan(stats.mean_score_gap)
    d = stats.as_dict()
    assert d["mean_length_gap"] is None and d["ties_dropped"] == 1
    assert set(d) == {f.name for f in PairingStats.__dataclass_fields__.values()}


def test_logprobs_copied_only_when_both_present():
    rows = [sample("p", 0, 1.0, logprob=-3.5), sample("p", 1, 0.0, logprob=-7.25)]
    rows += [sample("q", 0, 1.0, logprob=-2.0), sample("q", 1, 0.0)]
    pairs, _ = make_pairs(rows, PairingConfig())
    assert (pairs[0]["chosen_ref_logps"], pairs[0]["rejected_ref_logps"]) == (-3.5, -7.25)
    assert "chosen_ref_logps" not in pairs[1] and "rejected_ref_logps" not in pairs[1]


# ---------------------------------------------------------------- random and all pairs


def many_prompts(n, k, seed=0):
    rng = random.Random(seed)
    return [sample(f"p{i}", j, rng.random()) for i in range(n) for j in range(k)]


def chosen_indices(pairs):
    return [(p["chosen_index"], p["rejected_index"]) for p in pairs]


def test_random_is_deterministic_and_depends_on_seed():
    rows = many_prompts(40, 6)
    a, _ = make_pairs(rows, PairingConfig(strategy="random", seed=1))
    b, _ = make_pairs(list(reversed(rows)), PairingConfig(strategy="random", seed=1))
    c, _ = make_pairs(rows, PairingConfig(strategy="random", seed=2))
    assert len(a) == 40
    assert sorted(chosen_indices(a)) == sorted(chosen_indices(b))
    assert chosen_indices(a) != chosen_indices(c)
    assert all(p["chosen_score"] > p["rejected_score"] for p in a)


def test_random_is_identical_across_processes():
    """The per-prompt generator is seeded by sha256, not Python's salted hash()."""
    code = (
        "from prefloop.pairing import make_pairs, PairingConfig\n"
        "rows = [dict(prompt_id=f'p{i}', prompt='x', sample_index=j, response='r',"
        " response_ids=[], num_tokens=1, num_chars=1, score=float((i * 7 + j * 3) % 11))"
        " for i in range(30) for j in range(5)]\n"
        "pairs, _ = make_pairs(rows, PairingConfig(strategy='random', seed=3))\n"
        "print([(p['chosen_index'], p['rejected_index']) for p in pairs])\n"
    )
    outs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        run = subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        )
        outs.add(run.stdout)
    assert len(outs) == 1


def test_all_pairs_count_is_sum_of_combinations_minus_ties():
    rows = prompt_rows("a", [0.0, 1.0, 1.0, 2.0]) + prompt_rows("b", [5.0, 4.0, 3.0])
    rows += prompt_rows("c", [1.0])
    pairs, stats = make_pairs(rows, PairingConfig(strategy="all_pairs"))
    assert stats.ties_dropped == 1  # a: samples 1 and 2
    assert stats.online_pairs == comb(4, 2) + comb(3, 2) - 1 == 8
    assert stats.single_sample_prompts == 1
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)


# ---------------------------------------------------------------- length shaping


def test_fixed_alpha_flips_a_narrow_win_of_the_longer_answer():
    # The 100-token answer beats the 20-token one by 0.1; at α = 0.01 it costs 0.8 more.
    rows = prompt_rows("p", [1.1, 1.0], tokens=[100, 20])
    (plain,), _ = make_pairs(rows, PairingConfig())
    (shaped,), stats = make_pairs(rows, PairingConfig(length_penalty=0.01))
    assert plain["chosen_index"] == 0
    assert shaped["chosen_index"] == 1 and stats.alpha == 0.01
    assert shaped["chosen_score"] == pytest.approx(1.0 - 0.2)
    assert shaped["rejected_score"] == pytest.approx(1.1 - 1.0)
    assert (shaped["chosen_raw_score"], shaped["rejected_raw_score"]) == (1.0, 1.1)
    assert stats.mean_length_gap == -80


def test_length_unit_chars_shapes_and_reports_in_characters():
    rows = [sample("p", 0, 1.1, tokens=10, chars=500), sample("p", 1, 1.0, tokens=50, chars=100)]
    (tok,), _ = make_pairs(rows, PairingConfig(length_penalty=0.01))
    (char,), stats = make_pairs(rows, PairingConfig(length_penalty=0.01, length_unit="chars"))
    assert tok["chosen_index"] == 0 and char["chosen_index"] == 1
    assert stats.mean_length_gap == 100 - 500


def length_biased(n_prompts, k, seed, bias=0.05):
    """score = quality + bias·length, quality independent of length (a verbose proxy RM)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_prompts):
        lengths = rng.integers(20, 400, size=k)
        quality = rng.normal(0.0, 1.0, size=k)
        for j in range(k):
            score = float(quality[j] + bias * lengths[j])
            rows.append(sample(f"p{i}", j, score, tokens=int(lengths[j])))
    return rows


def test_pairing_reports_lr_dpo_length_neutral_alpha():
    from prefloop.losses import length_neutral_alpha

    # winners longer by 6 and 4 tokens, shorter by 3 in the third prompt
    rows = (prompt_rows("a", [2.0, 0.0], tokens=[10, 4]) + prompt_rows("b", [1.0, 0.5],
            tokens=[9, 5]) + prompt_rows("c", [3.0, 1.0], tokens=[5, 8]))
    pairs, stats = make_pairs(rows, PairingConfig())
    assert [p["chosen_tokens"] - p["rejected_tokens"] for p in pairs] == [6, 4, -3]
    assert stats.neutral_alpha == pytest.approx(
        length_neutral_alpha(torch.tensor([6.0, 4.0, -3.0])), rel=1e-12)
    assert stats.neutral_alpha > 0 and stats.as_dict()["neutral_alpha"] == stats.neutral_alpha
    # in characters (5 per token in these rows) α is per character
    _, chars = make_pairs(rows, PairingConfig(length_unit="chars"))
    assert chars.neutral_alpha == pytest.approx(stats.neutral_alpha / 5, rel=1e-9)


def test_dice_auto_alpha_removes_the_length_gap():
    rows = length_biased(300, 8, seed=0)
    _, plain = make_pairs(rows, PairingConfig())
    pairs, auto = make_pairs(rows, PairingConfig(length_penalty="auto", auto_alpha_max=0.2))
    assert plain.mean_length_gap > 150  # the biased scorer prefers long answers
    assert auto.alpha > 0
    assert abs(auto.mean_length_gap) < 0.1 * plain.mean_length_gap
    assert auto.alpha == auto_length_penalty(
        group_by_prompt(rows), PairingConfig(length_penalty="auto", auto_alpha_max=0.2)
    )
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)


@pytest.mark.parametrize("strategy", ["best_vs_worst", "random", "all_pairs"])
def test_auto_alpha_matches_a_brute_force_sweep(strategy):
    """The vectorised sweep picks the α that make_pairs with each fixed α would rank first."""
    rows = length_biased(25, 5, seed=1, bias=0.02)
    for row in rows[::7]:  # some ties after shaping need equal scores and lengths
        row["score"], row["num_tokens"] = 1.0, 50
    common = dict(strategy=strategy, min_margin=0.05, auto_alpha_max=0.06, auto_alpha_step=0.002)
    best = None
    for k in range(31):
        alpha = k * 0.002
        _, stats = make_pairs(rows, PairingConfig(length_penalty=alpha, **common))
        gap = abs(stats.mean_length_gap) if stats.online_pairs else math.inf
        if best is None or gap < best[0]:
            best = (gap, alpha)
    got = auto_length_penalty(group_by_prompt(rows), PairingConfig(**common))
    assert got == best[1]


def test_auto_alpha_without_any_pair_is_zero():
    rows = prompt_rows("one", [1.0]) + prompt_rows("tied", [2.0, 2.0])
    _, stats = make_pairs(rows, PairingConfig(length_penalty="auto"))
    assert stats.alpha == 0.0 and stats.online_pairs == 0


def test_auto_alpha_is_fast_at_dice_scale():
    rows = length_biased(1000, 16, seed=2)
    _, stats = make_pairs(rows, PairingConfig(length_penalty="auto"))
    assert stats.online_pairs > 900 and stats.alpha > 0


# ---------------------------------------------------------------- replay


def test_replay_half_gives_equal_counts_online_first():
    rows = many_prompts(10, 4)
    replay = offline(50)
    pairs, stats = make_pairs(rows, PairingConfig(replay_fraction=0.5), replay)
    assert stats.online_pairs == stats.replay_pairs == 10 and stats.pairs == 20
    assert [p["source"] for p in pairs] == ["online"] * 10 + ["replay"] * 10
    replayed = pairs[10:]
    assert len({p["prompt"] for p in replayed}) == 10  # without replacement
    assert all(set(p) == {"prompt", "chosen", "rejected", "source"} for p in replayed)
    assert all("source" not in r for r in replay)  # the offline rows are not modified


def test_replay_fraction_arithmetic_and_shortfall():
    rows = many_prompts(9, 3)
    _, stats = make_pairs(rows, PairingConfig(replay_fraction=0.25), offline(50))
    assert stats.replay_pairs == 3  # round(9·0.25/0.75)
    _, stats = make_pairs(rows, PairingConfig(replay_fraction=0.5), offline(4))
    assert stats.replay_pairs == 4 and stats.pairs == 13  # fewer available: all of them


def test_replay_draw_is_seeded_and_drops_stale_reference_logps():
    rows = many_prompts(10, 4)
    replay = [{**r, "chosen_ref_logps": -1.0, "rejected_ref_logps": -2.0} for r in offline(200)]

    def drawn(seed):
        pairs, _ = make_pairs(rows, PairingConfig(replay_fraction=0.5, seed=seed), replay)
        return [p["prompt"] for p in pairs if p["source"] == "replay"], pairs

    first, pairs = drawn(0)
    assert first == drawn(0)[0] and first != drawn(1)[0]
    assert not any("chosen_ref_logps" in p for p in pairs if p["source"] == "replay")


def test_replay_fraction_with_empty_replay_set_raises():
    with pytest.raises(ValueError, match="replay set is empty"):
        make_pairs(many_prompts(2, 2), PairingConfig(replay_fraction=0.5))


def test_replay_row_missing_a_column_raises():
    replay = [*offline(3), {"prompt": "p", "chosen": "c"}]
    with pytest.raises(ValueError, match=r"replay set, row 4, field 'rejected'"):
        make_pairs(many_prompts(2, 2), PairingConfig(replay_fraction=0.5), replay)


# ---------------------------------------------------------------- validation


def test_missing_field_names_row_and_field():
    rows = prompt_rows("p", [0.0, 1.0])
    del rows[1]["response_ids"]
    with pytest.raises(ValueError, match=r"row 2, field 'response_ids'"):
        make_pairs(rows, PairingConfig())


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None])
def test_bad_score_names_row_and_field(bad):
    rows = prompt_rows("p", [0.0, 1.0, 2.0])
    rows[2]["score"] = bad
    with pytest.raises(ValueError, match=r"row 3, field 'score'"):
        make_pairs(rows, PairingConfig())


def test_non_finite_logprob_is_refused():
    rows = [sample("p", 0, 1.0, logprob=-1.0), sample("p", 1, 0.0, logprob=math.nan)]
    with pytest.raises(ValueError, match=r"row 2, field 'logprob'"):
        make_pairs(rows, PairingConfig())


def test_duplicate_sample_is_refused():
    rows = [*prompt_rows("p", [0.0, 1.0]), sample("p", 1, 2.0)]
    with pytest.raises(ValueError, match=r"row 3, field 'sample_index': duplicate"):
        make_pairs(rows, PairingConfig())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"strategy": "best_of_n"}, "best_vs_worst, random, all_pairs"),
        ({"length_unit": "words"}, "tokens, chars"),
        ({"length_penalty": "dice"}, "'auto'"),
        ({"length_penalty": -0.1}, "length_penalty"),
        ({"replay_fraction": 1.0}, r"\[0, 1\)"),
        ({"min_margin": -1.0}, "min_margin"),
        ({"auto_alpha_step": 0.0}, "auto_alpha_step"),
    ],
)
def test_bad_options_are_refused(options, message):
    config = PairingConfig(**options)  # built, then validated (one protocol for configs)
    with pytest.raises(ValueError, match=message):
        config.validate()


# ---------------------------------------------------------------- properties

score_values = st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0, 2.0]) | st.floats(-5, 5)
groups_strategy = st.lists(
    st.lists(st.tuples(score_values, st.integers(1, 60)), min_size=1, max_size=6),
    min_size=1,
    max_size=8,
)


def to_rows(groups):
    return [
        sample(f"p{i}", j, score, tokens=length)
        for i, group in enumerate(groups)
        for j, (score, length) in enumerate(group)
    ]


option_strategy = st.fixed_dictionaries(
    {
        "min_margin": st.sampled_from([0.0, 0.1, 1.0]),
        "length_penalty": st.sampled_from([0.0, 0.01, "auto"]),
        "auto_alpha_max": st.just(0.05),
        "auto_alpha_step": st.just(0.005),
        "seed": st.integers(0, 3),
    }
)


@settings(max_examples=60, deadline=None)
@given(
    groups=groups_strategy,
    options=option_strategy,
    strategy=st.sampled_from(["best_vs_worst", "random", "sppo"]),
)
def test_one_candidate_per_prompt_accounting(groups, options, strategy):
    pairs, stats = make_pairs(to_rows(groups), PairingConfig(strategy=strategy, **options))
    if strategy == "sppo":
        assert all(0 <= p["rejected_target"] < p["chosen_target"] <= 1 for p in pairs)
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    assert all(p["chosen_score"] - p["rejected_score"] >= options["min_margin"] for p in pairs)
    total = stats.online_pairs + stats.ties_dropped + stats.below_margin_dropped
    assert total + stats.single_sample_prompts == stats.prompts == len(groups)
    assert stats.single_sample_prompts == sum(len(g) < 2 for g in groups)


@settings(max_examples=60, deadline=None)
@given(groups=groups_strategy, options=option_strategy)
def test_all_pairs_accounting(groups, options):
    pairs, stats = make_pairs(to_rows(groups), PairingConfig(strategy="all_pairs", **options))
    assert all(p["chosen_score"] > p["rejected_score"] for p in pairs)
    total = stats.online_pairs + stats.ties_dropped + stats.below_margin_dropped
    assert total == sum(comb(len(g), 2) for g in groups)
    assert len({(p["prompt_id"], p["chosen_index"], p["rejected_index"]) for p in pairs}) == len(
        pairs
    )


@settings(max_examples=60, deadline=None)
@given(groups=groups_strategy, options=option_strategy,
       num_accepted=st.integers(2, 4), beta=st.sampled_from([0.1, 1.0, 10.0]))
def test_rejection_sampling_accounting(groups, options, num_accepted, beta):
    rso = {"enabled": True, "beta": beta, "num_accepted": num_accepted}
    config = PairingConfig(strategy="all_pairs", rejection_sampling=rso, **options)
    _, stats = make_pairs(to_rows(groups), config)
    kept = [min(len(g), num_accepted) for g in groups]
    assert stats.rso_accepted == sum(kept)
    assert stats.rso_accepted + stats.rso_rejected == sum(len(g) for g in groups)
    total = stats.online_pairs + stats.ties_dropped + stats.below_margin_dropped
    assert total == sum(comb(k, 2) for k in kept)


def test_sppo_scores_whose_win_probabilities_are_equal_in_float_are_a_tie():
    """Found by the property test above in CI: scores 0 and 2.2e-311 differ, but σ of their
    difference is 0.5 either way, so SPPO's two targets were equal (nothing to train)."""
    rows = to_rows([[(0.0, 1), (2.225073858507e-311, 1)], [(0.0, 1), (1.0, 2)]])
    pairs, stats = make_pairs(rows, PairingConfig(strategy="sppo"))
    assert [p["prompt_id"] for p in pairs] == [rows[2]["prompt_id"]]
    assert stats.ties_dropped == 1 and stats.online_pairs == 1
    assert pairs[0]["rejected_target"] < pairs[0]["chosen_target"]
