"""The verbosity testbed: a checkable instruction task, a length-biased annotator, and the
pieces the demo builds from them (all seeded; nothing downloaded).

Task: short instructions whose answer a program can verify (the *gold* quality, which does
not depend on length). Every answer contains one sentence "The answer is X." and may be
wrapped in filler sentences that add length and nothing else.

Annotator: prefers correct answers and, more weakly, longer ones —
    P(A ≻ B) = σ(w_correct·(c_A − c_B) + w_length·(words_A − words_B))
so a reward model trained on its labels is biased toward length the way real ones are.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

WORDS = [
    "apple", "river", "stone", "cloud", "horse", "table", "green", "music", "paper", "light",
    "tiger", "bread", "chair", "ocean", "plant", "smile", "train", "water", "house", "night",
    "sugar", "grass", "dream", "glass", "earth", "honey", "lemon", "mouse", "piano", "queen",
]
OPENERS = [
    "Sure, I can help with that.", "Let me think about this step by step.",
    "This is a good question.", "I will look at the question carefully.",
    "Here is how I worked it out.", "Let me explain my reasoning first.",
]
CLOSERS = [
    "I hope this helps.", "Let me know if you have more questions.",
    "I checked the answer twice.", "Thank you for asking.",
    "That is my final answer.", "It was a pleasure to help.",
]
KINDS = ("first_word", "last_word", "repeat", "next_number", "add")
ANSWER = re.compile(r"The answer is ([^\s.]+)\.")


@dataclass
class Problem:
    kind: str
    question: str
    answer: str
    wrong: list[str]  # plausible wrong answers

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]


def make_problem(rng: random.Random, kind: str | None = None) -> Problem:
    kind = kind or rng.choice(KINDS)
    if kind in ("first_word", "last_word"):
        words = rng.sample(WORDS, 3)
        which = "first" if kind == "first_word" else "last"
        answer = words[0] if kind == "first_word" else words[-1]
        wrong = [w for w in words if w != answer]
        return Problem(kind, f"What is the {which} word in: {' '.join(words)}?", answer, wrong)
    if kind == "repeat":
        word = rng.choice(WORDS)
        return Problem(kind, f"Repeat the word: {word}", word,
                       rng.sample([w for w in WORDS if w != word], 2))
    if kind == "next_number":
        n = rng.randint(1, 97)
        return Problem(kind, f"What number comes after {n}?", str(n + 1), [str(n), str(n + 2)])
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return Problem(kind, f"What is {a} plus {b}?", str(a + b),
                   [str(a + b + d) for d in (-1, 1) if a + b + d >= 0])


def expected_answer(question: str) -> str | None:
    """The correct answer recomputed from the question text (None if it is not a task prompt)."""
    m = re.fullmatch(r"What is the (first|last) word in: (\w+) (\w+) (\w+)\?", question)
    if m:
        return m.group(2) if m.group(1) == "first" else m.group(4)
    m = re.fullmatch(r"Repeat the word: (\w+)", question)
    if m:
        return m.group(1)
    m = re.fullmatch(r"What number comes after (\d+)\?", question)
    if m:
        return str(int(m.group(1)) + 1)
    m = re.fullmatch(r"What is (\d+) plus (\d+)\?", question)
    if m:
        return str(int(m.group(1)) + int(m.group(2)))
    return None


def _question(prompt) -> str:
    if isinstance(prompt, str):
        return prompt.strip()
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "").strip()


def is_correct(prompt, response: str) -> bool:
    """Gold quality: the first "The answer is X." names the right X."""
    expected = expected_answer(_question(prompt))
    found = ANSWER.search(response)
    return expected is not None and found is not None and found.group(1) == expected


def gold(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """Per-response gold correctness (1.0 / 0.0); the loop's `eval.gold` hook."""
    return [float(is_correct(p, r)) for p, r in zip(prompts, responses, strict=True)]


def write_answer(rng: random.Random, answer: str, fillers: int) -> str:
    """"The answer is X." with `fillers` filler sentences split around it."""
    before = rng.randint(0, fillers)
    openers = rng.sample(OPENERS, min(before, len(OPENERS)))
    closers = rng.sample(CLOSERS, min(fillers - before, len(CLOSERS)))
    return " ".join([*openers, f"The answer is {answer}.", *closers])


def sample_answer(rng: random.Random, problem: Problem, p_correct: float,
                  max_fillers: int) -> tuple[str, bool]:
    correct = rng.random() < p_correct
    answer = problem.answer if correct else rng.choice(problem.wrong)
    return write_answer(rng, answer, rng.randint(0, max_fillers)), correct


def words(text: str) -> int:
    return len(text.split())


@dataclass
class Annotator:
    """Length-biased preference labels: correctness matters most, length a little."""

    w_correct: float = 3.0
    w_length: float = 0.08  # per word

    def probability(self, prompt, a: str, b: str) -> float:
        z = self.w_correct * (is_correct(prompt, a) - is_correct(prompt, b))
        z += self.w_length * (words(a) - words(b))
        return 1.0 / (1.0 + math.exp(-z))


# ---------------------------------------------------------------- data sets


def sft_rows(n: int, seed: int, p_correct: float = 0.5, max_fillers: int = 8) -> list[dict]:
    """prompt/completion rows mixing concise and verbose, correct and wrong answers."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = make_problem(rng)
        text, _ = sample_answer(rng, problem, p_correct, max_fillers)
        rows.append({"prompt": problem.messages, "completion": text})
    return rows


def annotated_pairs(n: int, seed: int, annotator: Annotator, max_fillers: int = 8) -> list[dict]:
    """Pairs of candidate answers labelled by a seeded draw from the annotator."""
    rng = random.Random(seed)
    rows = []
    while len(rows) < n:
        problem = make_problem(rng)
        a, _ = sample_answer(rng, problem, 0.5, max_fillers)
        b, _ = sample_answer(rng, problem, 0.5, max_fillers)
        if a == b:
            continue
        a_wins = rng.random() < annotator.probability(problem.messages, a, b)
        chosen, rejected = (a, b) if a_wins else (b, a)
        rows.append({"prompt": problem.messages, "chosen": chosen, "rejected": rejected})
    return rows


def prompt_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": make_problem(rng).messages, "id": f"q{seed}-{i}"} for i in range(n)]


def corpus(seed: int = 0) -> list[str]:
    """Text covering the task's vocabulary, to train the tokenizer on."""
    rng = random.Random(seed)
    texts = [*OPENERS, *CLOSERS, *WORDS]
    for _ in range(2000):
        problem = make_problem(rng)
        texts.append(problem.question + " " + write_answer(rng, problem.answer, 2))
    texts += [str(i) for i in range(200)]
    return texts
