"""`prefloop distill`: teacher answers preferred to student answers, trained by daDPO/dDPO."""

from __future__ import annotations

import json

import pytest
import torch

from prefloop.cli import main
from prefloop.data import read_jsonl
from prefloop.distill import (
    DistillConfig,
    distill_pairs,
    student_sampling,
    train_config,
)
from prefloop.errors import PrefloopError
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    from prefloop.tiny import (
        build_causal_lm,
        save_pretrained_pair,
        synthetic_corpus,
        synthetic_preferences,
        train_tokenizer,
    )

    d = tmp_path_factory.mktemp("distill")
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "nano", seed=0), tokenizer,
                         d / "student")
    save_pretrained_pair(build_causal_lm("llama", tokenizer, "micro", seed=1), tokenizer,
                         d / "teacher")
    other = train_tokenizer(synthetic_corpus(), vocab_size=300)
    save_pretrained_pair(build_causal_lm("llama", other, "nano"), other, d / "other_vocab")
    write_jsonl(d / "prompts.jsonl", [
        {"id": f"q{i}", "prompt": r["prompt"]}
        for i, r in enumerate(synthetic_preferences(3, seed=4, chat=True))
    ])
    return d


# ---------------------------------------------------------------- γ = 0 is dDPO, i.e. DPO


def test_dadpo_at_gamma_zero_is_dpo_bit_for_bit_on_losses():
    from prefloop.losses import PreferenceLogps, compute_loss

    g = torch.Generator().manual_seed(0)
    logps = PreferenceLogps(*(torch.randn(16, generator=g) * 20 for _ in range(2)))
    logps.ref_chosen, logps.ref_rejected = (torch.randn(16, generator=g) * 20 for _ in range(2))
    logps.teacher_chosen, logps.teacher_rejected = (torch.randn(16, generator=g) * 20
                                                    for _ in range(2))
    dadpo = compute_loss("dadpo", logps, beta=0.3, gamma=0.0)
    dpo = compute_loss("dpo", logps, beta=0.3)
    assert torch.equal(dadpo.losses, dpo.losses)
    assert not torch.equal(compute_loss("dadpo", logps, beta=0.3, gamma=0.5).losses, dpo.losses)


def test_dadpo_at_gamma_zero_trains_exactly_like_dpo(files, pref_file, tmp_path):
    from transformers import AutoModelForCausalLM

    from prefloop.config import DataConfig, LossConfig, TrainConfig, TrainingConfig
    from prefloop.trainer import train_preferences

    def train(name: str, loss: LossConfig, teacher: str = ""):
        cfg = TrainConfig(model=str(files / "student"), teacher=teacher,
                          output_dir=str(tmp_path / name),
                          data=DataConfig(path=pref_file(8)), loss=loss,
                          training=TrainingConfig(max_steps=2, batch_size=4, lr=1e-3,
                                                  warmup_ratio=0.0))
        result = train_preferences(cfg, progress=False)
        return [r["loss"] for r in result.log], \
            AutoModelForCausalLM.from_pretrained(tmp_path / name).state_dict()

    losses_a, weights_a = train("dadpo", LossConfig("dadpo", params={"beta": 0.1, "gamma": 0.0}),
                                teacher=str(files / "teacher"))
    losses_d, weights_d = train("dpo", LossConfig("dpo", params={"beta": 0.1}))
    assert losses_a == losses_d
    start = AutoModelForCausalLM.from_pretrained(files / "student").state_dict()
    assert not torch.equal(weights_d["model.norm.weight"], start["model.norm.weight"])
    for name, tensor in weights_d.items():
        assert torch.equal(weights_a[name], tensor), name


def test_gamma_zero_trains_dpo_without_a_teacher_pass():
    cfg = DistillConfig(student="s", teacher="t", gamma=0.0, beta=0.2)
    train = train_config(cfg, "out", "out/pairs.jsonl")
    assert (train.loss.name, train.loss.params, train.teacher) == ("dpo", {"beta": 0.2}, "")
    assert cfg.objective.startswith("dDPO")
    cfg.gamma = 0.5
    train = train_config(cfg, "out", "out/pairs.jsonl")
    assert (train.loss.name, train.teacher) == ("dadpo", "t")
    assert train.loss.params == {"beta": 0.2, "gamma": 0.5}


# ---------------------------------------------------------------- pairs


def sample_row(pid: str, index: int, response_ids: list[int], prompt_ids=(5, 6)) -> dict:
    return {"prompt_id": pid, "prompt": "x", "prompt_ids": list(prompt_ids),
            "sample_index": index, "response": str(response_ids),
            "response_ids": response_ids, "num_tokens": len(response_ids),
            "num_chars": len(str(response_ids)), "finish_reason": "eos"}


