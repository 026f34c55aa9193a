"""ARIES-style self-refinement (prefloop.refine) around a fake sampler and the HF sampler."""

from __future__ import annotations

import json
import re

import pytest

from prefloop.config import DEFAULT_REFINE_TEMPLATE, RefineConfig, SamplingConfig, load_config
from prefloop.errors import PrefloopError
from prefloop.refine import RefiningSampler, pick_round, refinement_prompt, with_refinement
from prefloop.sampling import HFSampler, PromptRecord
from tests.conftest import write_jsonl

QUESTIONS = ["What is 2 plus 3?", "What is 4 plus 4?", "Name a colour."]


def fine_reward(prompts: list, responses: list[str]) -> list[float]:
    """Deterministic, almost never tied: used as `tests.test_refine:fine_reward`."""
    return [float(sum(map(ord, r)) % 97) + len(r) / 1000 for r in responses]


class EchoSampler:
    """A deterministic `Sampler`: the answer to a prompt is a function of its text, so each
    refinement round gives a different, predictable answer. Records every prompt it gets."""

    def __init__(self):
        self.calls: list[list[PromptRecord]] = []

    @staticmethod
    def text(prompt) -> str:
        return prompt if isinstance(prompt, str) else prompt[-1]["content"]

    def answer(self, prompt, index: int) -> str:
        seen = self.text(prompt)
        return f"a{len(seen) % 13}-{index}" + "x" * (len(seen) * 7 % 5)

    def sample(self, prompts, config, progress=False):
        self.calls.append(list(prompts))
        rows = []
        for p in prompts:
            for s in range(config.num_samples):
                text = self.answer(p.prompt, s)
                rows.append({"prompt_id": p.prompt_id, "prompt": p.prompt, "prompt_ids": [7, 8],
                             "sample_index": s, "response": text,
                             "response_ids": list(range(len(text))), "num_tokens": len(text),
                             "num_chars": len(text), "finish_reason": "eos", "logprob": -1.5})
        return rows


class FunctionScorerStub:
    def __init__(self):
        self.calls = 0

    def score(self, prompts, responses):
        self.calls += 1
        assert all(p in QUESTIONS for p in prompts)  # judged against the original question
        return fine_reward(prompts, responses)


def _prompts() -> list[PromptRecord]:
    return [PromptRecord(f"p{i}", q) for i, q in enumerate(QUESTIONS)]


def _sampling(rounds: int, select: str = "last", **kw) -> SamplingConfig:
    return SamplingConfig(num_samples=2, max_new_tokens=12, batch_size=4, temperature=1.0,
                          refine=RefineConfig(rounds=rounds, select=select), **kw)


# ---------------------------------------------------------------- prompts and rules


def test_refinement_prompt_contains_question_and_draft_and_keeps_chat_turns():
    t = "Q={question} A={answer}"
    assert refinement_prompt("2+3?", "five", t, chat=False) == "Q=2+3? A=five"
    assert refinement_prompt("2+3?", "five", t, chat=True) == [
        {"role": "user", "content": "Q=2+3? A=five"}]
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+3?"}]
    assert refinement_prompt(chat, "five", t, chat=True) == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Q=2+3? A=five"}]
    default = refinement_prompt("2+3?", "five", DEFAULT_REFINE_TEMPLATE, chat=False)
    assert "2+3?" in default and "five" in default
    with pytest.raises(PrefloopError, match="no question"):
        refinement_prompt([{"role": "system", "content": "x"}], "a", t, chat=True)


def test_pick_round_rules():
    chain = [{"num_tokens": 5, "score": 1.0}, {"num_tokens": 3, "score": 4.0},
             {"num_tokens": 3, "score": 4.0}, {"num_tokens": 9, "score": 2.0}]
    assert pick_round(chain, "last") == 3
    assert pick_round(chain, "shortest") == 1  # ties: the earliest round
    assert pick_round(chain, "reward") == 1


