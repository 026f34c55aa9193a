"""`prefloop sft`: completion-only loss, chat and `messages` rows, PAFT's sparse delta."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefloop.config import load_config
from prefloop.errors import PrefloopError
from prefloop.logprobs import ResponseLogProbs
from prefloop.sft import (
    SFTConfig,
    collate_sft,
    sft_examples,
    tokenize_sft,
    train_sft,
)
from tests.conftest import write_jsonl

MEMORISE = [
    {"prompt": "What is 3 plus 4?\n", "completion": "3 plus 4 is 7."},
    {"prompt": "What is 12 plus 30?\n", "completion": "12 plus 30 is 42."},
    {"prompt": "What is 7 plus 21?\n", "completion": "7 plus 21 is 28."},
    {"prompt": "What is 40 plus 2?\n", "completion": "40 plus 2 is 42."},
]
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2 plus 2?"},
    {"role": "assistant", "content": "2 plus 2 is 4."},
    {"role": "user", "content": "What is 3 plus 3?"},
    {"role": "assistant", "content": "3 plus 3 is 6."},
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _config(model: str, out: Path, *extra: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"model={model}", f"output_dir={out}", "training.lr=3e-3", "training.batch_size=4",
        "training.warmup_ratio=0", *extra,
    ])


def _chat_rows(rows: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": r["prompt"].strip()}],
             "completion": r["completion"]} for r in rows]


def test_loss_falls_and_training_completions_are_memorised(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = _config(model_dir("llama", "micro"), tmp_path / "out", "training.max_steps=40",
                  "training.scheduler=constant")
    result = train_sft(cfg, rows=MEMORISE, progress=False)
    assert result.log[-1]["loss"] < result.log[0]["loss"] / 5, (result.log[0], result.log[-1])
    tok = AutoTokenizer.from_pretrained(result.output_dir)
    model = AutoModelForCausalLM.from_pretrained(result.output_dir)
    for row in MEMORISE:
        ids = tok(row["prompt"], return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=16, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        # greedy decoding reproduces the completion and stops with EOS
        assert tok.decode(out[0, ids.shape[1]:]) == row["completion"] + tok.eos_token


def test_prompt_and_padding_carry_no_loss(model_dir, tokenizer):
    """Our loss equals HF's cross-entropy with the prompt labelled -100, and the batch's
    targets are exactly the completion tokens (EOS included), nothing of the prompt."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir("llama")).eval()
    seqs, _ = tokenize_sft(sft_examples(MEMORISE[:2]), tokenizer)
    batch = collate_sft(seqs, tokenizer.pad_token_id)  # row 0 is padded to row 1's length
    assert batch.target.tolist() == seqs[0].response_ids + seqs[1].response_ids
    assert tokenizer.decode(seqs[0].response_ids) == MEMORISE[0]["completion"] + "<|end|>"
    with torch.no_grad():
        ours = -ResponseLogProbs(model)(batch)  # (T,) per-token NLL
        for k, s in enumerate(seqs):
            ids = torch.tensor([s.prompt_ids + s.response_ids])
            labels = torch.tensor([[-100] * len(s.prompt_ids) + s.response_ids])
            hf = model(input_ids=ids, labels=labels).loss
            mine = ours[batch.segment == k].mean()
            torch.testing.assert_close(mine, hf, atol=1e-5, rtol=1e-5)
            unmasked = model(input_ids=ids, labels=ids).loss
            assert abs(unmasked.item() - mine.item()) > 1e-3  # the mask matters here


@pytest.mark.parametrize("turns,expected", [
    ("all", ["2 plus 2 is 4.<|end|>", "3 plus 3 is 6.<|end|>"]),
    ("last", ["3 plus 3 is 6.<|end|>"]),
])
def test_messages_rows_train_on_assistant_turns(turns, expected, tokenizer):
    seqs, _ = tokenize_sft(sft_examples([{"messages": CONVERSATION}]), tokenizer,
                           assistant_turns=turns)
    batch = collate_sft(seqs, tokenizer.pad_token_id)
    full = seqs[0].prompt_ids + seqs[0].response_ids
    # trained tokens, grouped into contiguous runs of the full sequence
    cols = (batch.source_col + 1).tolist()
    runs, current = [], [cols[0]]
    for c in cols[1:]:
        if c == current[-1] + 1:
            current.append(c)
        else:
            runs.append(current)
            current = [c]
    runs.append(current)
    assert [tokenizer.decode([full[c] for c in run]) for run in runs] == expected
    assert tokenizer.decode(full) == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert tokenizer.decode(seqs[0].prompt_ids).endswith("<|assistant|>")


