"""The online methods as loop configurations (SPIN, SPPO, XPO, DICE, RSO), on tiny models.

Each method's own mechanics are checked: what its pairs are made of, where its samples come
from, and the numbers its estimators give; plus one short loop run per new loop mode.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from prefloop.data import read_jsonl, render_prompt_response
from prefloop.errors import PrefloopError
from prefloop.loop import RunDir, load_run_config, run
from prefloop.loop.stages import iteration_reward, merge_reference_samples, reference_sampling
from prefloop.online import rejection_sample, win_probabilities
from prefloop.pairing import (
    PairingConfig,
    _stable_seed,
    auto_length_penalty,
    group_by_prompt,
    make_pairs,
)
from prefloop.prompts import iteration_prompts, load_prompts
from tests.conftest import write_jsonl
from tests.test_pairing import prompt_rows, sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory, tokenizer):
    """A nano policy, a second nano model (DICE's reference), a reward model, prompt files
    whose rows carry an SFT answer (`completion`), and an offline preference set."""
    from prefloop.tiny import (
        build_causal_lm,
        build_reward_model,
        save_pretrained_pair,
        synthetic_preferences,
    )

    d = tmp_path_factory.mktemp("methods")
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "nano"), tokenizer, d / "policy")
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "nano", seed=3), tokenizer,
                         d / "sft_reference")
    save_pretrained_pair(build_reward_model("llama", tokenizer, "nano", seed=1), tokenizer,
                         d / "rm")
    rows = synthetic_preferences(16, seed=5, chat=True)
    write_jsonl(d / "prompts.jsonl", [
        {"prompt": r["prompt"], "id": f"p{i}", "completion": r["chosen"][0]["content"]}
        for i, r in enumerate(rows)])
    write_jsonl(d / "eval.jsonl", [{"prompt": r["prompt"]} for r in
                                   synthetic_preferences(4, seed=9, chat=True)])
    write_jsonl(d / "offline.jsonl", synthetic_preferences(12, seed=11, chat=True))
    return d


def config(world: Path, run_dir: Path, *extra: str):
    return load_run_config(None, [
        f"policy={world / 'policy'}", f"prompts.path={world / 'prompts.jsonl'}",
        "prompts.id_column=id", "prompts.per_iteration=6", "iterations=1",
        f"run_dir={run_dir}", f"reward.model={world / 'rm'}", "sampling.num_samples=3",
        "sampling.max_new_tokens=12", "sampling.batch_size=6", "training.lr=1e-3",
        "training.batch_size=4", "data.max_length=128", "data.max_prompt_length=64", *extra,
    ])


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())


def by_prompt(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in rows:
        out.setdefault(r["prompt_id"], []).append(r)
    return out


# ---------------------------------------------------------------- SPIN


def test_spin_pairs_sft_targets_against_samples_and_skips_scoring(world, tmp_path, tokenizer):
    run_dir = tmp_path / "spin"
    cfg = config(world, run_dir, "pairing.strategy=spin", "prompts.target_column=completion",
                 "reward.type=none", "reward.model=", "sampling.num_samples=2",
                 "loss.name=dpo", f"eval.prompts.path={world / 'eval.jsonl'}",
                 f"eval.reward.model={world / 'rm'}", "eval.sampling.max_new_tokens=8")
    run(cfg, progress=False)
    stages = manifest(run_dir)["stages"]
    assert stages["iter_1/score"]["status"] == "skipped" and "spin" in stages["iter_1/score"][
        "reason"]
    assert stages["iter_1/train"]["status"] == "done"
    d = run_dir / "iter_1"
    assert not (d / "scored.jsonl").exists()
    targets = {r["id"]: r["completion"] for r in read_jsonl(world / "prompts.jsonl")}
    samples = {(r["prompt_id"], r["sample_index"]): r for r in read_jsonl(d / "samples.jsonl")}
    pairs = read_jsonl(d / "pairs.jsonl")
    assert len(pairs) == len(samples) == 12  # one pair per sample: 6 prompts × K = 2
    for p in pairs:
        s = samples[(p["prompt_id"], p["rejected_index"])]
        assert s["source"] == "policy" and "score" not in s and "chosen_score" not in p
        assert p["chosen"] == targets[p["prompt_id"]]
        _, text = render_prompt_response(tokenizer, p["prompt"], p["chosen"])
        assert p["chosen_ids"] == tokenizer(text, add_special_tokens=False)["input_ids"]
        assert p["rejected"] == s["response"] and p["rejected_ids"] == s["response_ids"]
        assert p["prompt_ids"] == s["prompt_ids"]
    assert stages["iter_1/pair"]["pairing"]["online_pairs"] == 12
    assert json.loads((d / "eval.json").read_text())["win_rate"] is not None


def test_spin_target_may_be_a_conversation_that_starts_with_the_prompt():
    from prefloop.prompts import target_text

    prompt = [{"role": "user", "content": "hi"}]
    chat = [*prompt, {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "more"}, {"role": "assistant", "content": "no"}]
    assert target_text(prompt, chat, "f", 0, "messages") == "hello"
    assert target_text("hi", chat, "f", 0, "messages") == "hello"
    assert target_text(prompt, "plain", "f", 0, "t") == "plain"
    with pytest.raises(PrefloopError, match="row 4, field 'messages'"):
        target_text(prompt, prompt, "f", 3, "messages")


# ---------------------------------------------------------------- SPPO


def test_sppo_win_probabilities_match_hand_computed_values():
    # P̂_i = mean_{j≠i} σ(s_i − s_j); scores 0, 1, 3:
    #   P̂(3) = (σ(3) + σ(2))/2 = (0.9525741268 + 0.8807970780)/2 = 0.9166856024
    #   P̂(1) = (σ(1) + σ(−2))/2 = (0.7310585786 + 0.1192029220)/2 = 0.4251307503
    #   P̂(0) = (σ(−1) + σ(−3))/2 = (0.2689414214 + 0.0474258732)/2 = 0.1581836473
    soft = win_probabilities([0.0, 1.0, 3.0])
    assert soft == pytest.approx([0.1581836473, 0.4251307503, 0.9166856024], abs=1e-9)
    assert sum(soft) == pytest.approx(1.5)  # Σ P̂ = K/2
    # hard: 1[s_i > s_j] + ½·1[s_i = s_j]; scores 1, 1, 0 → (½+1)/2, (½+1)/2, 0
    assert win_probabilities([1.0, 1.0, 0.0], "hard") == [0.75, 0.75, 0.0]

    pairs, _ = make_pairs(prompt_rows("p", [0.0, 1.0, 3.0]), PairingConfig(strategy="sppo"))
    (pair,) = pairs
    assert (pair["chosen_index"], pair["rejected_index"]) == (2, 0)
    assert pair["chosen_target"] == pytest.approx(0.9166856024, abs=1e-9)
    assert pair["rejected_target"] == pytest.approx(0.1581836473, abs=1e-9)
    hard, _ = make_pairs(prompt_rows("p", [0.0, 1.0, 3.0]),
                         PairingConfig(strategy="sppo", win_probability="hard"))
    assert (hard[0]["chosen_target"], hard[0]["rejected_target"]) == (1.0, 0.0)


def test_sppo_loop_trains_on_targets_from_the_iterations_scores(world, tmp_path):
    run_dir = tmp_path / "sppo"
    run(config(world, run_dir, "pairing.strategy=sppo", "loss.name=sppo"), progress=False)
    d = run_dir / "iter_1"
    scored = by_prompt(read_jsonl(d / "scored.jsonl"))
    pairs = read_jsonl(d / "pairs.jsonl")
    assert pairs
    for p in pairs:
        p_hat = win_probabilities([r["score"] for r in scored[p["prompt_id"]]])
        assert p["chosen_target"] == pytest.approx(p_hat[p["chosen_index"]], abs=1e-12)
        assert p["rejected_target"] == pytest.approx(p_hat[p["rejected_index"]], abs=1e-12)
        assert p["chosen_target"] == max(p_hat) and p["rejected_target"] == min(p_hat)
    assert manifest(run_dir)["stages"]["iter_1/train"]["status"] == "done"


# ---------------------------------------------------------------- XPO


def test_xpo_reference_samples_come_from_the_reference_model(world, tmp_path):
    from prefloop.config import SamplingConfig
    from prefloop.workers import sample_prompts

    run_dir = tmp_path / "xpo"
    cfg = config(world, run_dir, "pairing.strategy=xpo", "loss.name=xpo", "loss.alpha=1e-3",
                 "reference=initial", "iterations=2", "sampling.num_samples=2")
    run(cfg, progress=False)
    stages = manifest(run_dir)["stages"]
    t = 2  # π₁ samples y, the reference π₀ samples ỹ
    d = run_dir / f"iter_{t}"
    assert stages[f"iter_{t}/sample"]["reference"] == str(world / "policy")
    rows = read_jsonl(d / "samples.jsonl")
    prompts = iteration_prompts(load_prompts(cfg.prompts), cfg.prompts, t, cfg.iterations)
    sampling = SamplingConfig(**{**vars(cfg.sampling), "seed": cfg.sampling.seed + 1000 * t})
    expected_ref = sample_prompts(str(world / "policy"), prompts, reference_sampling(sampling, 1))
    expected_pol = sample_prompts(str(run_dir / "iter_1" / "policy"), prompts, sampling)
    ref_rows = [r for r in rows if r["source"] == "reference"]
    pol_rows = [r for r in rows if r["source"] == "policy"]
    assert len(ref_rows) == 6 and len(pol_rows) == 12
    for got, want in zip(ref_rows, expected_ref, strict=True):
        assert got["prompt_id"] == want["prompt_id"] and got["sample_index"] == 2
        assert got["response_ids"] == want["response_ids"] and got["logprob"] == want["logprob"]
    assert [r["response_ids"] for r in pol_rows] == [r["response_ids"] for r in expected_pol]

    scored = {(r["prompt_id"], r["sample_index"]): r for r in read_jsonl(d / "scored.jsonl")}
    pairs = read_jsonl(d / "pairs.jsonl")
    stats = stages[f"iter_{t}/pair"]["pairing"]
    assert stats["online_pairs"] + stats["ties_dropped"] == 12  # each y against the one ỹ
    for p in pairs:
        chosen = scored[(p["prompt_id"], p["chosen_index"])]
        rejected = scored[(p["prompt_id"], p["rejected_index"])]
        assert {chosen["source"], rejected["source"]} == {"policy", "reference"}
        assert chosen["score"] > rejected["score"]
        side = "chosen" if chosen["source"] == "reference" else "rejected"
        assert p["reference_sample"] == side
    assert stages[f"iter_{t}/train"]["status"] == "done"


def test_merge_reference_samples_renumbers_after_the_policys():
    policy = [{"prompt_id": p, "sample_index": i} for p in ("a", "b") for i in range(2)]
    reference = [{"prompt_id": p, "sample_index": 0} for p in ("a", "b")]
    merged = merge_reference_samples(policy, reference)
    assert [(r["prompt_id"], r["sample_index"], r["source"]) for r in merged] == [
        ("a", 0, "policy"), ("a", 1, "policy"), ("a", 2, "reference"),
        ("b", 0, "policy"), ("b", 1, "policy"), ("b", 2, "reference"),
    ]


def test_xpo_pairing_needs_one_reference_sample_per_prompt():
    rows = prompt_rows("p", [0.0, 1.0])
    with pytest.raises(ValueError, match="exactly one"):
        make_pairs(rows, PairingConfig(strategy="xpo"))
    rows = [sample("p", 0, 1.0, source="policy"), sample("p", 1, 0.5, source="policy"),
            sample("p", 2, 2.0, source="reference")]
    pairs, _ = make_pairs(rows, PairingConfig(strategy="xpo"))
    assert [(p["chosen_index"], p["rejected_index"], p["reference_sample"]) for p in pairs] == [
        (2, 0, "chosen"), (2, 1, "chosen")]


# ---------------------------------------------------------------- DICE


def test_dice_auto_alpha_brings_the_length_gap_to_zero():
    # implicit rewards that grow with length (the bias DICE removes) plus noise
    rng = random.Random(0)
    rows = []
    for p in range(60):
        for i in range(8):
            tokens = rng.randint(5, 80)
            rows.append(sample(f"p{p}", i, 0.05 * tokens + rng.gauss(0, 0.5), tokens=tokens))
    raw, _ = make_pairs(rows, PairingConfig())
    _, stats = make_pairs(rows, PairingConfig(length_penalty="auto"))
    gap_raw = sum(p["chosen_tokens"] - p["rejected_tokens"] for p in raw) / len(raw)
    assert gap_raw > 15 and stats.alpha > 0
    assert abs(stats.mean_length_gap) < 0.05 * gap_raw  # ≈ 0: the sweep's best α


def test_iteration_reward_uses_the_policy_and_its_own_reference():
    from prefloop.config import RewardConfig

    reward = RewardConfig(type="implicit", model="pi0", reference="sft")

    run_dir = RunDir("r", initial_policy="pi0")
    pi = {run_dir.policy_path(t): f"pi{t}" for t in range(4)} | {"sft": "sft"}
    pick = [(pi[iteration_reward(reward, t, run_dir, mode).model],
             pi[iteration_reward(reward, t, run_dir, mode).reference])
            for mode in ("previous", "initial") for t in (1, 2, 3)]
    assert pick == [("pi0", "sft"), ("pi1", "pi0"), ("pi2", "pi1"),
                    ("pi0", "sft"), ("pi1", "pi0"), ("pi2", "pi0")]
    model = RewardConfig(type="model", model="rm")
    assert iteration_reward(model, 2, run_dir, "previous") is model


def test_dice_loop_scores_with_the_implicit_reward_and_shapes_pairs(world, tmp_path):
    from prefloop.rewards import ImplicitRewardScorer

    run_dir = tmp_path / "dice"
    run(config(world, run_dir, "reward.type=implicit", f"reward.model={world / 'policy'}",
               f"reward.reference={world / 'sft_reference'}", "reward.beta=0.5",
               "sampling.num_samples=4", "pairing.length_penalty=auto",
               "pairing.length_unit=chars", "pairing.auto_alpha_step=0.01",
               "pairing.replay_fraction=0.5", f"replay_data={world / 'offline.jsonl'}",
               "loss.name=dpo"), progress=False)
    stages = manifest(run_dir)["stages"]
    assert stages["iter_1/score"]["implicit_reward"] == {
        "model": str(world / "policy"), "reference": str(world / "sft_reference")}
    d = run_dir / "iter_1"
    scored = read_jsonl(d / "scored.jsonl")
    scorer = ImplicitRewardScorer(str(world / "policy"), str(world / "sft_reference"), beta=0.5)
    expected = scorer.score([r["prompt"] for r in scored], [r["response"] for r in scored])
    assert [r["score"] for r in scored] == pytest.approx(expected, abs=1e-6)
    stats = stages["iter_1/pair"]["pairing"]
    options = PairingConfig(length_penalty="auto", length_unit="chars", auto_alpha_step=0.01)
    assert stats["alpha"] == auto_length_penalty(group_by_prompt(scored), options)
    _, unshaped = make_pairs(scored, PairingConfig(length_unit="chars"))
    assert abs(stats["mean_length_gap"]) <= abs(unshaped.mean_length_gap)
    assert stats["replay_pairs"] == stats["online_pairs"] > 0
    assert stages["iter_1/train"]["status"] == "done"


# ---------------------------------------------------------------- RSO


class ScriptedDraws:
    """A stand-in for random.Random whose uniform draws are given in advance."""

    def __init__(self, draws):
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def test_rejection_sampling_exact_scripted_case():
    # rewards 0, 1, 2 and β = 1: pass 1 has r_max = 2, p = e^−2 = 0.135, e^−1 = 0.368, 1
    #   u = 0.5 ≥ 0.135 rejects 0; u = 0.2 < 0.368 accepts 1; M = 2 not yet reached;
    #   u = 0.99 < 1 accepts 2 → done, no further draws
    draws = ScriptedDraws([0.5, 0.2, 0.99, 0.0])
    assert rejection_sample([0.0, 1.0, 2.0], 1.0, 2, draws) == [1, 2]
    assert draws.draws == [0.0]
    # pass 1 (3 draws) accepts only the best; pass 2's r_max is 1: candidate 0 has
    # p = e^−1 < 0.9 (rejected again), candidate 1 has p = 1 (accepted)
    draws = ScriptedDraws([0.9] * 5)
    assert rejection_sample([0.0, 1.0, 2.0], 1.0, 2, draws) == [2, 1]
    assert draws.draws == []
    # fewer candidates than M: all accepted, in acceptance order
    assert sorted(rejection_sample([3.0, -3.0], 0.1, 5, random.Random(0))) == [0, 1]


def test_rejection_sampling_accepts_with_probability_exp_gap_over_beta():
    # two candidates, the worse first, M = 1: the worse is the one accepted iff its first
    # draw passes, i.e. with probability exp((r_low − r_max)/β)
    for r_low, beta in ((0.0, 1.0), (-1.0, 2.0), (0.5, 0.25)):
        p = math.exp((r_low - 1.0) / beta)
        n = 4000
        hits = sum(rejection_sample([r_low, 1.0], beta, 1, random.Random(seed)) == [0]
                   for seed in range(n))
        assert abs(hits / n - p) < 4 * math.sqrt(p * (1 - p) / n), (r_low, beta)


def test_rejection_sampling_in_pairing_is_seeded_counted_and_pairs_only_accepted():
    rows = [r for p in range(5) for r in prompt_rows(f"p{p}", [0.1 * i * (p + 1)
                                                               for i in range(6)])]
    options = PairingConfig(strategy="all_pairs", seed=3,
                            rejection_sampling={"enabled": True, "beta": 0.2,
                                                "num_accepted": 3})
    pairs, stats = make_pairs(rows, options)
    assert (stats.rso_accepted, stats.rso_rejected) == (15, 15)
    groups = group_by_prompt(rows)
    for pid, samples in groups.items():
        rng = random.Random(_stable_seed(3, "\x00rso\x00" + pid))
        accepted = set(rejection_sample([s["score"] for s in samples], 0.2, 3, rng))
        mine = [p for p in pairs if p["prompt_id"] == pid]
        assert {p["chosen_index"] for p in mine} | {p["rejected_index"] for p in mine} <= accepted
        assert len(mine) == 3  # C(3, 2) pairs of the accepted (no ties here)
    again, _ = make_pairs(rows, options)
    assert again == pairs


def test_rso_loop_filters_candidates_before_pairing(world, tmp_path):
    run_dir = tmp_path / "rso"
    run(config(world, run_dir, "sampling.num_samples=4", "pairing.strategy=all_pairs",
               "pairing.rejection_sampling.enabled=true", "pairing.rejection_sampling.beta=0.05",
               "pairing.rejection_sampling.num_accepted=2", "loss.name=hinge"), progress=False)
    stats = manifest(run_dir)["stages"]["iter_1/pair"]["pairing"]
    assert (stats["rso_accepted"], stats["rso_rejected"]) == (12, 12)  # 6 prompts × (2, 2)
    assert stats["online_pairs"] + stats["ties_dropped"] == 6  # C(2, 2) per prompt


# ---------------------------------------------------------------- options that do not apply


@pytest.mark.parametrize(("extra", "message"), [
    (["loss.name=sppo"], "pairing.strategy: sppo"),
    (["pairing.strategy=sppo", "loss.name=dpo"], "win-probability targets"),
    (["loss.name=xpo"], "pairing.strategy: xpo"),
    (["prompts.target_column=completion"], "only pairing.strategy spin"),
    (["pairing.strategy=spin"], "prompts.target_column"),
    (["reward.type=none"], "nothing to score"),
    (["pairing.strategy=spin", "prompts.target_column=completion", "pairing.min_margin=0.5"],
     "pairs without scores"),
    (["pairing.strategy=xpo", "pairing.rejection_sampling.enabled=true"], "does not apply"),
    (["pairing.rejection_sampling.num_accepted=1"], "≥ 2"),
    (["pairing.win_probability=hard"], "only strategy sppo"),
    (["reward.type=implicit", "reward.reference=x"], "set reward.model to policy"),
    (["pairing.strategy=sppo", "loss.name=sppo", "pairing.replay_fraction=0.5",
      "replay_data=x.jsonl"], "carry no win-probability targets"),
])
def test_options_that_do_not_apply_are_refused(world, tmp_path, extra, message):
    with pytest.raises(PrefloopError, match=message):
        config(world, tmp_path / "run", *extra)


# ---------------------------------------------------------------- self-refinement in the loop


def test_loop_refinement_selected_by_reward_uses_the_runs_reward(world, tmp_path):
    run_dir = tmp_path / "refine"
    run(config(world, run_dir, "reward.type=function", "reward.model=",
               "reward.function=tests.reward_functions:length_and_letters",
               "sampling.refine.rounds=1", "sampling.refine.select=reward",
               f"eval.prompts.path={world / 'eval.jsonl'}"), progress=False)
    samples = read_jsonl(run_dir / "iter_1" / "samples.jsonl")
    scored = read_jsonl(run_dir / "iter_1" / "scored.jsonl")
    assert samples and all(r["refine_rounds"] == 1 for r in samples)
    for row, judged in zip(samples, scored, strict=True):
        scores = [c["score"] for c in row["refinements"]]
        assert row["refine_pick"] == scores.index(max(scores))  # the run's reward picked it
        assert row["response"] == row["refinements"][row["refine_pick"]]["response"]
        assert judged["score"] == pytest.approx(max(scores))  # and scored it the same way
    # evaluation samples are never refined by the judge that then scores them
    assert all("refine_pick" not in r
               for r in read_jsonl(run_dir / "iter_1" / "eval_samples.jsonl"))