@pytest.mark.parametrize("changes,message", [
    ({"rounds": -1}, "rounds: must be ≥ 0"),
    ({"select": "best"}, "select: 'best' is not one of last, shortest, reward"),
    ({"template": "improve {answer}"}, "exactly the fields {question} and {answer}"),
    ({"template": "{question} {answer} {score}"}, "found 'answer', 'question', 'score'"),
    ({"template": "{question} {answer} {"}, "literal braces as {{ and }}"),
])
def test_refine_config_is_validated_with_clear_errors(changes, message):
    with pytest.raises(PrefloopError, match=r"sampling\.refine\..*" + re.escape(message)):
        SamplingConfig(refine=RefineConfig(**changes)).validate()


def test_refine_section_loads_from_yaml_overrides_and_refuses_unknown_keys():
    cfg = load_config(SamplingConfig, None, ["refine.rounds=2", "refine.select=shortest"])
    assert cfg.refine == RefineConfig(rounds=2, select="shortest")
    with pytest.raises(PrefloopError, match=re.escape(
            "refine.depth: unknown config key; valid keys here: rounds, select, template")):
        load_config(SamplingConfig, None, ["refine.depth=2"])


# ---------------------------------------------------------------- the wrapper


def test_one_round_asks_to_improve_the_draft():
    inner = EchoSampler()
    rows = RefiningSampler(inner, chat=False).sample(_prompts(), _sampling(1))
    _, asks = inner.calls
    assert len(asks) == len(rows) == 2 * len(QUESTIONS)  # one refinement per sample
    for ask, row in zip(asks, rows, strict=True):
        draft = row["refinements"][0]["response"]
        assert ask.prompt == DEFAULT_REFINE_TEMPLATE.format(question=row["prompt"], answer=draft)
        assert draft == inner.answer(row["prompt"], row["sample_index"])


def test_last_keeps_the_final_round_with_its_ids_and_no_stale_logprob():
    rows = RefiningSampler(EchoSampler(), chat=False).sample(_prompts(), _sampling(3))
    assert [(r["prompt_id"], r["sample_index"]) for r in rows] == [
        (f"p{i}", s) for i in range(3) for s in range(2)]
    for r in rows:
        assert r["refine_rounds"] == 3 and r["refine_pick"] == 3
        assert [c["round"] for c in r["refinements"]] == [0, 1, 2, 3]
        final = r["refinements"][-1]
        assert r["response"] == final["response"] and r["num_tokens"] == final["num_tokens"]
        assert r["response_ids"] == list(range(len(final["response"])))
        assert r["prompt"] in QUESTIONS and r["prompt_ids"] == [7, 8]  # the original prompt
        assert r["logprob"] is None  # sampled after the refinement prompt, not the question


class ShortDraftsSampler(EchoSampler):
    """Drafts of every other sample are the shortest answer, so `shortest` keeps a draft
    there and a refinement elsewhere (EchoSampler alone never made the draft the shortest,
    and the draft branch of the test below never ran)."""

    def answer(self, prompt, index: int) -> str:
        if self.text(prompt).startswith("Question: "):  # a refinement request
            return f"refined {index}"
        return "d" if index % 2 == 0 else "a much longer draft answer"


def test_shortest_and_draft_pick_keeps_the_draft_logprob():
    rows = RefiningSampler(ShortDraftsSampler(), chat=False).sample(_prompts(),
                                                                    _sampling(2, "shortest"))
    for r in rows:
        lengths = [c["num_tokens"] for c in r["refinements"]]
        assert r["refine_pick"] == lengths.index(min(lengths))
        assert r["num_tokens"] == min(lengths)
        assert r["logprob"] == (-1.5 if r["refine_pick"] == 0 else None)
    # both branches ran: drafts kept (with their sampling log-prob) and refinements kept
    assert {r["refine_pick"] == 0 for r in rows} == {True, False}


def test_reward_selection_picks_the_argmax_of_the_reward():
    scorer = FunctionScorerStub()
    rows = RefiningSampler(EchoSampler(), scorer, chat=False).sample(_prompts(),
                                                                    _sampling(3, "reward"))
    assert scorer.calls == 1  # every round of every sample scored in one call
    picks = set()
    for r in rows:
        scores = fine_reward([], [c["response"] for c in r["refinements"]])
        assert [c["score"] for c in r["refinements"]] == scores
        assert r["refine_pick"] == scores.index(max(scores))
        assert r["refine_score"] == max(scores)
        picks.add(r["refine_pick"])
    assert len(picks) > 1  # the rule really chose, not always one round


