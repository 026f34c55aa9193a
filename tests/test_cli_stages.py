"""Each loop stage as a command on files: sample → score → pair → train, best-of-n, evaluate."""

from __future__ import annotations

import json

import pytest

from prefloop.cli import main
from prefloop.data import read_jsonl
from tests.conftest import write_jsonl


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    from prefloop.tiny import (
        build_causal_lm,
        build_reward_model,
        save_pretrained_pair,
        synthetic_preferences,
    )

    d = tmp_path_factory.mktemp("stages")
    save_pretrained_pair(build_causal_lm("qwen2", tokenizer, "micro"), tokenizer, d / "policy")
    save_pretrained_pair(build_reward_model("qwen2", tokenizer, "nano"), tokenizer, d / "rm")
    write_jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"]} for r in
                                      synthetic_preferences(6, seed=2, chat=True)])
    return d


def test_sample_score_pair_train_chain_on_files(files, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    samples, scored, pairs = tmp_path / "s.jsonl", tmp_path / "sc.jsonl", tmp_path / "p.jsonl"
    assert main(["sample", "--model", str(files / "policy"), "--prompts",
                 str(files / "prompts.jsonl"), "-n", "3", "--max-new-tokens", "12",
                 "--out", str(samples), "-q"]) == 0
    rows = read_jsonl(samples)
    assert len(rows) == 18 and {r["sample_index"] for r in rows} == {0, 1, 2}
    assert main(["score", str(samples), "--reward-model", str(files / "rm"),
                 "--out", str(scored), "-q"]) == 0
    assert all(isinstance(r["score"], float) for r in read_jsonl(scored))
    assert main(["pair", str(scored), "--length-penalty", "auto", "--out", str(pairs)]) == 0
    pair_rows = read_jsonl(pairs)
    assert pair_rows and all(p["chosen_score"] > p["rejected_score"] for p in pair_rows)
    out = tmp_path / "policy"
    assert main(["train", f"model={files / 'policy'}", f"data.path={pairs}",
                 f"output_dir={out}", "training.max_steps=1", "loss.name=lr_dpo", "-q"]) == 0
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert "pairs seen" in capsys.readouterr().out
    # a second run into the same directory is refused before anything is loaded, and the
    # first run's model is untouched; --overwrite replaces it
    weights = (out / "model.safetensors").read_bytes()
    again = ["train", f"model={files / 'policy'}", f"data.path={pairs}", f"output_dir={out}",
             "training.max_steps=1", "loss.name=lr_dpo", "training.lr=1e-2", "-q"]
    assert main(again) == 2
    assert f"output_dir: {out} exists and is not empty; pass --overwrite" in \
        capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == weights
    assert main([*again, "--overwrite"]) == 0
    assert (out / "model.safetensors").read_bytes() != weights


@pytest.mark.parametrize("command", ["sft", "reward-model"])
def test_sft_and_reward_model_refuse_a_non_empty_output_dir(command, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main([command, "model=nowhere", "data.path=nothing.jsonl", f"output_dir={out}"]) == 2
    assert "exists and is not empty; pass --overwrite" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_best_of_n_keeps_the_highest_scoring_sample(files, tmp_path):
    out = tmp_path / "best.jsonl"
    assert main(["best-of-n", "--model", str(files / "policy"), "--prompts",
                 str(files / "prompts.jsonl"), "-n", "4", "--max-new-tokens", "10",
                 "--reward-function", "tests.reward_functions:digits_and_brevity",
                 "--out", str(out), "-q"]) == 0
    best = read_jsonl(out)
    assert len(best) == 6
    from tests.reward_functions import digits_and_brevity

    samples = tmp_path / "all.jsonl"
    main(["sample", "--model", str(files / "policy"), "--prompts", str(files / "prompts.jsonl"),
          "-n", "4", "--max-new-tokens", "10", "--out", str(samples), "-q"])
    by_prompt: dict[str, list[float]] = {}
    for r in read_jsonl(samples):
        by_prompt.setdefault(r["prompt_id"], []).append(
            digits_and_brevity([r["prompt"]], [r["response"]])[0])
    for b in best:
        assert b["score"] == max(by_prompt[b["prompt_id"]])


def test_evaluate_two_response_files(files, tmp_path, capsys):
    a = [{"prompt_id": str(i), "prompt": "q", "response": "x" * (10 + i), "score": 1.0}
         for i in range(20)]
    b = [{"prompt_id": str(i), "prompt": "q", "response": "y" * 10, "score": 0.0}
         for i in range(20)]
    write_jsonl(tmp_path / "a.jsonl", a)
    write_jsonl(tmp_path / "b.jsonl", b)
    assert main(["evaluate", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]) == 0
    text = capsys.readouterr().out
    assert "length-controlled win rate" in text and "73.1" in text  # σ(1) = 0.731


def test_implicit_reward_scores_beta_times_log_ratio(files, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from prefloop.config import RewardConfig
    from prefloop.rewards import build_scorer

    policy = AutoModelForCausalLM.from_pretrained(files / "policy")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    policy.save_pretrained(tmp_path / "moved")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(files / "policy").save_pretrained(tmp_path / "moved")
    scorer = build_scorer(RewardConfig(type="implicit", model=str(tmp_path / "moved"),
                                       reference=str(files / "policy"), beta=0.5))
    prompts = [[{"role": "user", "content": "What is 1 plus 2?"}]] * 2
    scores = scorer.score(prompts, ["1 plus 2 is 3.", "I do not know."])
    assert all(s != 0.0 for s in scores)
    same = build_scorer(RewardConfig(type="implicit", model=str(files / "policy"),
                                     reference=str(files / "policy")))
    assert same.score(prompts, ["1 plus 2 is 3.", "no"]) == [0.0, 0.0]


def test_bad_input_is_one_line_with_nonzero_exit(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json}\n')
    assert main(["score", str(bad), "--reward-function", "tests.reward_functions:constant",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "line 2" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.jsonl").exists()
    nan = tmp_path / "ok.jsonl"
    write_jsonl(nan, [{"prompt": "a", "response": "b"}])
    assert main(["score", str(nan), "--reward-function", "tests.reward_functions:not_a_number",
                 "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err
    assert f"{nan}, line 1, field 'response'" in err and "nan (must be a finite number)" in err
    assert main(["train", "loss.name=nope", "model=x", "data.path=y"]) == 2
    assert "valid losses" in capsys.readouterr().err


def test_data_formats_parquet_and_dataset_dir(tmp_path, pref_file):
    import datasets

    from prefloop.data import load_preferences

    rows = read_jsonl(pref_file(10))
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    for source in (tmp_path / "p.parquet", tmp_path / "dsdir"):
        examples = load_preferences(str(source))
        assert [e.chosen for e in examples] == [r["chosen"] for r in rows]


def test_grad_accumulation_matches_a_bigger_batch(model_dir, pref_file, tmp_path):
    from prefloop.config import TrainConfig, load_config
    from prefloop.trainer import train_preferences

    def log(*extra):
        cfg = load_config(TrainConfig, None, [
            f"model={model_dir('llama')}", f"data.path={pref_file(32)}", "training.lr=1e-3",
            "training.max_steps=3", f"output_dir={tmp_path / '-'.join(extra)}", *extra])
        return train_preferences(cfg, progress=False).log

    big = log("training.batch_size=8")
    accumulated = log("training.batch_size=4", "training.grad_accum=2")
    for a, b in zip(big, accumulated, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5 and a["pairs"] == b["pairs"]
    assert json.dumps(big[0]["pairs"]) == "8"


def test_beam_search_and_greedy_sampling(files):
    from prefloop.config import SamplingConfig
    from prefloop.prompts import PromptsConfig, load_prompts
    from prefloop.workers import sample_prompts

    prompts = load_prompts(PromptsConfig(path=str(files / "prompts.jsonl")))[:2]
    policy = str(files / "policy")
    beams = sample_prompts(policy, prompts, SamplingConfig(num_samples=2, num_beams=3,
                                                           max_new_tokens=8))
    assert len(beams) == 4 and all(r["logprob"] is None for r in beams)
    assert beams[0]["response_ids"] != beams[1]["response_ids"]
    greedy = sample_prompts(policy, prompts, SamplingConfig(num_samples=3, temperature=0.0,
                                                            max_new_tokens=8))
    assert len(greedy) == 2  # greedy gives one answer per prompt, not three copies
    again = sample_prompts(policy, prompts, SamplingConfig(num_samples=1, temperature=0.0,
                                                           max_new_tokens=8))
    assert [r["response_ids"] for r in greedy] == [r["response_ids"] for r in again]


def test_evaluate_samples_from_two_models(files, capsys):
    prompts = str(files / "prompts.jsonl")
    policy = str(files / "policy")
    assert main(["evaluate", policy, policy, "--prompts", prompts, "--max-new-tokens", "8",
                 "--reward-model", str(files / "rm"), "-q"]) == 0
    text = capsys.readouterr().out
    # greedy samples of one model against itself: every prompt ties
    assert "50.0 ± 0.0" in text and "length-controlled win rate │ 50.0" in text
    assert main(["evaluate", policy, policy, "--reward-model", str(files / "rm")]) == 2
    assert "needs --prompts" in capsys.readouterr().err


def test_every_commands_override_examples_are_its_own_config_keys():
    """The `e.g.` overrides in each command's --help name keys of that command's config."""
    import argparse

    from prefloop.cli import build_parser
    from prefloop.config import TrainConfig, from_dict, parse_overrides
    from prefloop.demo import DemoConfig
    from prefloop.distill import DistillConfig
    from prefloop.loop import RunConfig
    from prefloop.merge import MergeConfig
    from prefloop.reward_training import RewardModelConfig
    from prefloop.sft import SFTConfig

    configs = {"train": TrainConfig, "config": TrainConfig, "sft": SFTConfig,
               "reward-model": RewardModelConfig, "run": RunConfig, "demo": DemoConfig,
               "testbed": DemoConfig, "merge": MergeConfig, "distill": DistillConfig}
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    seen = set()
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.dest == "overrides" and action.help and "e.g. " in action.help:
                examples = action.help.split("e.g. ", 1)[1].split()
                from_dict(configs[name], parse_overrides(examples))  # unknown key → error
                seen.add(name)
    assert seen == set(configs)


def test_a_small_reward_model_is_loaded_once_across_scoring_calls(model_dir, monkeypatch):
    """The loop scores its samples and then its eval samples with the same reward model: a
    small one stays loaded; a new reward or rewritten weights load again."""
    import os

    from prefloop import rewards
    from prefloop import workers as stages
    from prefloop.config import RewardConfig

    loads = []
    real = rewards.RewardModelScorer

    class Counting(real):
        def __init__(self, *args, **kwargs):
            loads.append(args[0])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(rewards, "RewardModelScorer", Counting)
    kept = stages.ScorerCache()
    rows = [{"prompt": "What is 1 plus 2?\n", "response": r} for r in ("3", "It is 3.", "4")]
    rm = model_dir("llama")  # a causal LM directory loads as a 1-label classifier
    first = stages.score_rows(rows, RewardConfig(type="model", model=rm), scorers=kept)
    again = stages.score_rows(rows, RewardConfig(type="model", model=rm), scorers=kept)
    assert first == again and len(loads) == 1
    stages.score_rows(rows, RewardConfig(type="model", model=rm, batch_size=2), scorers=kept)
    assert len(loads) == 2  # another reward config: loaded anew
    weights = os.path.join(rm, "model.safetensors")
    os.utime(weights, ns=(os.stat(weights).st_atime_ns, os.stat(weights).st_mtime_ns + 10**9))
    stages.score_rows(rows, RewardConfig(type="model", model=rm, batch_size=2), scorers=kept)
    assert len(loads) == 3  # the weights were rewritten: loaded anew
    stages.score_rows(rows, RewardConfig(type="model", model=rm, batch_size=2))
    assert len(loads) == 4  # without a cache nothing is kept between calls


def test_scoring_encodes_the_next_chunk_while_the_model_scores_this_one(model_dir, monkeypatch):
    """`stages.score_rows` tokenises chunk k+1 on a worker thread during chunk k's forward
    passes: same scores, in row order, as scoring every row in one call."""
    import threading

    from prefloop import rewards
    from prefloop import workers as stages
    from prefloop.config import RewardConfig

    kept = stages.ScorerCache()
    rows = [{"prompt": f"What is {i} plus 2?\n", "response": "It is " + "so " * (i % 5)}
            for i in range(23)]
    firsts = [rows[0]["prompt"], rows[8]["prompt"], rows[16]["prompt"]]  # chunks 8, 8, 7
    entered = {p: threading.Event() for p in firsts}
    threads, overlapped = {}, []
    encode, score_encoded = rewards.RewardModelScorer.encode, \
        rewards.RewardModelScorer.score_encoded

    def logged_encode(self, prompts, responses):
        threads[prompts[0]] = threading.current_thread()
        entered[prompts[0]].set()
        return encode(self, prompts, responses)

    def logged_score(self, encoded):
        k = len(overlapped)
        if k + 1 < len(firsts):  # the next chunk's encoding starts while this one is scored
            overlapped.append(entered[firsts[k + 1]].wait(timeout=10))
        else:
            overlapped.append(True)
        return score_encoded(self, encoded)

    monkeypatch.setattr(rewards.RewardModelScorer, "encode", logged_encode)
    monkeypatch.setattr(rewards.RewardModelScorer, "score_encoded", logged_score)
    scores = stages.score_rows(rows, RewardConfig(type="model", model=model_dir("llama"),
                                                  batch_size=2), scorers=kept)
    assert overlapped == [True, True, True]
    assert all(t is not threading.main_thread() for t in threads.values())
    # the same loaded model (a causal LM's score head is new at every load), kept for reuse
    monkeypatch.setattr(rewards.RewardModelScorer, "score_encoded", score_encoded)
    whole = kept.scorer.score([r["prompt"] for r in rows],
                                         [r["response"] for r in rows])
    assert scores == pytest.approx(whole, abs=1e-5)


def test_config_resolves_every_kind_and_suggests_a_misspelt_key(capsys):
    """`prefloop config` resolved only train configs: a recipe gave "name: unknown config
    key"."""
    from pathlib import Path

    import yaml

    from prefloop.cli.info import CONFIG_KINDS

    root = Path(__file__).resolve().parents[1]
    for recipe in sorted((root / "recipes").glob("*.yaml")):
        assert main(["config", str(recipe)]) == 0, recipe
        resolved = yaml.safe_load(capsys.readouterr().out)
        assert resolved["name"] == yaml.safe_load(recipe.read_text())["name"]
        assert "eval" in resolved and "prompts" in resolved  # run keys, defaults filled in
    for kind in CONFIG_KINDS:
        assert main(["config", "--kind", kind]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"# prefloop {kind}: every key and its default")
        assert yaml.safe_load(out)  # valid YAML with every key
    assert main(["config", str(root / "recipes" / "ilr-dpo.yaml"), "trainng.lr=1e-6"]) == 2
    assert "trainng: unknown config key; did you mean training?" in capsys.readouterr().err


def test_sample_chat_sends_plain_prompts_through_the_chat_template(files, tmp_path):
    """An AlpacaEval instruction is a plain string: without --chat an instruction-tuned
    policy saw it raw (the README's recipe understated it)."""
    from prefloop.data import encode_prompts, read_jsonl
    from prefloop.models import load_tokenizer
    from tests.conftest import write_jsonl

    tokenizer = load_tokenizer(str(files / "policy"))
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 plus 3?"},
                                                 {"prompt": "Name a colour."}])
    out = {}
    for flag in ((), ("--chat",)):
        path = tmp_path / f"s{len(flag)}.jsonl"
        assert main(["sample", "--model", str(files / "policy"), "--prompts",
                     prompts, "--limit", "2", "-n", "1",
                     "--max-new-tokens", "2", "--out", str(path), "-q", *flag]) == 0
        out[bool(flag)] = read_jsonl(path)
    for plain, chat in zip(out[False], out[True], strict=True):
        text = plain["prompt"]
        assert chat["prompt"] == [{"role": "user", "content": text}]
        assert chat["prompt_ids"] != plain["prompt_ids"]
        # the template with its generation prompt, as training encodes a chat prompt
        assert chat["prompt_ids"] == encode_prompts(tokenizer, [chat["prompt"]])[0]
        template = tokenizer.apply_chat_template(chat["prompt"], add_generation_prompt=True,
                                                 tokenize=False)
        assert template != text and text in template
