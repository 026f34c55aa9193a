"""The bad-input catalogue: every case goes through the real CLI and must end in exactly one
line on stderr naming the file, row and field where there is one, exit status 2, no
traceback, and no half-written artifact (no output, no temporary, no `.partial`)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from prefloop.cli import main
from tests.conftest import write_jsonl

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GOOD = {"prompt": "What is 1 plus 2?\n", "chosen": "1 plus 2 is 3.", "rejected": "It is 4."}
CHAT = {"prompt": [{"role": "user", "content": "What is 1 plus 2?"}],
        "chosen": [{"role": "assistant", "content": "1 plus 2 is 3."}],
        "rejected": [{"role": "assistant", "content": "It is 4."}]}


# reward functions named as tests.test_bad_input:NAME
def nan_at_five(prompts: list, responses: list[str]) -> list[float]:
    return [float("nan") if r == "five" else 1.0 for r in responses]


def inf_everywhere(prompts: list, responses: list[str]) -> list[float]:
    return [float("inf") for _ in responses]


def one_score_only(prompts: list, responses: list[str]) -> list[float]:
    return [1.0]


def words(prompts: list, responses: list[str]) -> list[str]:
    return ["high" for _ in responses]


@pytest.fixture(scope="module")
def models(model_dir, tmp_path_factory) -> dict[str, str]:
    """The tiny policy, a copy whose tokenizer has no chat template, and one with only
    pickle weights."""
    from safetensors.torch import load_file

    policy = Path(model_dir("llama", "nano"))
    d = tmp_path_factory.mktemp("bad-models")
    plain = d / "no-template"
    shutil.copytree(policy, plain)
    (plain / "chat_template.jinja").unlink()
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    pickled = d / "pickled"
    shutil.copytree(policy, pickled)
    import torch

    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    return {"policy": str(policy), "no_template": str(plain), "pickled": str(pickled)}


def fails(capsys, argv: list[str], *expected: str, out: Path | None = None) -> str:
    """Run the CLI; assert exit 2 and one clean line containing every `expected` text, and
    that `out` (if given) was not created and nothing temporary is left beside it."""
    code = main(argv)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("prefloop: error: ")
    assert "Traceback" not in captured.err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    if out is not None:
        assert not out.exists(), out
        leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".")]
        assert not leftovers, leftovers
    return lines[0]


def train(models, data: Path | str, out: Path, *extra: str, model: str | None = None):
    return ["train", f"model={model or models['policy']}", f"data.path={data}",
            f"output_dir={out}", "training.max_steps=1", "training.batch_size=2", "-q", *extra]


def prefs(tmp_path: Path, rows: list, name: str = "prefs.jsonl") -> Path:
    return Path(write_jsonl(tmp_path / name, rows))


# ---------------------------------------------------------------- preference data


@pytest.mark.parametrize("row, field, text", [
    ({"prompt": "q", "rejected": "b"}, "chosen", "missing column"),
    ({"prompt": "q", "good": "a", "bad": "b"}, "chosen", "data.chosen_column"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "prompt", "empty text"),
    ({"prompt": "q", "chosen": "a", "rejected": "   "}, "rejected", "empty text"),
    ({"prompt": "q", "chosen": 42, "rejected": "b"}, "chosen", "got int"),
    ({"prompt": "q", "chosen": "a", "rejected": None}, "rejected", "got NoneType"),
    ({"prompt": [], "chosen": "a", "rejected": "b"}, "prompt", "got list"),
    ({"prompt": ["q"], "chosen": "a", "rejected": "b"}, "prompt", "message 0 is not"),
    ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "prompt",
     "message 0 is not a {'role', 'content'} mapping of strings: {'role': 'user'}"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "chosen_target": "high"},
     "chosen_target", "expected a number"),
], ids=["missing-column", "misnamed-columns", "empty-prompt", "blank-response",
        "number-response", "null-response", "empty-message-list", "list-of-strings",
        "message-without-content",
        "non-numeric-extra"])
def test_bad_preference_row_names_file_row_and_field(models, tmp_path, capsys, row, field,
                                                     text):
    data = prefs(tmp_path, [GOOD, GOOD, row])
    fails(capsys, train(models, data, tmp_path / "out"), f"{data}, line 3, field {field!r}",
          text, out=tmp_path / "out")


def test_mapped_column_that_does_not_exist(models, tmp_path, capsys):
    data = prefs(tmp_path, [GOOD, GOOD])
    fails(capsys, train(models, data, tmp_path / "out", "data.chosen_column=good"),
          f"{data}, line 1, field 'good'", "missing column", out=tmp_path / "out")


def test_malformed_jsonl_line_reports_its_line_number(models, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(GOOD) + "\n\n" + '{"prompt": "q", "chosen": "a",\n')
    fails(capsys, train(models, data, tmp_path / "out"), f"{data}, line 3", "not valid JSON",
          out=tmp_path / "out")


def test_jsonl_line_that_is_not_an_object(models, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps(GOOD) + "\n" + json.dumps(["q", "a", "b"]) + "\n")
    fails(capsys, train(models, data, tmp_path / "out"), f"{data}, line 2",
          "expected a JSON object per line, got list", out=tmp_path / "out")


def test_jsonl_that_is_not_utf8(models, tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"prompt": "\xff\xfe"}\n')
    fails(capsys, train(models, data, tmp_path / "out"), f"{data}, line 2", "not UTF-8",
          out=tmp_path / "out")


def test_json_list_with_a_broken_line(models, tmp_path, capsys):
    data = tmp_path / "prefs.json"
    data.write_text("[\n" + json.dumps(GOOD) + ",\n{oops}\n]\n")
    fails(capsys, train(models, data, tmp_path / "out"), f"{data}, line 3", "not valid JSON",
          out=tmp_path / "out")


def test_mixed_plain_and_conversational_rows(models, tmp_path, capsys):
    data = prefs(tmp_path, [GOOD, CHAT])
    fails(capsys, train(models, data, tmp_path / "out"), f"{data}, line 2",
          "mixes plain-text and conversational rows", out=tmp_path / "out")


def test_missing_and_empty_data_files(models, tmp_path, capsys):
    fails(capsys, train(models, tmp_path / "nope.jsonl", tmp_path / "out"),
          f"{tmp_path / 'nope.jsonl'}: file not found", out=tmp_path / "out")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    fails(capsys, train(models, empty, tmp_path / "out"), f"{empty}: no rows",
          out=tmp_path / "out")


def test_conversational_data_needs_a_chat_template(models, tmp_path, capsys):
    data = prefs(tmp_path, [CHAT, CHAT])
    fails(capsys, train(models, data, tmp_path / "out", model=models["no_template"]),
          f"{data}, line 1, field 'prompt'", "chat template", out=tmp_path / "out")


def test_token_id_rows_are_checked(models, tmp_path, capsys):
    row = {"prompt_ids": [5, 6], "chosen_ids": [7, 1], "rejected_ids": "8 9",
           "prompt": "q", "chosen": "a", "rejected": "b"}
    data = prefs(tmp_path, [row, {**row, "rejected_ids": [8, 10**6]}])
    fails(capsys, train(models, data, tmp_path / "out"), f"{data}, line 1, field 'rejected_ids'",
          "list of token ids", out=tmp_path / "out")


# ---------------------------------------------------------------- lengths and truncation


def _long_rows(n: int) -> list[dict]:
    return [{**GOOD, "prompt": "What is 1 plus 2? " * 30 + "\n"} for _ in range(n)]


def test_too_long_with_truncation_error_names_the_row(models, tmp_path, capsys):
    data = prefs(tmp_path, [GOOD, *_long_rows(1)])
    fails(capsys, train(models, data, tmp_path / "out", "data.truncation=error",
                        "data.max_length=64", "data.max_prompt_length=32"),
          f"{data}, line 2", "exceed max_prompt_length=32", "data.truncation",
          out=tmp_path / "out")


def test_everything_skipped_is_a_clear_error(models, tmp_path, capsys):
    data = prefs(tmp_path, _long_rows(3))
    fails(capsys, train(models, data, tmp_path / "out", "data.truncation=skip",
                        "data.max_length=64", "data.max_prompt_length=32"),
          f"{data}: no preference pairs left after truncation (all 3 were skipped",
          out=tmp_path / "out")


def test_long_prompts_are_truncated_or_skipped_and_counted(models, tmp_path):
    from prefloop.config import TrainConfig, load_config
    from prefloop.trainer import train_preferences

    data = prefs(tmp_path, [GOOD, GOOD, *_long_rows(2)])
    counts = {}
    for policy in ("truncate", "skip"):
        cfg = load_config(TrainConfig, None, [
            f"model={models['policy']}", f"data.path={data}", f"output_dir={tmp_path / policy}",
            "training.max_steps=1", "training.batch_size=2", f"data.truncation={policy}",
            "data.max_length=64", "data.max_prompt_length=32"])
        counts[policy] = train_preferences(cfg, progress=False).truncation
    assert counts["truncate"]["prompts_truncated"] == 2 and counts["truncate"]["skipped"] == 0
    assert counts["skip"]["skipped"] == 2 and counts["skip"]["skipped_rows"] == [2, 3]


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("override, expected", [
    ("loss.name=nope", ["loss.name: unknown loss 'nope'", "valid losses:", "lr_dpo"]),
    ("training.lrr=1e-3", ["training.lrr: unknown config key", "valid keys here:", "lr,"]),
    ("colour=red", ["colour: unknown config key", "data, loss, model"]),
    ("loss.gamma=1", ["loss.gamma: not a parameter of loss 'lr_dpo'", "its parameters:"]),
    ("training.precision=fp8", ["training.precision: 'fp8' is not one of fp32, bf16, fp16"]),
    ("data.truncation=chop", ["data.truncation: 'chop' is not one of truncate, skip, error"]),
    ("data.max_prompt_length=2048", ["data.max_prompt_length must be smaller"]),
    ("training.batch_size=0", ["training.batch_size: must be ≥ 1"]),
    ("training.batch_size=2.5", ["training.batch_size: expected an integer, got 2.5"]),
    ("training.lr=-1", ["training.lr: must be positive"]),
    ("model=", ["model: required"]),
], ids=["unknown-loss", "unknown-key", "unknown-top-level-key", "inapplicable-loss-option",
        "bad-precision", "bad-truncation", "prompt-limit-over-total", "zero-batch",
        "fractional-batch", "negative-lr", "no-model"])
def test_bad_config_values_list_what_is_valid(models, tmp_path, capsys, override, expected):
    data = prefs(tmp_path, [GOOD, GOOD])
    fails(capsys, [*train(models, data, tmp_path / "out"), override], *expected,
          out=tmp_path / "out")


@pytest.mark.parametrize("text, expected", [
    ("training:\n  lr: fast\n", "training.lr: expected a number, got 'fast'"),
    ("training:\n  group_by_length: 3\n", "training.group_by_length: expected true or false"),
    ("loss: 5\n", "loss: expected a mapping, got 5"),
    ("- model: x\n", "expected a mapping at the top level"),
    ("training:\n  lr: 1e-3\n lr2: [\n", "line 3: not valid YAML"),
], ids=["string-for-number", "number-for-bool", "scalar-for-section", "list-at-top",
        "syntax-error"])
def test_wrong_types_in_yaml_name_the_file_and_key(models, tmp_path, capsys, text, expected):
    config = tmp_path / "cfg.yaml"
    config.write_text(text)
    data = prefs(tmp_path, [GOOD, GOOD])
    argv = train(models, data, tmp_path / "out")
    fails(capsys, [argv[0], str(config), *argv[1:]], str(config), expected, out=tmp_path / "out")


def test_missing_config_file(tmp_path, capsys):
    fails(capsys, ["train", str(tmp_path / "nope.yaml")], "nope.yaml: config file not found")


# ---------------------------------------------------------------- models


def test_missing_model_path(models, tmp_path, capsys):
    data = prefs(tmp_path, [GOOD, GOOD])
    fails(capsys, train(models, data, tmp_path / "out", model=str(tmp_path / "no-such-model")),
          "no-such-model: model directory not found", out=tmp_path / "out")


def test_directory_without_config_json(models, tmp_path, capsys):
    data = prefs(tmp_path, [GOOD, GOOD])
    (tmp_path / "empty-model").mkdir()
    fails(capsys, train(models, data, tmp_path / "out", model=str(tmp_path / "empty-model")),
          "not a model directory (no config.json)", out=tmp_path / "out")


def test_pickle_weights_are_refused(models, tmp_path, capsys):
    data = prefs(tmp_path, [GOOD, GOOD])
    fails(capsys, train(models, data, tmp_path / "out", model=models["pickled"]),
          "only from safetensors", "pytorch_model.bin", out=tmp_path / "out")


# ---------------------------------------------------------------- score and pair


def _samples(tmp_path: Path, responses: list[str]) -> Path:
    return Path(write_jsonl(tmp_path / "samples.jsonl", [
        {"prompt_id": str(i // 2), "sample_index": i % 2, "prompt": "q", "response": r,
         "num_tokens": len(r), "num_chars": len(r)} for i, r in enumerate(responses)]))


def score(path: Path, out: Path, function: str, *extra: str) -> list[str]:
    return ["score", str(path), "--reward-function", function, "--out", str(out), "-q", *extra]


def test_nan_reward_names_the_row_even_in_a_later_chunk(tmp_path, capsys):
    samples = _samples(tmp_path, ["a", "b", "c", "d", "e", "five", "g"])
    out = tmp_path / "scored.jsonl"
    # --batch-size 1 scores in chunks of 4: row 5 is the second of the second chunk
    fails(capsys, score(samples, out, "tests.test_bad_input:nan_at_five", "--batch-size", "1"),
          f"{samples}, line 6, field 'response'", "nan", "finite", out=out)


@pytest.mark.parametrize("function, expected", [
    ("inf_everywhere", ["line 1, field 'response'", "inf"]),
    ("words", ["line 1, field 'response'", "'high'", "finite number"]),
    ("one_score_only", ["returned 1 scores for 3 responses"]),
    ("no_such_function", ["has no function 'no_such_function'"]),
], ids=["inf", "not-a-number", "wrong-count", "missing-function"])
def test_bad_reward_function_output(tmp_path, capsys, function, expected):
    samples = _samples(tmp_path, ["a", "b", "c"])
    out = tmp_path / "scored.jsonl"
    fails(capsys, score(samples, out, f"tests.test_bad_input:{function}"), *expected, out=out)


def test_reward_module_that_cannot_be_imported(tmp_path, capsys):
    samples = _samples(tmp_path, ["a", "b"])
    out = tmp_path / "scored.jsonl"
    fails(capsys, score(samples, out, "no_such_module_xyz:f"), "cannot import module",
          out=out)
    fails(capsys, score(samples, out, "no_colon_here"), "expected 'module:function'", out=out)


def test_samples_missing_a_field(tmp_path, capsys):
    path = Path(write_jsonl(tmp_path / "samples.jsonl", [{"prompt": "q", "response": "a"},
                                                         {"prompt": "q"}]))
    out = tmp_path / "scored.jsonl"
    fails(capsys, score(path, out, "tests.reward_functions:constant"),
          f"{path}, line 2, field 'response': missing", out=out)


def _scored(i: int, score: float | None, response: str = "ab") -> dict:
    row = {"prompt_id": str(i // 2), "sample_index": i % 2, "prompt": "q", "response": response,
           "response_ids": [5] * len(response), "num_tokens": len(response),
           "num_chars": len(response), "score": score}
    return {k: v for k, v in row.items() if v is not None}


def test_all_scores_tied_gives_no_pairs_and_a_clear_error(tmp_path, capsys):
    scored = Path(write_jsonl(tmp_path / "scored.jsonl", [_scored(i, 1.0) for i in range(6)]))
    out = tmp_path / "pairs.jsonl"
    fails(capsys, ["pair", str(scored), "--out", str(out)], f"{scored}: no pairs",
          "all 3 prompts tied", out=out)


def test_scored_row_without_a_score(tmp_path, capsys):
    scored = Path(write_jsonl(tmp_path / "scored.jsonl", [_scored(0, 1.0), _scored(1, None)]))
    out = tmp_path / "pairs.jsonl"
    fails(capsys, ["pair", str(scored), "--out", str(out)], f"{scored}, line 2, field 'score'",
          "missing", out=out)


def test_length_penalty_that_is_not_a_number(tmp_path, capsys):
    scored = _samples(tmp_path, ["a", "b"])
    fails(capsys, ["pair", str(scored), "--length-penalty", "lots", "--out",
                   str(tmp_path / "p.jsonl")], "--length-penalty", "'lots'")


@pytest.mark.parametrize(("override", "rule"), [
    ("loss.lam=-1", "loss.lam: must be >= 0, got -1"),
    ("loss.beta=0", "loss.beta: must be > 0, got 0"),
])
def test_a_loss_parameter_out_of_range_stops_the_run_before_it_starts(models, tmp_path, capsys,
                                                                     override, rule):
    """Refused when the config is read (it was refused only at the first train stage, after
    the sampling), and no run directory is made."""
    run_dir = tmp_path / "run"
    fails(capsys, _run_args(models, tmp_path, run_dir, override), rule)
    assert not run_dir.exists()


# ---------------------------------------------------------------- the loop's run directory


def _run_args(models, tmp_path: Path, run_dir: Path, *extra: str) -> list[str]:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 plus 2?\n"}] * 2)
    return ["run", f"policy={models['policy']}", f"prompts.path={prompts}",
            f"run_dir={run_dir}", "reward.type=function",
            "reward.function=tests.reward_functions:constant", "iterations=1", "-q", *extra]


def test_resume_with_a_changed_config_is_refused(models, tmp_path, capsys):
    import yaml

    from prefloop.loop import load_run_config
    from prefloop.loop.rundir import recorded_config

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    manifest = {"config_hash": "0123456789abcdef", "seed": 0, "stages": {}}
    (run_dir / "manifest.json").write_text(json.dumps(manifest))
    argv = _run_args(models, tmp_path, run_dir)
    started = load_run_config(None, [a for a in argv[1:] if "=" in a] + ["training.lr=0.5"])
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded_config(started)))
    fails(capsys, [*argv, "--resume"], str(run_dir), "config differs", "training.lr: 0.5 →",
          "--redo-from")
    assert json.loads((run_dir / "manifest.json").read_text()) == manifest


def test_unfinished_run_needs_resume(models, tmp_path, capsys):
    import yaml

    from prefloop.config import config_hash
    from prefloop.loop import load_run_config
    from prefloop.loop.rundir import recorded_config

    run_dir = tmp_path / "run"
    argv = _run_args(models, tmp_path, run_dir)
    cfg = load_run_config(None, [a for a in argv[1:] if "=" in a])
    run_dir.mkdir()
    (run_dir / "manifest.json").write_text(json.dumps({"config_hash": config_hash(cfg),
                                                       "stages": {}}))
    (run_dir / "config.yaml").write_text(yaml.safe_dump(recorded_config(cfg)))
    fails(capsys, argv, "an unfinished run is already here", "--resume")


# ---------------------------------------------------------------- unwritable places, full disk


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_output_directory(models, tmp_path, capsys):
    data = prefs(tmp_path, [GOOD, GOOD])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        fails(capsys, train(models, data, locked / "out"), str(locked / "out"),
              "Permission denied", out=locked / "out")
        fails(capsys, _run_args(models, tmp_path, locked / "run"), str(locked / "run"),
              "Permission denied")
    finally:
        locked.chmod(0o700)


def test_read_only_run_directory(models, tmp_path, capsys, monkeypatch):
    """What an unwritable directory looks like to prefloop, simulated so that it also holds
    when the tests run as root."""
    import prefloop.io

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(prefloop.io.tempfile, "mkstemp", refuse)
    run_dir = tmp_path / "run"
    fails(capsys, _run_args(models, tmp_path, run_dir), f"{run_dir}", "Read-only file system")
    assert not (run_dir / "config.yaml").exists() and not (run_dir / "manifest.json").exists()


class _FullDisk:
    """A file object whose writes fail as on a full disk (after creating the file)."""

    def __init__(self, path, *args, **kwargs):
        self.file = open(path, *args, **kwargs)  # noqa: SIM115

    def write(self, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.file.close()


def test_full_disk_while_writing_an_artifact(tmp_path, capsys, monkeypatch):
    import prefloop.io

    scored = Path(write_jsonl(tmp_path / "scored.jsonl",
                              [_scored(i, float(i), "a" * (i + 1)) for i in range(2)]))
    monkeypatch.setattr(prefloop.io, "open", _FullDisk, raising=False)
    out = tmp_path / "pairs.jsonl"
    fails(capsys, ["pair", str(scored), "--out", str(out)],
          f"{out}: cannot write (No space left on device)", out=out)


def test_full_disk_while_exporting_a_model(models, tmp_path, capsys, monkeypatch):
    import prefloop.harness

    def export(model, tokenizer, directory):
        (Path(directory) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device",
                      str(Path(directory) / "model.safetensors"))

    monkeypatch.setattr(prefloop.harness, "export_model", export)
    data = prefs(tmp_path, [GOOD, GOOD])
    before = {p.name: p.read_bytes() for p in Path(models["policy"]).iterdir()}
    fails(capsys, train(models, data, tmp_path / "out"), "No space left on device",
          f"nothing written to {tmp_path / 'out'}", out=tmp_path / "out")
    assert {p.name: p.read_bytes() for p in Path(models["policy"]).iterdir()} == before


# ---------------------------------------------------------------- tracebacks a new user hit


@pytest.mark.parametrize("function,message", [
    ("tests.reward_functions:raises", "reward function tests.reward_functions:raises raised "
                                      "KeyError ('score') on a batch of"),
    ("tests.reward_functions:one_argument", "reward.function: tests.reward_functions:"
                                            "one_argument must take two arguments, fn(prompts"),
])
def test_a_reward_function_that_raises_or_takes_the_wrong_arguments(function, message, tmp_path,
                                                                    capsys):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "q", "response": "a",
                                                  "prompt_id": "0", "sample_index": 0}])
    fails(capsys, ["score", samples, "--reward-function", function, "--out",
                   str(tmp_path / "out.jsonl"), "-q"], message)
    assert not (tmp_path / "out.jsonl").exists()


def test_a_reward_function_from_a_file_path(tmp_path):
    from prefloop.rewards import FunctionScorer

    # a dataclass needs its module in sys.modules; a file beside it must be importable
    (tmp_path / "helpers.py").write_text("WEIGHT = -1.0\n")
    (tmp_path / "my_reward.py").write_text(
        "from dataclasses import dataclass\nfrom helpers import WEIGHT\n\n\n@dataclass\n"
        "class Rule:\n    weight: float\n\n\n"
        "def shortest(prompts, responses):\n"
        "    return [Rule(WEIGHT).weight * len(r) for r in responses]\n")
    scorer = FunctionScorer(f"{tmp_path / 'my_reward.py'}:shortest")
    assert scorer.score(["q", "q"], ["ab", "abcd"]) == [-2.0, -4.0]


def test_hub_ids_stay_hub_ids(tmp_path, monkeypatch):
    """A one-word hub id (gpt2) was read as a missing local directory."""
    from prefloop.errors import PrefloopError
    from prefloop.models import check_source

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.chdir(tmp_path)
    check_source("gpt2")
    check_source("HuggingFaceTB/SmolLM2-135M-Instruct")
    (tmp_path / "HuggingFaceTB").mkdir()  # a folder of that name here: read as local, said so
    with pytest.raises(PrefloopError, match="read as a local path because HuggingFaceTB/ exists"):
        check_source("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_a_model_directory_without_a_tokenizer(tmp_path, tokenizer, capsys):
    from prefloop.tiny import build_causal_lm

    bare = tmp_path / "bare"
    build_causal_lm("llama", tokenizer, "nano").save_pretrained(bare)  # weights, no tokenizer
    fails(capsys, ["sample", "--model", str(bare), "--prompts",
                   write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}]), "--out",
                   str(tmp_path / "s.jsonl")], f"{bare}: cannot load tokenizer")


def test_a_local_path_with_a_typo_fails_at_once(tmp_path, monkeypatch, capsys):
    """`tb/nonexist` (with a `tb/` here) went to the hub for 50 s of retries."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tb").mkdir()
    start = time.perf_counter()
    fails(capsys, ["sample", "--model", "tb/nonexist", "--prompts",
                   write_jsonl(tmp_path / "p.jsonl", [{"prompt": "q"}]), "--out", "s.jsonl"],
          "tb/nonexist: model directory not found")
    assert time.perf_counter() - start < 5


