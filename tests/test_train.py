"""`prefloop train` end to end on tiny local models (Llama, Qwen2, GPT-2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefloop.config import TrainConfig, load_config
from prefloop.data import load_preferences, tokenize_pairs
from prefloop.logprobs import LAYOUTS, ResponseLogProbs, collate_pairs, sum_by_sequence
from prefloop.losses import LOSSES
from prefloop.trainer import pair_logps_no_grad, train_preferences
from tests.conftest import mixed_length_pairs, write_jsonl


def _config(model: str, data: str, out: Path, *extra: str) -> TrainConfig:
    return load_config(TrainConfig, None, [
        f"model={model}", f"data.path={data}", f"output_dir={out}", "training.lr=2e-3",
        "training.batch_size=8", "training.warmup_ratio=0", *extra,
    ])


def _implicit_accuracy(model_dir: str, ref_dir: str, data: str, tokenizer) -> float:
    from transformers import AutoModelForCausalLM

    pairs, _ = tokenize_pairs(load_preferences(data), tokenizer)
    pad = tokenizer.pad_token_id
    pol = pair_logps_no_grad(AutoModelForCausalLM.from_pretrained(model_dir), pairs, pad,
                             "shared_prompt", 16)
    ref = pair_logps_no_grad(AutoModelForCausalLM.from_pretrained(ref_dir), pairs, pad,
                             "shared_prompt", 16)
    margin = (pol[0] - ref[0]) - (pol[1] - ref[1])
    return (margin > 0).float().mean().item()


@pytest.mark.parametrize("arch,chat", [("llama", True), ("qwen2", False)])
def test_training_lowers_loss_and_raises_preference_accuracy(
    arch, chat, model_dir, pref_file, tokenizer, tmp_path
):
    data = pref_file(48, chat=chat)
    cfg = _config(model_dir(arch, "micro"), data, tmp_path / "out", "loss.name=dpo",
                  "training.epochs=6", "training.group_by_length=false")
    result = train_preferences(cfg, progress=False)
    per_epoch = len(result.log) // 6
    first = sum(r["loss"] for r in result.log[:per_epoch]) / per_epoch
    last = sum(r["loss"] for r in result.log[-per_epoch:]) / per_epoch
    assert last < first - 0.05, (first, last)
    # accuracy of the implicit reward of the trained policy against its start
    assert _implicit_accuracy(str(result.output_dir), model_dir(arch, "micro"), data,
                              tokenizer) >= 0.7  # chance is 0.5


def _rows_with_extras(n: int) -> list[dict]:
    from prefloop.tiny import synthetic_preferences

    rows = synthetic_preferences(n, seed=3)
    for i, row in enumerate(rows):
        row["chosen_target"] = 0.7 + 0.01 * (i % 5)
        row["rejected_target"] = 0.3 - 0.01 * (i % 5)
        row["reference_sample"] = "chosen" if i % 2 else "rejected"
    return rows


@pytest.mark.parametrize("loss", sorted(LOSSES))
def test_every_registered_loss_runs_a_training_step(loss, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "p.jsonl", _rows_with_extras(8))
    extra = ["training.max_steps=1", f"loss.name={loss}", "training.lr=1e-2"]
    if "teacher" in LOSSES[loss].needs:
        extra.append(f"teacher={model_dir('llama', 'micro')}")
    base = model_dir("llama", "micro")
    result = train_preferences(_config(base, data, tmp_path / "out", *extra), progress=False)
    assert result.steps == 1 and result.pairs_seen == 8
    assert all(torch.isfinite(torch.tensor(v)) for v in result.log[0].values())
    trained = AutoModelForCausalLM.from_pretrained(result.output_dir)
    start = AutoModelForCausalLM.from_pretrained(base)
    changed = any(not torch.equal(a, b) for a, b in
                  zip(trained.state_dict().values(), start.state_dict().values(), strict=True))
    assert changed, f"{loss}: one optimizer step left every weight unchanged"


def test_output_directory_reloads_and_generates(model_dir, pref_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = train_preferences(
        _config(model_dir("gpt2"), pref_file(16), tmp_path / "out", "training.max_steps=2"),
        progress=False,
    )
    out = result.output_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "train_log.jsonl", "train_summary.json",
            "tokenizer.json", "train_config.yaml"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "chosen_logps",
                "rejected_logps", "chosen_length", "rejected_length", "lr", "grad_norm"):
        assert key in log[0]
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = tok("What is 2 plus 3?\n", return_tensors="pt").input_ids
    generated = model.generate(ids, max_new_tokens=5, do_sample=False,
                               pad_token_id=tok.pad_token_id)
    assert generated.shape[1] > ids.shape[1]
    assert not list(tmp_path.glob(".out.partial"))


def test_lora_trains_few_parameters_and_exports_a_merged_model(model_dir, pref_file, tmp_path):
    from transformers import AutoModelForCausalLM

    result = train_preferences(
        _config(model_dir("qwen2", "micro"), pref_file(16), tmp_path / "out",
                "training.max_steps=2", "training.lora.enabled=true", "training.lora.r=4",
                "training.lr=1e-2"),
        progress=False,
    )
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["trainable_parameters"] < summary["total_parameters"] / 4
    assert not (result.output_dir / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(result.output_dir)
    start = AutoModelForCausalLM.from_pretrained(model_dir("qwen2", "micro"))
    assert set(merged.state_dict()) == set(start.state_dict())
    assert any(not torch.equal(merged.state_dict()[k], v) for k, v in start.state_dict().items())


def test_auto_alpha_trains_with_the_length_neutral_alpha_of_the_pairs(model_dir, tokenizer,
                                                                       tmp_path, monkeypatch):
    from prefloop.losses import length_neutral_alpha

    # winners longer by several words in 9 pairs of 12, shorter in the other 3
    data = write_jsonl(tmp_path / "prefs.jsonl", mixed_length_pairs(12))
    pairs, _ = tokenize_pairs(load_preferences(data), tokenizer)
    gaps = torch.tensor([float(len(p.chosen_ids) - len(p.rejected_ids)) for p in pairs])
    assert (gaps > 0).sum() == 9 and (gaps < 0).sum() == 3
    expected = length_neutral_alpha(gaps)
    assert expected > 0
    import prefloop.trainer

    used = []
    compute_loss = prefloop.trainer.compute_loss

    def spy(name, logps, **params):
        used.append(params)
        return compute_loss(name, logps, **params)

    monkeypatch.setattr(prefloop.trainer, "compute_loss", spy)
    result = train_preferences(
        _config(model_dir("llama"), data, tmp_path / "out", "loss.name=lr_dpo",
                "loss.auto_alpha=true", "training.max_steps=2"),
        progress=False,
    )
    # every step trained with it, and the records say so (β: the loss's default)
    assert used and all(p["alpha"] == pytest.approx(expected, rel=1e-9) for p in used)
    summary = json.loads((result.output_dir / "train_summary.json").read_text())
    assert summary["loss_params"] == pytest.approx({"beta": 0.1, "alpha": expected, "lam": 5.0},
                                                   rel=1e-9)
    assert result.loss_params == summary["loss_params"]


def test_null_unsets_a_loss_parameter_and_auto_alpha_is_part_of_the_hash(tmp_path):
    from prefloop.config import config_hash, dump_yaml, to_dict

    cfg = _config("m", "d.jsonl", tmp_path / "out", "loss.name=lr_dpo", "loss.alpha=0.05")
    assert cfg.loss.params == {"alpha": 0.05}
    unset = _config("m", "d.jsonl", tmp_path / "out", "loss.name=lr_dpo", "loss.alpha=0.05",
                    "loss.alpha=null")
    assert unset.loss.params == {}
    # every option is written (a run recorded before an option existed resumes while the
    # option keeps its default: loop.rundir.config_changes, tested in test_loop)
    assert to_dict(cfg)["loss"]["auto_alpha"] is False and "auto_alpha: false" in dump_yaml(cfg)
    auto = _config("m", "d.jsonl", tmp_path / "out", "loss.name=lr_dpo",
                   "loss.auto_alpha=true")
    assert to_dict(auto)["loss"]["auto_alpha"] is True
    assert config_hash(auto) != config_hash(unset)


def test_a_wrong_value_for_an_optional_section_is_refused(tmp_path):
    from prefloop.errors import PrefloopError
    from prefloop.loop import load_run_config

    with pytest.raises(PrefloopError, match=r"eval\.reward: 5 does not match"):
        load_run_config(None, ["policy=p", "prompts.path=x.jsonl", "eval.reward=5"])


@pytest.mark.parametrize("overrides,message", [
    (["loss.name=dpo", "loss.auto_alpha=true"], "only for lr_dpo"),
    (["loss.name=lr_dpo", "loss.auto_alpha=true", "loss.alpha=0.05"], "drop loss.alpha"),
])
def test_auto_alpha_misuse_is_refused(overrides, message, tmp_path):
    from prefloop.errors import PrefloopError

    with pytest.raises(PrefloopError, match=message):
        _config("m", "d.jsonl", tmp_path / "out", *overrides).validate()


def test_auto_alpha_without_a_shorter_winner_names_the_fix(model_dir, tmp_path, monkeypatch):
    import prefloop.trainer
    from prefloop.errors import PrefloopError

    monkeypatch.setattr(prefloop.trainer, "load_causal_lm",
                        lambda *a, **k: pytest.fail("loaded weights before checking the data"))

    rows = [{"prompt": f"Question {i}?", "chosen": "a long and careful answer " * 2,
             "rejected": "short"} for i in range(8)]
    data = write_jsonl(tmp_path / "longer.jsonl", rows)
    with pytest.raises(PrefloopError, match=r"loss\.auto_alpha: .*set loss\.alpha instead"):
        train_preferences(_config(model_dir("llama"), data, tmp_path / "out",
                                  "loss.name=lr_dpo", "loss.auto_alpha=true",
                                  "training.max_steps=1"), progress=False)
    assert not (tmp_path / "out").exists()


def test_bf16_mixed_precision_step_on_cpu(model_dir, pref_file, tmp_path):
    result = train_preferences(
        _config(model_dir("llama"), pref_file(8), tmp_path / "out", "training.max_steps=1",
                "training.precision=bf16"),
        progress=False,
    )
    assert torch.isfinite(torch.tensor(result.log[0]["loss"]))


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_shared_prompt_layout_matches_padded_and_naive_log_probs(arch, model_dir, tokenizer,
                                                                 pref_file):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir(arch)).eval()
    pairs, _ = tokenize_pairs(load_preferences(pref_file(6, chat=True)), tokenizer)
    results = {}
    for layout in LAYOUTS:
        batch = collate_pairs(pairs, tokenizer.pad_token_id, layout)
        with torch.no_grad():
            results[layout] = sum_by_sequence(ResponseLogProbs(model)(batch), batch)
    naive = []
    for which in ("chosen_ids", "rejected_ids"):
        for p in pairs:
            response = getattr(p, which)
            ids = torch.tensor([p.prompt_ids + response])
            with torch.no_grad():
                logp = model(ids).logits[0].log_softmax(-1)
            n = len(p.prompt_ids)
            naive.append(sum(logp[n - 1 + k, t].item() for k, t in enumerate(response)))
    naive = torch.tensor(naive)
    torch.testing.assert_close(results["shared_prompt"], naive, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(results["padded"], naive, atol=1e-4, rtol=1e-5)


def test_reference_log_probs_are_computed_once(model_dir, pref_file, tmp_path, monkeypatch):
    import prefloop.trainer as trainer

    calls = []
    original = trainer.pair_logps_no_grad
    monkeypatch.setattr(trainer, "pair_logps_no_grad",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    train_preferences(_config(model_dir("llama"), pref_file(16), tmp_path / "out",
                              "training.epochs=3", "loss.name=dpo"), progress=False)
    assert len(calls) == 1
    calls.clear()
    train_preferences(_config(model_dir("llama"), pref_file(16), tmp_path / "out2",
                              "training.max_steps=2", "loss.name=simpo"), progress=False)
    assert calls == []  # reference-free: no reference pass at all


def test_truncation_is_counted_never_silent(tokenizer, pref_file):
    examples = load_preferences(pref_file(20))
    full, stats = tokenize_pairs(examples, tokenizer, max_length=10_000, max_prompt_length=5_000)
    assert stats.as_dict()["responses_truncated"] == 0 and len(full) == 20
    cut, stats = tokenize_pairs(examples, tokenizer, max_length=20, max_prompt_length=6)
    assert len(cut) == 20
    assert stats.prompts_truncated + stats.responses_truncated > 0
    assert all(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) <= 20 for p in cut)
    kept, stats = tokenize_pairs(examples, tokenizer, max_length=40, max_prompt_length=20,
                                 truncation="skip")
    assert len(kept) + stats.skipped == 20 and stats.skipped == len(stats.skipped_rows)


def test_distributed_two_processes_match_one_process(model_dir, pref_file, tmp_path):
    """2 CPU processes (gloo) × 4 pairs reproduce 1 process × 8 pairs; tolerance 1e-5."""
    args = [f"model={model_dir('llama')}", f"data.path={pref_file(40)}", "training.lr=1e-3",
            "training.max_steps=5", "loss.name=lr_dpo", "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "prefloop", "train", *args,
                    f"output_dir={tmp_path / 'one'}", "training.batch_size=8"],
                   check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "prefloop", "train"]
    proc = subprocess.run([*launch, *args, f"output_dir={tmp_path / 'two'}",
                           "training.batch_size=4"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = [json.loads(x) for x in (tmp_path / "one" / "train_log.jsonl").read_text().split("\n")
           if x]
    two = [json.loads(x) for x in (tmp_path / "two" / "train_log.jsonl").read_text().split("\n")
           if x]
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["processes"] == 2
    assert [r["pairs"] for r in one] == [r["pairs"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["margin"] - b["margin"]) < 1e-5


def test_train_log_records_the_learning_rate_each_step_used(model_dir, pref_file, tmp_path):
    """The rate was read after the scheduler moved: 0.0 on the last step of a linear
    schedule and no warm-up visible on the first."""
    result = train_preferences(
        _config(model_dir("llama"), pref_file(16), tmp_path / "out", "training.max_steps=4",
                "training.warmup_ratio=0.5", "training.lr=1e-3"), progress=False)
    # linear warm-up over 2 steps from 0, then linear decay to 0 after the 4th step
    assert [r["lr"] for r in result.log] == pytest.approx([0.0, 5e-4, 1e-3, 5e-4])
