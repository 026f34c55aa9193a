"""`prefloop reward-model`: Bradley–Terry training, held-out accuracy, scorer round trip."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from prefloop.config import load_config
from prefloop.data import preference_examples
from prefloop.errors import PrefloopError
from prefloop.reward_training import (
    RewardModelConfig,
    bradley_terry_loss,
    load_reward_backbone,
    pair_rewards,
    split_pairs,
    tokenize_reward_pairs,
    train_reward_model,
)
from prefloop.rewards import RewardModelScorer
from prefloop.tiny import _FILLER, synthetic_preferences
from tests.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(model: str, out: Path, *extra: str) -> RewardModelConfig:
    return load_config(RewardModelConfig, None, [
        f"model={model}", f"output_dir={out}", "training.lr=1e-3", "training.batch_size=16",
        "training.warmup_ratio=0", *extra,
    ])


def _addition_pairs(n: int, seed: int = 0, max_operand: int = 3) -> list[dict]:
    """Correct vs wrong sums that differ only in the answer (same filler on both sides).

    Operands stay small so that held-out pairs ask questions a tiny model has seen: with
    tiny.synthetic_preferences' 0..49 a nano/micro RM stays at chance in CPU-test time."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        wrong = a + b + rng.choice([-2, -1, 1, 2])
        filler = " ".join(rng.sample(_FILLER, rng.randint(0, 3)))
        filler = filler + " " if filler else ""
        rows.append({"prompt": f"What is {a} plus {b}?\n",
                     "chosen": f"{filler}{a} plus {b} is {a + b}.",
                     "rejected": f"{filler}{a} plus {b} is {wrong}."})
    return rows


def test_bradley_terry_loss_by_hand():
    r_w, r_l = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])
    # pair 0: margin  1 → −log σ(1)  = log(1 + e^−1) = 0.31326
    # pair 1: margin −2 → −log σ(−2) = log(1 + e^2)  = 2.12693
    expected = torch.tensor([math.log1p(math.exp(-1)), math.log1p(math.exp(2))])
    torch.testing.assert_close(bradley_terry_loss(r_w, r_l), expected)
    torch.testing.assert_close(expected, torch.tensor([0.31326, 2.12693]), atol=1e-5, rtol=0)
    # centring: + c·(r_w + r_l)² = 0.5·1² and 0.5·2²
    torch.testing.assert_close(bradley_terry_loss(r_w, r_l, center_coef=0.5),
                               expected + torch.tensor([0.5, 2.0]))
    # the gradient w.r.t. r_w is −σ(r_l − r_w)
    r_w.requires_grad_(True)
    bradley_terry_loss(r_w, r_l).sum().backward()
    torch.testing.assert_close(r_w.grad, -torch.sigmoid(r_l - r_w.detach()))


def test_held_out_accuracy_beats_chance_on_correct_vs_wrong(model_dir, tmp_path):
    cfg = _config(model_dir("llama", "micro"), tmp_path / "rm", "training.epochs=20",
                  "eval_fraction=0.25")
    result = train_reward_model(cfg, rows=_addition_pairs(240), progress=False)
    s = result.summary
    assert s["num_eval_pairs"] == 60 and s["num_train_pairs"] == 180 and s["head"] == "new"
    assert s["eval_accuracy"] >= 0.75, s  # chance is 0.5
    assert s["eval_margin"] > 0 and s["train_accuracy"] >= 0.75
    first, last = result.log[0], result.log[-1]
    assert last["loss"] < first["loss"]
    for key in ("loss", "accuracy", "margin", "lr", "grad_norm"):
        assert key in first
    saved = json.loads((result.output_dir / "train_summary.json").read_text())
    assert saved["eval_accuracy"] == s["eval_accuracy"]


def test_length_biased_labels_give_a_length_reward(model_dir, tmp_path):
    rows = []
    for r in synthetic_preferences(160, seed=5):
        if len(r["chosen"]) != len(r["rejected"]):
            longer, shorter = sorted((r["chosen"], r["rejected"]), key=len, reverse=True)
            rows.append({"prompt": r["prompt"], "chosen": longer, "rejected": shorter})
    data = write_jsonl(tmp_path / "biased.jsonl", rows)
    result = train_reward_model(_config(model_dir("llama", "micro"), tmp_path / "rm",
                                        f"data.path={data}", "training.epochs=4"),
                                progress=False)
    assert result.summary["eval_accuracy"] >= 0.8
    fresh = synthetic_preferences(40, seed=99)
    prompts = [r["prompt"] for r in fresh]
    responses = [r["chosen"] for r in fresh]
    scores = RewardModelScorer(str(result.output_dir)).score(prompts, responses)
    assert all(math.isfinite(x) for x in scores)
    rank = lambda xs: torch.tensor(xs).argsort().argsort().float()  # noqa: E731
    spearman = torch.corrcoef(torch.stack([rank(scores),
                                           rank([len(x) for x in responses])]))[0, 1]
    assert spearman > 0.6, spearman