@pytest.mark.parametrize("fmt", ["plain", "chat", "messages"])
def test_every_row_format_trains_and_the_output_reloads(fmt, model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = {"plain": MEMORISE, "chat": _chat_rows(MEMORISE),
            "messages": [{"messages": CONVERSATION}] * 4}[fmt]
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    base = model_dir("qwen2")
    result = train_sft(_config(base, tmp_path / "out", f"data.path={data}",
                               "training.max_steps=2"), progress=False)
    out = result.output_dir
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl",
            "train_summary.json", "train_config.yaml"} <= names
    assert not list(tmp_path.glob(".out.partial"))
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("loss", "lr", "grad_norm", "tokens", "step"):
        assert key in log[0]
    assert log[0]["tokens"] == sum(s.num_trained for s in tokenize_sft(
        sft_examples(rows), AutoTokenizer.from_pretrained(base))[0])  # one step = all 4 rows
    trained = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(base)
    assert any(not torch.equal(a, b) for a, b in
               zip(trained.state_dict().values(), start.state_dict().values(), strict=True))
    AutoTokenizer.from_pretrained(out)


def test_l1_delta_gives_a_sparser_delta(model_dir, tmp_path):
    from prefloop.tiny import synthetic_preferences

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]}
            for r in synthetic_preferences(16, seed=2)]
    summaries = {}
    for coef in (0.0, 1e-3):
        result = train_sft(_config(model_dir("llama", "micro"), tmp_path / f"out{coef}",
                                   "training.max_steps=8", "training.lr=1e-3",
                                   "training.batch_size=8", f"l1_delta={coef}"),
                           rows=rows, progress=False)
        summaries[coef] = json.loads((result.output_dir / "train_summary.json").read_text())
        assert result.log[-1]["loss"] < result.log[0]["loss"]
    dense, sparse = summaries[0.0], summaries[1e-3]
    assert dense["delta_tolerance"] == 1e-8
    assert dense["delta_sparsity"] < 0.05  # every entry moves without the penalty
    assert sparse["delta_sparsity"] > 0.3  # exactly θ₀ again (OWL-QN projection)
    assert sparse["delta_mean_abs"] < dense["delta_mean_abs"]
    assert "l1" in result.log[-1] and "delta_sparsity" in result.log[-1]


@pytest.mark.parametrize("row,field", [
    ({"prompt": "What is 1 plus 1?\n"}, "completion"),
    ({"completion": "2."}, "prompt"),
    ({"prompt": "What is 1 plus 1?\n", "completion": ""}, "completion"),
    ({"prompt": "What is 1 plus 1?\n", "completion": "   "}, "completion"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "messages"),
    ({"messages": "hi"}, "messages"),
])
def test_bad_rows_name_row_and_field(row, field):
    with pytest.raises(PrefloopError, match=rf"data\.jsonl, row 2, field '{field}'"):
        sft_examples([MEMORISE[0], row], "data.jsonl")


def test_bad_file_stops_before_any_output(model_dir, tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [MEMORISE[0], {"prompt": "x", "completion": ""}])
    with pytest.raises(PrefloopError, match=r"bad\.jsonl, line 2, field 'completion': empty"):
        train_sft(_config(model_dir("llama"), tmp_path / "out", f"data.path={data}"),
                  progress=False)
    assert not list(tmp_path.glob("*out*"))