def test_reward_selection_without_a_scorer_is_refused():
    with pytest.raises(PrefloopError, match="'reward' needs a scorer"):
        RefiningSampler(EchoSampler()).sample(_prompts(), _sampling(1, "reward"))
    with pytest.raises(PrefloopError, match="--reward-model or --reward-function"):
        with_refinement(EchoSampler(), _sampling(1, "reward"))


def test_zero_rounds_returns_the_sampler_itself():
    inner = EchoSampler()
    assert with_refinement(inner, _sampling(0)) is inner
    assert RefiningSampler(inner).sample(_prompts(), _sampling(0)) == inner.sample(
        _prompts(), _sampling(0))


# ---------------------------------------------------------------- with the HF sampler


@pytest.fixture(scope="module")
def hf(model_dir, tokenizer):
    from transformers import AutoModelForCausalLM

    return HFSampler(AutoModelForCausalLM.from_pretrained(model_dir("llama")), tokenizer)


def test_zero_rounds_is_bit_identical_to_plain_sampling(hf):
    plain = hf.sample(_prompts(), SamplingConfig(num_samples=2, max_new_tokens=12))
    wrapped = RefiningSampler(hf).sample(_prompts(), _sampling(0))
    assert wrapped == plain  # token ids, texts and log-probs, exactly


def test_hf_refinement_prompt_is_chat_rendered_and_contains_the_draft(hf, tokenizer):
    class Recording:
        tokenizer = hf.tokenizer

        def __init__(self):
            self.rows = []

        def sample(self, prompts, config, progress=False):
            rows = hf.sample(prompts, config, progress)
            self.rows.append(rows)
            return rows

    inner = Recording()
    chat = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [PromptRecord(f"c{i}", m) for i, m in enumerate(chat)]
    rows = RefiningSampler(inner).sample(prompts, _sampling(1))
    drafts, refined = inner.rows
    assert all(d["response"] for d in drafts)  # non-empty drafts, so `in` below means something
    for draft, ask, row in zip(drafts, refined, rows, strict=True):
        rendered = tokenizer.decode(ask["prompt_ids"])
        assert rendered.startswith("<|user|>Question: ") and rendered.endswith("<|assistant|>")
        assert draft["response"] in rendered
        assert row["response_ids"] == ask["response_ids"]
        assert row["num_tokens"] == len(ask["response_ids"])
        assert row["prompt_ids"] == draft["prompt_ids"]  # still the original question
        assert row["prompt"] == draft["prompt"]


def test_prefloop_sample_and_best_of_n_refine_from_the_command_line(model_dir, tmp_path,
                                                                    capsys):
    from prefloop.cli import main

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": q} for q in QUESTIONS])
    common = ["--model", model_dir("llama"), "--prompts", prompts, "--max-new-tokens", "10",
              "-q", "--refine-rounds", "2"]
    fn = "tests.test_refine:fine_reward"
    out = tmp_path / "refined.jsonl"
    assert main(["sample", *common, "-n", "2", "--refine-select", "reward",
                 "--reward-function", fn, "--out", str(out)]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 6
    for r in rows:
        scores = fine_reward([], [c["response"] for c in r["refinements"]])
        assert r["refine_pick"] == scores.index(max(scores))
        assert r["response"] == r["refinements"][r["refine_pick"]]["response"]

    best = tmp_path / "best.jsonl"
    assert main(["best-of-n", *common, "-n", "3", "--reward-function", fn,
                 "--out", str(best)]) == 0
    kept = [json.loads(x) for x in best.read_text().splitlines()]
    assert len(kept) == 3
    for r in kept:  # the best refined sample, scored by the same reward
        assert r["score"] == fine_reward([], [r["response"]])[0] == r["refine_score"]

    capsys.readouterr()
    assert main(["sample", *common, "--reward-function", fn, "--out", str(out)]) == 2
    assert "only uses them with --refine-rounds K --refine-select reward" in \
        capsys.readouterr().err
    template = tmp_path / "t.txt"
    template.write_text("improve: {answer}")
    assert main(["sample", *common, "--refine-template", str(template),
                 "--out", str(out)]) == 2
    assert "refine.template: must use exactly the fields" in capsys.readouterr().err
