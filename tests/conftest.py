"""Shared fixtures: a tokenizer trained here, tiny models of real architectures, data files.

Nothing is downloaded; everything is built once per test session in a temporary folder.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and a second intra-op thread spinning against
    another busy process on a 2-core machine made tests up to 50× slower. Use it per module:
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    from prefloop.tiny import synthetic_corpus, train_tokenizer

    return train_tokenizer(synthetic_corpus(), vocab_size=400)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    """model_dir(arch) -> path of a saved tiny model of that architecture (built once)."""
    from prefloop.tiny import build_causal_lm, save_pretrained_pair

    built: dict[str, str] = {}

    def make(arch: str = "llama", size: str = "nano") -> str:
        key = f"{arch}-{size}"
        if key not in built:
            path = tmp_path_factory.mktemp(key)
            save_pretrained_pair(build_causal_lm(arch, tokenizer, size), tokenizer, path)
            built[key] = str(path)
        return built[key]

    return make


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def pref_file(tmp_path_factory):
    """pref_file(n, chat=False) -> path of a synthetic preference JSONL file."""
    from prefloop.tiny import synthetic_preferences

    def make(n: int = 32, chat: bool = False, seed: int = 0) -> str:
        path = tmp_path_factory.mktemp("data") / f"prefs-{n}-{chat}-{seed}.jsonl"
        return write_jsonl(path, synthetic_preferences(n, seed=seed, chat=chat))

    return make


def mixed_length_pairs(n: int) -> list[dict]:
    """Preference rows whose winners are longer by some words in 3 pairs of 4 and shorter in
    the 4th, so a length-neutral α exists (lr_dpo's length-control tests)."""
    return [{"prompt": f"What is {i} plus {i}?",
             "chosen": f"{i} plus {i} is {2 * i}." + (" I checked it twice." * (1 + i % 3)
                                                       if i % 4 else ""),
             "rejected": f"The sum is {2 * i + 1}." + ("" if i % 4 else " Sure, here it is.")}
            for i in range(n)]


def write_loop_world(d, tokenizer) -> None:
    """The loop tests' reward model and prompt files in `d` (the policy is the caller's)."""
    from prefloop.tiny import build_reward_model, save_pretrained_pair, synthetic_preferences

    save_pretrained_pair(build_reward_model("llama", tokenizer, "nano", seed=1), tokenizer,
                         d / "rm")
    rows = synthetic_preferences(40, seed=5, chat=True)
    write_jsonl(d / "prompts.jsonl", [{"prompt": r["prompt"], "id": f"p{i}"}
                                      for i, r in enumerate(rows)])
    write_jsonl(d / "eval.jsonl", [{"prompt": r["prompt"]} for r in
                                   synthetic_preferences(6, seed=9, chat=True)])
