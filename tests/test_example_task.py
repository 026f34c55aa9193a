"""The word-forms example task (examples/word_forms/task.py): gold and reward behaviour.

No training here: the task module is imported from its path, as `prefloop run` imports it
with PYTHONPATH set to the example directory.
"""

from __future__ import annotations

import importlib.util
import json
import random
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "word_forms"


@pytest.fixture(scope="module")
def task():
    spec = importlib.util.spec_from_file_location("word_forms_task", EXAMPLE / "task.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def chat(question: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}]


def test_gold_on_hand_made_answers(task):
    q_mouse, q_run = "What is the plural of mouse?", "Give the past tense form of run."
    cases = [
        (q_mouse, "Plural of mouse: mice.", 1.0),
        (q_mouse, "Good question! Plural of mouse: mice. Have a wonderful day!", 1.0),
        (q_mouse, "Plural of mouse: mouses.", 0.0),  # over-regularised
        (q_mouse, "Plural of goose: mice.", 0.0),  # names another word
        (q_mouse, "Past tense of mouse: mice.", 0.0),  # the wrong kind of form
        (q_mouse, "mice", 0.0),  # no statement
        (q_mouse, "Plural of mouse: mouses. Plural of mouse: mice.", 0.0),  # the first counts
        (q_run, "Past tense of run: ran.", 1.0),
        (q_run, "Past tense of run: runned.", 0.0),
        ("What is the capital of France?", "Plural of mouse: mice.", 0.0),  # not a task prompt
    ]
    prompts = [chat(q) for q, _, _ in cases]
    assert task.gold(prompts, [r for _, r, _ in cases]) == [g for _, _, g in cases]
    # plain-string prompts work too
    assert task.gold([q_run], ["Past tense of run: ran."]) == [1.0]


def test_every_word_has_three_wrong_forms_and_generated_answers_check(task):
    rng = random.Random(0)
    for _ in range(300):
        p = task.make_problem(rng)
        assert p.answer not in p.wrong and len(set(p.wrong)) == 3
        assert task.is_correct(p.messages, task.write_answer(rng, p, p.answer, 3))
        assert not task.is_correct(p.messages, task.write_answer(rng, p, p.wrong[0], 3))
    # no filler can be read as an answer statement
    assert not any(task.STATEMENT.search(s) for s in task.OPENERS + task.CLOSINGS)


def test_data_sets(task):
    rows = task.sft_rows(400, seed=1)
    gold = task.gold([r["prompt"] for r in rows], [r["completion"] for r in rows])
    assert 0.4 < statistics.mean(gold) < 0.6  # right and wrong answers at random
    lengths = [task.words(r["completion"]) for r in rows]
    assert min(lengths) <= 5 and max(lengths) >= 25  # concise and verbose
    train, evals = task.prompt_rows(50, 10, "train"), task.prompt_rows(50, 20, "eval")
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    assert task.prompt_rows(50, 10, "train") == train  # seeded


def test_reward_prefers_longer_among_equally_correct_answers(task):
    rng = random.Random(3)
    longer_wins, gaps = 0, []
    n = 400
    for _ in range(n):
        p = task.make_problem(rng)
        form = p.answer if rng.random() < 0.5 else p.wrong[0]
        short = task.write_answer(rng, p, form, 0)
        long = task.write_answer(rng, p, form, 4)
        s_short, s_long = task.reward([p.messages] * 2, [short, long])
        longer_wins += s_long > s_short
        gaps.append(s_long - s_short)
    assert longer_wins / n > 0.6
    assert statistics.mean(gaps) > 0.5


def test_reward_prefers_correct_but_is_sometimes_wrong(task):
    rng = random.Random(4)
    right_wins, n = 0, 600
    for _ in range(n):
        p = task.make_problem(rng)
        fillers = rng.randint(0, 6), rng.randint(0, 6)
        right = task.write_answer(rng, p, p.answer, fillers[0])
        wrong = task.write_answer(rng, p, rng.choice(p.wrong), fillers[1])
        s_right, s_wrong = task.reward([p.messages] * 2, [right, wrong])
        right_wins += s_right > s_wrong
    assert 0.8 < right_wins / n < 0.995


def test_reward_is_deterministic_and_finite(task):
    prompts = [chat("What is the plural of leaf?")] * 3
    responses = ["Plural of leaf: leaves.", "Plural of leaf: leafs. Hope this helps!",
                 "gibberish " * 80]
    first = task.reward(prompts, responses)
    assert first == task.reward(prompts, responses)
    assert all(isinstance(x, float) and abs(x) < 100 for x in first)
    # the same in a fresh interpreter (the noise is a hash, not Python's salted hash())
    code = (f"import sys, json; sys.path.insert(0, {str(EXAMPLE)!r}); import task; "
            f"print(json.dumps(task.reward({prompts!r}, {responses!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert [round(x, 12) for x in json.loads(out)] == [round(x, 12) for x in first]
    # the noise is a standard normal over many responses
    z = [task.pseudo_noise("q", f"r{i}") for i in range(4000)]
    assert abs(statistics.mean(z)) < 0.06 and abs(statistics.stdev(z) - 1) < 0.06
