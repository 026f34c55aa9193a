"""Word forms: a second synthetic task family for prefloop, built from its public interfaces.

The task: give the plural of an English noun or the past tense of an English verb.

    user:       What is the plural of mouse?
    assistant:  Plural of mouse: mice.

An answer is exactly one *statement* "Plural of W: X." / "Past tense of W: X.", optionally
framed by hedging openers ("Good question!") before it and polite closings ("Good luck with
your writing!") after it. Openers and closings add length and nothing else, and they are
not the verbosity testbed's fillers ("Let me think about this step by step."), nor is the
answer format its "The answer is X.".

Two functions are the hooks a prefloop run config names:

* ``gold(prompts, responses)``   — ``eval.gold: task:gold``: 1.0 when the first statement
  names the asked word and its right form, else 0.0 (program-checked, independent of length);
* ``reward(prompts, responses)`` — ``reward.type: function`` / ``reward.function:
  task:reward``: a length-biased proxy reward, ``W_CORRECT·gold + W_LENGTH·words + NOISE·z``
  with ``z`` a deterministic standard-normal draw from a hash of (question, response). Like a
  real reward model it prefers the longer of two equally correct answers, and now and then it
  ranks a wrong answer above a right one.

Both take ``prompts`` as strings or chat-message lists (what prefloop passes) and are pure:
the same inputs give the same outputs in any process.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

# ---------------------------------------------------------------- the word tables
# Regular forms (a rule: +s, +es, y→ies, +ed, +d, y→ied, doubled consonant) and irregular
# ones (memorised); the wrong candidates below come from applying the wrong rule, so a
# wrong answer is a plausible over-regularisation ("mouses", "runned"), never gibberish.

PLURALS = {
    "cat": "cats", "dog": "dogs", "book": "books", "tree": "trees", "car": "cars",
    "bird": "birds", "hat": "hats", "cup": "cups",
    "box": "boxes", "bus": "buses", "dish": "dishes", "fox": "foxes", "church": "churches",
    "glass": "glasses",
    "city": "cities", "baby": "babies", "party": "parties", "story": "stories",
    "leaf": "leaves", "knife": "knives", "wolf": "wolves", "wife": "wives",
    "mouse": "mice", "goose": "geese", "child": "children", "man": "men", "woman": "women",
    "foot": "feet", "tooth": "teeth", "person": "people",
    "sheep": "sheep", "fish": "fish", "deer": "deer",
}
PAST = {
    "walk": "walked", "jump": "jumped", "play": "played", "talk": "talked", "open": "opened",
    "help": "helped",
    "bake": "baked", "smile": "smiled", "dance": "danced", "close": "closed",
    "cry": "cried", "try": "tried", "carry": "carried", "study": "studied",
    "stop": "stopped", "plan": "planned", "hop": "hopped",
    "run": "ran", "go": "went", "eat": "ate", "see": "saw", "swim": "swam", "sing": "sang",
    "write": "wrote", "take": "took", "buy": "bought", "think": "thought", "fly": "flew",
    "drink": "drank", "sleep": "slept", "give": "gave",
}

KINDS = {
    # kind: (table, how the answer statement names it, question templates)
    "plural": (PLURALS, "Plural", ("What is the plural of {}?", "Give the plural form of {}.")),
    "past": (PAST, "Past tense", ("What is the past tense of {}?",
                                  "Give the past tense form of {}.")),
}

# Length without content: hedges before the statement, polite closings after it. None of
# them contains a colon, so none can be read as an answer statement.
OPENERS = ["Good question!", "Happy to help.", "Sure thing.", "Here you go."]
CLOSINGS = [
    "Hope this helps!", "Grammar can be tricky.", "Ask me about other words.",
    "Dictionaries agree on this.", "Good luck with your writing!", "Have a wonderful day!",
    "English is full of surprises.", "Glad I could help.",
]

STATEMENT = re.compile(r"(Plural|Past tense) of ([A-Za-z]+): ([A-Za-z]+)\.")


@dataclass
class Problem:
    kind: str  # plural | past
    word: str
    question: str
    answer: str
    wrong: list[str]  # three plausible wrong forms

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}]

    def statement(self, form: str) -> str:
        return f"{KINDS[self.kind][1]} of {self.word}: {form}."


def wrong_forms(kind: str, word: str, right: str) -> list[str]:
    """Over-regularised candidates, the right form excluded (sorted, for seeded draws)."""
    last, vowels = word[-1], "aeiou"
    cands = {word, word + "s"}  # unchanged; the wrong suffix
    if kind == "plural":
        cands |= {word + "es", word + "en" if last not in vowels else word + "n"}
        if last == "y":
            cands.add(word[:-1] + "ies")
        if word.endswith(("f", "fe")):
            cands.add(word.removesuffix("e")[:-1] + "ves")
    else:
        cands.add(word + "d" if last == "e" else word + "ed")
        cands.add(word + "ed" if last == "e" else word + "t")
        if last not in vowels + "wxy":
            cands.add(word + last + "ed")
        if last == "y":
            cands.add(word[:-1] + "ied")
    return sorted(c for c in cands if c != right)


def make_problem(rng: random.Random, kind: str | None = None) -> Problem:
    kind = kind or rng.choice(sorted(KINDS))
    table, _, templates = KINDS[kind]
    word = rng.choice(sorted(table))
    right = table[word]
    wrong = rng.sample(wrong_forms(kind, word, right), 3)
    return Problem(kind, word, rng.choice(templates).format(word), right, wrong)


_QUESTION_PATTERNS = [
    (kind, re.compile(re.escape(t).replace(r"\{\}", r"([A-Za-z]+)")))
    for kind, (_, _, templates) in KINDS.items() for t in templates
]


def parse_question(question: str) -> tuple[str, str] | None:
    """(kind, word) of a task question, None for anything else."""
    for kind, pattern in _QUESTION_PATTERNS:
        m = pattern.fullmatch(question.strip())
        if m and m.group(1) in KINDS[kind][0]:
            return kind, m.group(1)
    return None


def question_text(prompt) -> str:
    """The user's question from a prompt string or a chat-message list."""
    if isinstance(prompt, str):
        return prompt.strip()
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "").strip()


