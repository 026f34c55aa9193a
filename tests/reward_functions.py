"""Reward functions referenced as `tests.reward_functions:NAME` by the loop tests."""

from __future__ import annotations


def digits_and_brevity(prompts: list, responses: list[str]) -> list[float]:
    """More digits is better, longer is a little worse; coarse so that ties happen."""
    return [float(sum(c.isdigit() for c in r) // 2) - 0.01 * (len(r) // 20) for r in responses]


def constant(prompts: list, responses: list[str]) -> list[float]:
    return [1.0 for _ in responses]


def not_a_number(prompts: list, responses: list[str]) -> list[float]:
    return [float("nan") for _ in responses]


def length_and_letters(prompts: list, responses: list[str]) -> list[float]:
    """Longer is better, letters break ties: different responses never tie."""
    return [len(r) + (sum(map(ord, r)) % 101) / 1000 for r in responses]


def out_of_range(prompts: list, responses: list[str]) -> list[float]:
    """Not a gold value: gold is a correctness in [0, 1]."""
    return [2.5 for _ in responses]


def raises(prompts: list, responses: list[str]) -> list[float]:
    raise KeyError("score")


def one_argument(responses: list[str]) -> list[float]:
    return [0.0 for _ in responses]