def test_config_defaults_and_refusals(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("model: m\ndata:\n  path: d.jsonl\ntraining:\n  epochs: 2\n")
    cfg = load_config(SFTConfig, path)
    assert cfg.training.lr == 2e-5 and cfg.training.epochs == 2  # SFT's lr, not DPO's 5e-7
    for bad, match in [("training.layout=padded", "applies to preference training only"),
                       ("l1_delta=-1", "l1_delta"), ("data.assistant_turns=first", "all, last"),
                       ("data.bogus=1", "valid keys here")]:
        with pytest.raises(PrefloopError, match=match):
            load_config(SFTConfig, path, [bad])
    with pytest.raises(PrefloopError, match=r"data\.path: required"):
        train_sft(load_config(SFTConfig, None, ["model=m"]), progress=False)


def test_truncation_is_counted_never_silent(tokenizer):
    examples = sft_examples(MEMORISE)
    full, stats = tokenize_sft(examples, tokenizer)
    assert stats.as_dict()["responses_truncated"] == 0 and len(full) == 4
    seqs, stats = tokenize_sft(examples, tokenizer, max_length=8, max_prompt_length=4)
    assert len(seqs) == 4 and stats.prompts_truncated == 4 and stats.responses_truncated == 4
    assert all(len(s.prompt_ids) <= 4 and s.length <= 8 for s in seqs)
    limit = sorted(s.length for s in full)[1]  # at least two rows fit, at least one does not
    kept, stats = tokenize_sft(examples, tokenizer, max_length=limit,
                               max_prompt_length=limit - 1, truncation="skip")
    assert 2 <= len(kept) < 4 and len(kept) + stats.skipped == 4
    assert stats.skipped_rows == [s.row for s in full if s.length > limit]
    with pytest.raises(PrefloopError, match="exceed"):
        tokenize_sft(examples, tokenizer, max_length=8, max_prompt_length=4, truncation="error")


SCRIPT = """
import sys
from prefloop.config import load_config
from prefloop.sft import SFTConfig, train_sft
train_sft(load_config(SFTConfig, None, sys.argv[1:]), progress=False)
"""


@pytest.mark.distributed
def test_two_processes_match_one_process(model_dir, tmp_path):
    """2 CPU processes × 2 rows reproduce 1 process × 4 rows: the loss is the mean over all
    completion tokens of the step, whichever process holds them."""
    from prefloop.tiny import synthetic_preferences

    rows = [{"prompt": r["prompt"], "completion": r["chosen"]}
            for r in synthetic_preferences(12, seed=4)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    script = tmp_path / "sft_script.py"
    script.write_text(SCRIPT)
    args = [f"model={model_dir('llama')}", f"data.path={data}", "training.lr=1e-3",
            "training.max_steps=3", "l1_delta=1e-4", "training.group_by_length=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(script), *args, f"output_dir={tmp_path / 'one'}",
                    "training.batch_size=4"], check=True, env=env, capture_output=True)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
              "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
              "--dynamo_backend", "no", "--main_process_port", "29527", str(script)]
    proc = subprocess.run([*launch, *args, f"output_dir={tmp_path / 'two'}",
                           "training.batch_size=2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = ([json.loads(x) for x in (tmp_path / d / "train_log.jsonl").read_text()
                 .splitlines()] for d in ("one", "two"))
    assert json.loads((tmp_path / "two" / "train_summary.json").read_text())["processes"] == 2
    assert [r["tokens"] for r in one] == [r["tokens"] for r in two]
    for a, b in zip(one, two, strict=True):
        assert abs(a["loss"] - b["loss"]) < 1e-5
        assert abs(a["delta_sparsity"] - b["delta_sparsity"]) < 1e-3


def _mixed_length_rows(n: int, seed: int = 0) -> list[dict]:
    """Half the completions are two words, half carry ~20 words of filler; which one does not
    depend on the prompt, so a model that fits the data answers long half of the time."""
    import random

    rng = random.Random(seed)
    filler = " Let me think about this step by step, because careful answers are better."
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        answer = f"It is {a + b}."
        rows.append({"prompt": f"What is {a} plus {b}?\n",
                     "completion": answer + (filler * 2 if rng.random() < 0.5 else "")})
    return rows


@pytest.mark.slow
@pytest.mark.parametrize("group_by_length", [True, False])
def test_sampled_length_matches_the_data_whatever_the_batching(group_by_length, model_dir,
                                                               tmp_path):
    """Length-grouped batches must not teach shorter answers than the data's: before every
    token of an epoch weighed alike, steps of short examples weighed each of their tokens
    more and the model answered long far less often than half of the time."""
    from prefloop.config import SamplingConfig
    from prefloop.sampling import PromptRecord
    from prefloop.workers import sample_prompts

    rows = _mixed_length_rows(256)
    cfg = _config(model_dir("llama", "micro"), tmp_path / "out", "training.epochs=12",
                  "training.batch_size=16", "training.scheduler=constant",
                  f"training.group_by_length={str(group_by_length).lower()}")
    result = train_sft(cfg, rows=rows, progress=False)
    data_tokens = result.summary["tokens_seen"] / result.summary["examples_seen"]
    prompts = [PromptRecord(str(i), r["prompt"]) for i, r in enumerate(_mixed_length_rows(200, 1))]
    samples = sample_prompts(str(result.output_dir), prompts, SamplingConfig(
        num_samples=2, temperature=1.0, max_new_tokens=64, batch_size=100, seed=0))
    sampled = sum(s["num_tokens"] for s in samples) / len(samples)
    # 400 samples of a two-point mixture: one standard error of the mean is ~4 % of it
    assert abs(sampled / data_tokens - 1) <= 0.15, (sampled, data_tokens)