def is_correct(prompt, response: str) -> bool:
    """The first answer statement is of the asked kind, names the asked word, and gives its
    right form. Openers and closings around it do not matter."""
    asked = parse_question(question_text(prompt))
    found = STATEMENT.search(response)
    if asked is None or found is None:
        return False
    kind, word = asked
    table, label, _ = KINDS[kind]
    return (found.group(1), found.group(2), found.group(3)) == (label, word, table[word])


def gold(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """Gold correctness per response, 1.0 or 0.0: the loop's `eval.gold: task:gold`."""
    return [float(is_correct(p, r)) for p, r in zip(prompts, responses, strict=True)]


# ---------------------------------------------------------------- the proxy reward

W_CORRECT = 2.0  # a right answer
W_LENGTH = 0.05  # per word: about +0.3 per closing sentence
NOISE = 0.6  # sd of the deterministic pseudo-noise
LENGTH_CAP = 60  # words beyond this earn nothing more
_NORMAL = NormalDist()


def pseudo_noise(question: str, response: str) -> float:
    """A standard-normal value fixed by (question, response): the reward's own 'opinion'."""
    digest = hashlib.sha256(f"{question}\x00{response}".encode()).digest()
    u = (int.from_bytes(digest[:8], "big") + 0.5) / 2.0**64  # in (0, 1)
    return _NORMAL.inv_cdf(u)


def words(text: str) -> int:
    return len(text.split())


def reward(prompts: Sequence, responses: Sequence[str]) -> list[float]:
    """Length-biased proxy reward: `reward.type: function`, `reward.function: task:reward`."""
    out = []
    for p, r in zip(prompts, responses, strict=True):
        q = question_text(p)
        out.append(W_CORRECT * is_correct(q, r) + W_LENGTH * min(words(r), LENGTH_CAP)
                   + NOISE * pseudo_noise(q, r))
    return out


# ---------------------------------------------------------------- data sets


def write_answer(rng: random.Random, problem: Problem, form: str, fillers: int) -> str:
    """The statement framed by `fillers` filler sentences: up to two openers before it,
    closings after it."""
    openers = min(rng.randint(0, 2), fillers)
    before = rng.sample(OPENERS, openers)
    after = rng.sample(CLOSINGS, min(fillers - openers, len(CLOSINGS)))
    return " ".join([*before, problem.statement(form), *after])


def sft_rows(n: int, seed: int, p_correct: float = 0.5, max_fillers: int = 6) -> list[dict]:
    """prompt/completion rows: right or wrong (p_correct), concise or verbose (0 to
    max_fillers filler sentences), at random — so the SFT policy samples a spread of lengths
    and is often wrong."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        problem = make_problem(rng)
        form = problem.answer if rng.random() < p_correct else rng.choice(problem.wrong)
        rows.append({"prompt": problem.messages,
                     "completion": write_answer(rng, problem, form,
                                                rng.randint(0, max_fillers))})
    return rows


def prompt_rows(n: int, seed: int, prefix: str = "q") -> list[dict]:
    """`id`/`prompt` rows (chat messages) drawn with `seed`; ids carry the seed and prefix, so
    sets drawn with different seeds or prefixes never share an id."""
    rng = random.Random(seed)
    return [{"id": f"{prefix}{seed}-{i}", "prompt": make_problem(rng).messages}
            for i in range(n)]


def corpus(seed: int = 0, n: int = 2000) -> list[str]:
    """Texts covering the task's vocabulary (right and wrong forms, every filler), for the
    tokenizer."""
    rng = random.Random(seed)
    texts = [*OPENERS, *CLOSINGS]
    for _ in range(n):
        problem = make_problem(rng)
        form = problem.answer if rng.random() < 0.5 else rng.choice(problem.wrong)
        texts.append(problem.question + " " + write_answer(rng, problem, form, 2))
    return texts