def test_jsonl_errors_count_file_lines_from_one(tmp_path, capsys):
    """One convention: a JSON error and a missing field both name the 1-based file line
    (blank lines counted), and a JSON error's position is a character, not a column."""
    path = tmp_path / "samples.jsonl"
    path.write_text('{"prompt": "q", "response": "a"}\n\n{"prompt": "q"}\n')
    out = tmp_path / "scored.jsonl"
    fails(capsys, score(path, out, "tests.reward_functions:constant"),
          f"{path}, line 3, field 'response': missing", out=out)
    path.write_text('{"prompt": "q", "response": "a"}\n{"prompt": "q" "response": "b"}\n')
    fails(capsys, score(path, out, "tests.reward_functions:constant"),
          f"{path}, line 2: not valid JSON", "at character 16", out=out)


def test_json_errors_point_at_the_line_not_past_its_end(tmp_path):
    """A cut line was reported at "character 1" (of the newline, as line 2 of the text), a
    control character as "… at at character 14"."""
    from prefloop.data import read_jsonl
    from prefloop.errors import PrefloopError

    cut = tmp_path / "cut.jsonl"
    cut.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(PrefloopError, match=r"cut\.jsonl, line 2: not valid JSON \(Expecting "
                                            r"value at character 7\)$"):
        read_jsonl(cut)
    control = tmp_path / "control.jsonl"
    control.write_text('{"prompt": "q\x01x"}\n')
    with pytest.raises(PrefloopError, match=r"\(Invalid control character at character 14\)$"):
        read_jsonl(control)