def test_pairs_are_teacher_sample_k_over_student_sample_k():
    teacher = [sample_row("a", 0, [1, 2]), sample_row("a", 1, [3]), sample_row("b", 0, [4])]
    student = [sample_row("a", 0, [9]), sample_row("a", 1, [3]), sample_row("b", 0, [7, 7])]
    pairs, stats = distill_pairs(teacher, student)
    assert [(p["prompt_id"], p["chosen_ids"], p["rejected_ids"]) for p in pairs] == [
        ("a", [1, 2], [9]), ("b", [4], [7, 7])]
    assert (stats.prompts, stats.pairs, stats.identical_dropped) == (2, 2, 1)
    assert all({"prompt_ids", "chosen", "rejected"} <= set(p) for p in pairs)
    with pytest.raises(PrefloopError, match="prompt 'a': the teacher and the student encode"):
        distill_pairs([sample_row("a", 0, [1], prompt_ids=(5,))], [sample_row("a", 0, [2])])


def test_cli_pairs_teacher_answers_with_student_answers_and_trains(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from prefloop.prompts import PromptsConfig, load_prompts
    from prefloop.workers import sample_prompts

    out = tmp_path / "distilled"
    assert main(["distill", "--student", str(files / "student"), "--teacher",
                 str(files / "teacher"), "--prompts", str(files / "prompts.jsonl"),
                 "-n", "2", "--max-new-tokens", "6", "--gamma", "0.5", "--out", str(out),
                 "prompts.id_column=id", "training.max_steps=1", "training.batch_size=2",
                 "training.lr=1e-3", "-q"]) == 0
    assert "daDPO (β=0.1, γ=0.5)" in capsys.readouterr().out

    # the pairs are exactly the teacher's samples (chosen) over the student's (rejected)
    cfg = DistillConfig(student=str(files / "student"), teacher=str(files / "teacher"))
    cfg.sampling.num_samples, cfg.sampling.max_new_tokens = 2, 6
    prompts = load_prompts(PromptsConfig(path=str(files / "prompts.jsonl"), id_column="id"))
    teacher = {(r["prompt_id"], r["sample_index"]): r
               for r in sample_prompts(cfg.teacher, prompts, cfg.sampling)}
    student = {(r["prompt_id"], r["sample_index"]): r
               for r in sample_prompts(cfg.student, prompts, student_sampling(cfg.sampling))}
    pairs = read_jsonl(out / "pairs.jsonl")
    summary = json.loads((out / "distill_summary.json").read_text())
    assert len(pairs) + summary["pairs"]["identical_dropped"] == 6 and pairs
    for p in pairs:
        key = (p["prompt_id"], p["chosen_index"])
        assert p["chosen_ids"] == teacher[key]["response_ids"]
        assert p["rejected_ids"] == student[key]["response_ids"]
        assert p["prompt_ids"] == teacher[key]["prompt_ids"]

    # one directory: a trained HF model with its pairs and logs; nothing left beside it
    assert summary["loss"] == "dadpo" and summary["steps"] == 1
    assert (out / "train_log.jsonl").is_file() and (out / "distill_config.yaml").is_file()
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    start = AutoModelForCausalLM.from_pretrained(files / "student").state_dict()
    assert not torch.equal(trained["model.norm.weight"], start["model.norm.weight"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["distilled"]


# ---------------------------------------------------------------- errors


def test_a_different_vocabulary_is_refused_before_sampling(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["distill", "--student", str(files / "student"), "--teacher",
                 str(files / "other_vocab"), "--prompts", str(files / "prompts.jsonl"),
                 "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "other_vocab: the teacher's vocabulary" in err and "student" in err
    assert not out.exists()


@pytest.mark.parametrize("changes, message", [
    ({"teacher": "s"}, "teacher: the same model as the student"),
    ({"gamma": -0.1}, "gamma: must be ≥ 0"),
    ({"prompts": {"path": "p.jsonl", "per_iteration": 4}}, "prompts.per_iteration: applies"),
    ({"sampling": {"refine": {"rounds": 1}}}, "sampling.refine: applies"),
    ({"prompts": {"path": ""}}, "prompts.path: required"),
    ({"output_dir": "s"}, "output_dir: s is an input model"),
])
def test_bad_config_is_refused(changes, message):
    from prefloop.config import from_dict

    raw = {"student": "s", "teacher": "t", "prompts": {"path": "p.jsonl"}, **changes}
    with pytest.raises(PrefloopError, match=message):
        from_dict(DistillConfig, raw).validate()