def test_scorer_sees_the_training_text_for_chat_rows_and_existing_heads(
    model_dir, tokenizer, tmp_path
):
    """Start from a saved 1-label reward model (its head is kept, not replaced), train on chat
    rows, and check that RewardModelScorer gives the training code's rewards exactly."""
    from prefloop.tiny import build_reward_model, save_pretrained_pair

    start = save_pretrained_pair(build_reward_model("qwen2", tokenizer), tokenizer,
                                 tmp_path / "start")
    rows = synthetic_preferences(12, seed=7, chat=True)
    result = train_reward_model(_config(str(start), tmp_path / "rm", "training.max_steps=2",
                                        "eval_fraction=0"), rows=rows, progress=False)
    assert result.summary["head"] == "loaded" and result.summary["eval_accuracy"] is None
    scorer = RewardModelScorer(str(result.output_dir), batch_size=5)
    assert scorer.model.config.pad_token_id == tokenizer.pad_token_id
    pairs, _ = tokenize_reward_pairs(preference_examples(rows), scorer.tokenizer)
    chosen, rejected = pair_rewards(scorer.model, pairs, tokenizer.pad_token_id, batch_size=3)
    prompts = [r["prompt"] for r in rows]
    via_scorer = scorer.score(prompts * 2, [r["chosen"][0]["content"] for r in rows]
                              + [r["rejected"][0]["content"] for r in rows])
    torch.testing.assert_close(torch.tensor(via_scorer), torch.cat([chosen, rejected]),
                               atol=1e-5, rtol=1e-5)


def test_lora_reward_model_exports_a_merged_model_with_a_trained_head(model_dir, tokenizer,
                                                                     tmp_path):
    from accelerate.utils import set_seed
    from transformers import AutoModelForSequenceClassification

    result = train_reward_model(_config(model_dir("llama"), tmp_path / "rm",
                                        "training.max_steps=2", "training.lora.enabled=true",
                                        "training.lora.r=4", "eval_fraction=0"),
                                rows=_addition_pairs(16), progress=False)
    assert result.summary["trainable_parameters"] < result.summary["total_parameters"] / 2
    assert not (result.output_dir / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(result.output_dir)
    assert model.config.num_labels == 1
    assert not any("lora" in k or "modules_to_save" in k for k in model.state_dict())
    set_seed(0)  # training.seed: the same freshly initialised head training started from
    start, _ = load_reward_backbone(model_dir("llama"), tokenizer.pad_token_id)
    assert not torch.equal(model.score.weight, start.score.weight)  # the head was trained
    backbone = [k for k in start.state_dict() if k.endswith("q_proj.weight")]
    assert any(not torch.equal(model.state_dict()[k], start.state_dict()[k]) for k in backbone)


def test_bad_input_is_refused(model_dir, tokenizer, tmp_path):
    from prefloop.tiny import save_pretrained_pair

    rows = _addition_pairs(4)
    del rows[2]["rejected"]
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(PrefloopError, match=r"bad\.jsonl, line 3, field 'rejected'"):
        train_reward_model(_config(model_dir("llama"), tmp_path / "rm", f"data.path={data}"),
                           progress=False)
    assert not list(tmp_path.glob("*rm*"))
    from transformers import AutoModelForSequenceClassification

    from prefloop.tiny import model_config

    two = AutoModelForSequenceClassification.from_config(
        model_config("llama", len(tokenizer), num_labels=2))
    save_pretrained_pair(two, tokenizer, tmp_path / "two")
    with pytest.raises(PrefloopError, match="2 labels"):
        train_reward_model(_config(str(tmp_path / "two"), tmp_path / "rm"), rows=_addition_pairs(4),
                           progress=False)
    for bad, match in [("eval_fraction=1", "eval_fraction"), ("center_coef=-1", "center_coef"),
                       ("truncation=cut", "truncate, skip, error"),
                       ("training.layout=padded", "preference training only")]:
        with pytest.raises(PrefloopError, match=match):
            _config("m", tmp_path / "rm", bad)
    assert _config("m", tmp_path / "rm").training.lr == 1e-3
    assert load_config(RewardModelConfig, None, ["model=m"]).training.lr == 1e-5


def test_split_and_truncation(tokenizer):
    pairs, stats = tokenize_reward_pairs(preference_examples(_addition_pairs(20)), tokenizer)
    assert stats.prompts_truncated == 0
    train, held = split_pairs(pairs, 0.1, seed=0)
    assert len(held) == 2 and len(train) == 18
    assert split_pairs(pairs, 0.1, seed=0)[1] == held  # seeded
    assert {p.row for p in train} | {p.row for p in held} == set(range(20))
    cut, stats = tokenize_reward_pairs(preference_examples(_addition_pairs(20)), tokenizer,
                                       max_length=6)
    assert stats.prompts_truncated == 20
    # the end is kept, as RewardModelScorer keeps it
    assert all(p.chosen_ids == q.chosen_ids[-6:] for p, q in zip(cut, pairs, strict=True))
    with pytest.raises(PrefloopError, match="max_length=6"):
        tokenize_reward_pairs(preference_examples(_addition_pairs(2)), tokenizer, 6, "error")
