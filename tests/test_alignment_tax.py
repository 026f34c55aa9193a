"""The alignment-tax step: lm-evaluation-harness on tiny local models and a task in local files.

The task is a 10-item multiple-choice addition quiz scored by log-likelihood; its scores are
checked against the models' own log-likelihoods of the choices, computed here with plain
transformers. Nothing is downloaded: the task's data is a local JSONL file.
"""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import statistics
import sys
from pathlib import Path

import pytest

from prefloop import alignment_tax as tax
from prefloop.alignment_tax import TaxConfig, evaluate_policies, run_policies
from prefloop.cli import main
from prefloop.errors import PrefloopError
from tests.conftest import write_jsonl

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TASK = "prefloop_tiny_add"


def _docs(n: int = 10) -> list[dict]:
    rng = random.Random(0)
    docs = []
    for _ in range(n):
        a, b = rng.randint(0, 49), rng.randint(0, 49)
        choices = [f"{a} plus {b} is {a + b + d}." for d in (0, 1, -2, 3)]
        rng.shuffle(choices)
        docs.append({"a": a, "b": b, "choices": choices,
                     "label": choices.index(f"{a} plus {b} is {a + b}.")})
    return docs


def _context(doc: dict) -> str:
    return f"Question: What is {doc['a']} plus {doc['b']}?\nAnswer:"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """An lm_eval task in local files: YAML + JSONL (data_files needs an absolute path)."""
    d = tmp_path_factory.mktemp("lm_eval_task")
    write_jsonl(d / "data.jsonl", _docs())
    (d / f"{TASK}.yaml").write_text(f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / 'data.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: What is {{{{a}}}} plus {{{{b}}}}?\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
""")
    return d


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> dict[str, str]:
    """Two tiny Llamas that differ only in their random weights (seed 0 and 1)."""
    from prefloop.tiny import build_causal_lm, save_pretrained_pair

    d = tmp_path_factory.mktemp("tax_models")
    return {name: str(save_pretrained_pair(build_causal_lm("llama", tokenizer, "nano",
                                                           seed=seed), tokenizer, d / name))
            for name, seed in (("pi0", 0), ("pi2", 1))}


def _run_dir(root: Path, models: dict[str, str]) -> Path:
    """A run directory as `prefloop run` lays it out, as far as this step reads it."""
    run = root / "run"
    run.mkdir()
    (run / "config.yaml").write_text(f"name: tax\npolicy: {models['pi0']}\n")
    shutil.copytree(models["pi2"], run / "iter_2" / "policy")
    (run / "iter_1").mkdir()  # an iteration without a trained policy (interrupted)
    return run


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, models, task_dir):
    run = _run_dir(tmp_path_factory.mktemp("tax_run"), models)
    cfg = TaxConfig(tasks=[TASK], include_path=str(task_dir), batch_size=3, device="cpu")
    summary = evaluate_policies(cfg, run_policies(run, "last"), run, echo=lambda _: None)
    return run, cfg, summary


def _own_scores(model_path: str, docs: list[dict]) -> dict[str, float]:
    """acc and acc_norm from the model's log-likelihood of each choice after the question,
    computed with plain transformers (lm_eval's definitions: argmax of the summed
    log-likelihood, and of it divided by the choice's length in characters)."""
    per_doc = _own_per_document(model_path, docs)
    return {metric: sum(values) / len(docs) for metric, values in per_doc.items()}


def _own_per_document(model_path: str, docs: list[dict]) -> dict[str, list[float]]:
    """Each document's acc and acc_norm (1.0 / 0.0), as `_own_scores` defines them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path).eval()
    acc, acc_norm = [], []
    for doc in docs:
        ctx = _context(doc)
        lls = []
        for choice in doc["choices"]:
            n_ctx = len(tok(ctx, add_special_tokens=False).input_ids)
            ids = tok(ctx + " " + choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
            lls.append(sum(logp[i - 1, ids[i]].item() for i in range(n_ctx, len(ids))))
        acc.append(float(max(range(4), key=lambda i: lls[i]) == doc["label"]))
        norm = [ll / len(c) for ll, c in zip(lls, doc["choices"], strict=True)]
        acc_norm.append(float(max(range(4), key=lambda i: norm[i]) == doc["label"]))
    return {"acc": acc, "acc_norm": acc_norm}


def _mean_se(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1))  # lm_eval's mean_stderr: sample std / √n


# ----------------------------------------------------------------------- the numbers


def test_scores_are_each_models_own_loglikelihood_accuracy(evaluated, models):
    run, _, _ = evaluated
    own = {}
    for name, t in (("pi0", 0), ("pi2", 2)):
        record = json.loads((run / f"iter_{t}" / "alignment_tax.json").read_text())
        assert record["iteration"] == t and record["samples"] == {TASK: 10}
        own[t] = _own_scores(models[name], _docs())
        for metric in ("acc", "acc_norm"):
            score = record["scores"][TASK][metric]
            assert score["value"] == pytest.approx(own[t][metric], abs=1e-9), (name, metric)
            assert score["stderr"] == pytest.approx(_mean_se(own[t][metric], 10))
            assert score["higher_is_better"] is True
    # two different models: their own results, not one model's twice
    assert own[0]["acc"] != own[2]["acc"]


def test_files_and_summary_hold_each_delta(evaluated, models):
    run, _, summary = evaluated
    assert summary == json.loads((run / "alignment_tax_summary.json").read_text())
    assert summary["models"] == {"0": models["pi0"], "2": str(run / "iter_2" / "policy")}
    assert summary["files"] == {"0": "iter_0/alignment_tax.json",
                                "2": "iter_2/alignment_tax.json"}
    assert not (run / "iter_1" / "alignment_tax.json").exists()
    scores = {t: json.loads((run / f"iter_{t}" / "alignment_tax.json").read_text())["scores"]
              for t in (0, 2)}
    later = [r for r in summary["rows"] if r["iteration"] == 2]
    assert sorted(r["metric"] for r in later) == ["acc", "acc_norm"]
    # both models answer the same 10 documents: Δ's standard error is paired by document,
    # sd(v₂ − v₀)/√10 from each document's own result
    own = {t: _own_per_document(models[name], _docs()) for name, t in (("pi0", 0), ("pi2", 2))}
    for r in later:
        b, s = scores[0][TASK][r["metric"]], scores[2][TASK][r["metric"]]
        assert (r["baseline"], r["value"]) == (b["value"], s["value"])
        assert r["delta"] == pytest.approx(s["value"] - b["value"]) and r["delta"] != 0
        diffs = [v2 - v0 for v0, v2 in zip(own[0][r["metric"]], own[2][r["metric"]],
                                           strict=True)]
        assert r["delta_paired"] is True
        assert r["delta_stderr"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(10))
        assert r["delta_stderr"] != pytest.approx(math.hypot(b["stderr"], s["stderr"]))
    assert all(r["delta"] == 0 for r in summary["rows"] if r["iteration"] == 0)
    settings = json.loads((run / "iter_2" / "alignment_tax.json").read_text())["settings"]
    assert settings["tasks"] == [TASK] and settings["model"].startswith("dir:")


def test_delta_stderr_is_paired_by_document_where_both_records_allow():
    def record(per_doc: list | None, documents: str = "d1", value: float | None = None,
               se: float | None = 0.1) -> dict:
        if value is None:
            value = sum(v for _, v in per_doc) / len(per_doc) if per_doc else 0.5
        r = {"scores": {"t": {"acc": {"value": value, "stderr": se}}}}
        if per_doc is not None:
            r["per_document"] = {"t": {"documents": documents, "acc": per_doc}}
        return r

    base = record([[0, 1.0], [1, 0.0], [2, 1.0], [3, 1.0]])  # 0.75
    later = record([[0, 1.0], [1, 1.0], [2, 0.0], [3, 1.0]])  # 0.75; diffs 0, 1, −1, 0
    row = next(r for r in tax.tax_rows({0: base, 3: later}) if r["iteration"] == 3)
    # sd of (0, 1, −1, 0) = √(2/3); / √4
    assert row["delta"] == 0 and row["delta_paired"] is True
    assert row["delta_stderr"] == pytest.approx(math.sqrt(2 / 3) / 2)
    assert tax.format_delta(row) == "+0.0000 ± 0.4082"
    # independent (and marked so) for: a record without per-document values, other
    # document ids, the same ids of other documents (another digest), malformed values
    for other in (record(None), record([[0, 1.0], [1, 0.0], [5, 1.0], [6, 0.0]]),
                  record([[0, 1.0], [1, 1.0], [2, 0.0], [3, 1.0]], documents="d2"),
                  record([[0, "x"], [1, 1.0], [2, 0.0], [3, 1.0]], value=0.5)):
        row = next(r for r in tax.tax_rows({0: base, 3: other}) if r["iteration"] == 3)
        assert row["delta_paired"] is False
        assert row["delta_stderr"] == pytest.approx(math.hypot(0.1, 0.1))
        assert tax.format_delta(row).split(" ± ")[1].startswith("0.1414 (independent")
    assert tax.paired_stderr([[0, 1.0]], [[0, 0.0]]) is None  # one document: no spread
    # the same ids, one of them twice: which value is the document's is unknown
    assert tax.paired_stderr([[0, 1.0], [0, 0.0], [1, 1.0]], [[0, 1.0], [1, 0.0]]) is None
    assert tax.paired_stderr([[0, 1.0], [1, 1.0]], [[0, 1.0], [1, 0.0], [1, 1.0]]) is None


def _record(settings: dict, value: float, documents: str = "d1") -> dict:
    per_doc = [[0, value], [1, 1.0], [2, 0.0], [3, value]]
    return {"settings": settings, "scores": {"t": {"acc": {"value": (2 * value + 1) / 4,
                                                           "stderr": 0.1}}},
            "per_document": {"t": {"documents": documents, "acc": per_doc}}}


def test_only_records_of_the_baselines_settings_are_compared():
    """A π_t evaluated 0-shot against a π₀ evaluated again 5-shot was shown as a paired Δ."""
    zero, five = {"model": "a", "num_fewshot": 0}, {"model": "b", "num_fewshot": 5}
    records = {0: _record({**five, "model": "p0"}, 1.0), 1: _record(zero, 0.0),
               2: _record({**five, "model": "p2"}, 0.0)}
    assert tax.other_settings(records) == [1]
    assert {r["iteration"] for r in tax.tax_rows(records)} == {0, 2}


def test_delta_over_other_documents_is_marked():
    records = {0: _record({}, 1.0), 2: _record({}, 0.0, documents="d2")}
    row = next(r for r in tax.tax_rows(records) if r["iteration"] == 2)
    assert row["other_documents"] and not row["delta_paired"]
    assert tax.format_delta(row) == ("-0.5000 ± 0.1414 (independent; other documents than "
                                     "π₀'s)")
    same = next(r for r in tax.tax_rows({0: records[0], 2: _record({}, 0.0)})
                if r["iteration"] == 2)
    assert not same["other_documents"] and same["delta_paired"]


def test_report_names_the_iterations_of_other_settings(tmp_path):
    from types import SimpleNamespace

    from prefloop.report import _alignment_tax_html

    run = tmp_path / "run"
    for t, record in ((0, _record({"num_fewshot": 5}, 1.0)), (1, _record({"num_fewshot": 0}, 0.0)),
                      (2, _record({"num_fewshot": 5}, 0.0))):
        (run / f"iter_{t}").mkdir(parents=True)
        (run / f"iter_{t}" / "alignment_tax.json").write_text(json.dumps(record))
    page = _alignment_tax_html([SimpleNamespace(name="r", path=run)])
    assert "Not compared with π₀: iter_1, evaluated with other settings" in page
    assert page.count("<tr><td>t</td>") == 1  # iter_2's row only


@pytest.mark.parametrize(("per_document", "field"), [
    (None, "per_document"),
    ({"t": {"acc": [[0, 1.0]]}}, "per_document.t.documents"),
    ({"t": {"documents": "d1", "acc": [[0, "x"]]}}, "per_document.t.acc"),
    ({"t": {"documents": "d1", "acc": [["0", 1.0]]}}, "per_document.t.acc"),
    ({"t": {"documents": "d1", "acc": {"0": 1.0}}}, "per_document.t.acc"),
])
def test_a_malformed_per_document_field_is_named(tmp_path, per_document, field):
    """A broken per_document was kept as it was and every Δ silently read "(independent)"."""
    run = tmp_path / "run"
    (run / "iter_0").mkdir(parents=True)
    record = {**_record({}, 1.0), "per_document": per_document}
    (run / "iter_0" / "alignment_tax.json").write_text(json.dumps(record))
    with pytest.raises(PrefloopError, match=rf"iter_0/alignment_tax.json, field "
                                            rf"'{re.escape(field)}': .*--overwrite"):
        tax.load_results(run)


def test_per_document_values_only_for_metrics_that_are_their_mean():
    import numpy as np

    output = {"samples": {"t": [
        {"doc_id": 1, "filter": "none", "acc": False, "ppl": [3.0, 1.0], "doc_hash": "h1"},
        {"doc_id": 0, "filter": "none", "acc": True, "ppl": [1.0, 2.0], "doc_hash": "h0"},
        {"doc_id": 0, "filter": "strict", "exact_match": np.float32(1.0), "doc_hash": "h0"},
        {"doc_id": 1, "filter": "strict", "exact_match": np.int64(1), "doc_hash": "h1"},
    ]}}
    scores = {"t": {"acc": {"value": 0.5}, "ppl": {"value": 4.2},
                    "exact_match,strict": {"value": 1.0}, "bleu": {"value": 0.3}}}
    import hashlib

    digest = hashlib.sha256(b"h0\nh1").hexdigest()[:16]  # the documents in doc_id order
    assert tax._per_document(output, scores) == {"t": {
        "documents": digest, "acc": [[0, 1.0], [1, 0.0]],
        "exact_match,strict": [[0, 1.0], [1, 1.0]]}}
    scores["t"]["acc"]["value"] = 0.7  # not the documents' mean: a corpus-level aggregate
    assert "acc" not in tax._per_document(output, scores)["t"]


def test_limit_and_few_shot_reach_lm_eval(models, task_dir, tmp_path):
    cfg = TaxConfig(tasks=[TASK], include_path=str(task_dir), limit=4, num_fewshot=1,
                    device="cpu")
    summary = evaluate_policies(cfg, {0: models["pi0"]}, tmp_path, echo=lambda _: None)
    record = json.loads((tmp_path / "iter_0" / "alignment_tax.json").read_text())
    assert record["samples"] == {TASK: 4} and record["num_fewshot"] == {TASK: 1}
    assert record["settings"]["limit"] == 4 and record["settings"]["num_fewshot"] == 1
    # only π₀: its rows are shown, with Δ 0
    assert [(r["iteration"], r["delta"]) for r in summary["rows"]] == [(0, 0.0), (0, 0.0)]


# ------------------------------------------------------------------- re-runs and the CLI


def test_rerun_keeps_finished_models_and_redoes_on_overwrite_or_new_settings(
        evaluated, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    shutil.copytree(evaluated[0], run)
    calls = []
    real = tax.evaluate_model
    monkeypatch.setattr(tax, "evaluate_model",
                        lambda cfg, model: calls.append(model) or real(cfg, model))
    before = (run / "iter_2" / "alignment_tax.json").read_text()
    argv = ["alignment-tax", str(run), "--tasks", TASK, "--include-path",
            evaluated[1].include_path, "--device", "cpu", "-q"]
    assert main(argv) == 0
    assert calls == []  # both files matched: nothing evaluated
    out = capsys.readouterr().out
    row = next(r for r in evaluated[2]["rows"] if r["iteration"] == 2 and r["metric"] == "acc")
    assert re.search(rf"{TASK} +│ +acc │ +2 │ +{row['baseline']:.4f} │ +{row['value']:.4f} │ "
                     rf"+{row['delta']:+.4f} ± {row['delta_stderr']:.4f}", out), out
    assert (run / "iter_2" / "alignment_tax.json").read_text() == before

    assert main([*argv, "--overwrite"]) == 0
    assert sorted(calls) == sorted([evaluated[2]["models"]["0"], str(run / "iter_2" / "policy")])
    calls.clear()
    assert main([*argv, "--limit", "5"]) == 0  # other settings: evaluated again
    assert len(calls) == 2
    assert json.loads((run / "iter_2" / "alignment_tax.json").read_text())["samples"] == {
        TASK: 5}
    calls.clear()
    (run / "iter_2" / "policy" / "model.safetensors").touch()  # retrained in place
    assert main([*argv, "--limit", "5"]) == 0
    assert calls == [str(run / "iter_2" / "policy")]
    # an edited task file (the YAML here) is a new task: evaluated again, not kept
    tasks = tmp_path / "tasks"
    shutil.copytree(evaluated[1].include_path, tasks)
    moved = [*argv[:4], "--include-path", str(tasks), "--device", "cpu", "-q", "--limit", "5"]
    assert main(moved) == 0
    calls.clear()
    assert main(moved) == 0 and calls == []
    yaml_file = tasks / f"{TASK}.yaml"
    yaml_file.write_text(yaml_file.read_text() + "# edited\n")
    assert main(moved) == 0 and len(calls) == 2
    # a file written before per-document values were kept: evaluated again, so that Δ's
    # standard error can be paired
    calls.clear()
    old = json.loads((run / "iter_0" / "alignment_tax.json").read_text())
    del old["per_document"]
    (run / "iter_0" / "alignment_tax.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert main(moved) == 0 and calls == [evaluated[2]["models"]["0"]]
    # said even with -q (which every command gets when stderr is not a terminal: in logs)
    assert "written before per-document values were kept" in capsys.readouterr().out
    # a broken file is an error naming it, and --overwrite writes it again without reading it
    calls.clear()
    broken = run / "iter_2" / "alignment_tax.json"
    broken.write_text(json.dumps({**json.loads(broken.read_text()), "per_document": []}))
    assert main(moved) == 2  # a user error's exit status
    assert "iter_2/alignment_tax.json, field 'per_document'" in capsys.readouterr().err
    assert main([*moved, "--overwrite"]) == 0 and len(calls) == 2
    assert isinstance(json.loads(broken.read_text())["per_document"], dict)


def test_run_policies_finds_pi0_and_trained_iterations(evaluated, models):
    run = evaluated[0]
    pi2 = str(run / "iter_2" / "policy")
    assert run_policies(run, "last") == run_policies(run, "all") == {0: models["pi0"], 2: pi2}
    assert run_policies(run, [0]) == {0: models["pi0"]}
    with pytest.raises(PrefloopError, match=r"iter_1/policy: no trained policy \(iterations "
                                            r"with one: 2\)"):
        run_policies(run, [1, 2])
    with pytest.raises(PrefloopError, match=r"config\.yaml: not found"):
        run_policies(run / "iter_2", "last")


# ------------------------------------------------------------------------------ errors


def test_unknown_task_names_close_matches(models, task_dir, tmp_path, capsys):
    cfg = TaxConfig(tasks=["prefloop_tiny_ad"], include_path=str(task_dir))
    with pytest.raises(PrefloopError, match="unknown lm_eval task 'prefloop_tiny_ad'; close "
                                            f"matches: {TASK}"):
        evaluate_policies(cfg, {0: models["pi0"]}, tmp_path)
    run = _run_dir(tmp_path, models)
    # lm_eval's own tasks are listed too (the include path only adds to them)
    assert main(["alignment-tax", str(run), "--tasks", "arc_easyy", "--include-path",
                 str(task_dir)]) == 2
    err = capsys.readouterr().err
    assert "unknown lm_eval task 'arc_easyy'; close matches: arc_easy" in err
    assert len(err.strip().splitlines()) == 1
    assert not list(run.glob("**/alignment_tax*.json"))  # checked before any model ran


def test_missing_lm_eval_names_the_extra(models, task_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    cfg = TaxConfig(tasks=[TASK], include_path=str(task_dir))
    with pytest.raises(PrefloopError, match=re.escape("pip install 'prefloop[lm-eval]'")):
        evaluate_policies(cfg, {0: models["pi0"]}, tmp_path)
    run = _run_dir(tmp_path, models)
    assert main(["alignment-tax", str(run), "--tasks", TASK]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "prefloop[lm-eval]" in err


@pytest.mark.parametrize(("changes", "message"), [
    ({}, "alignment_tax.tasks: required"),
    ({"tasks": "arc_easy"}, "alignment_tax.tasks: expected a list"),
    ({"iterations": "first"}, "alignment_tax.iterations: 'first' is not"),
    ({"iterations": [-1]}, "alignment_tax.iterations: expected iterations ≥ 0"),
    ({"limit": 0}, "alignment_tax.limit: expected"),
    ({"limit": 2.5}, "alignment_tax.limit: expected"),
    ({"num_fewshot": -1}, "alignment_tax.num_fewshot: expected an integer ≥ 0"),
    ({"batch_size": 0}, "alignment_tax.batch_size: expected"),
    ({"include_path": "/no/such/dir"}, "alignment_tax.include_path: /no/such/dir: not a dir"),
    ({"model_args": {"pretrained": "x"}}, "alignment_tax.model_args: pretrained are set"),
])
def test_validate_names_the_key(changes, message):
    cfg = TaxConfig(**{"tasks": [] if not changes else ["t"], **changes})
    with pytest.raises(PrefloopError, match=re.escape(message)):
        cfg.validate()


def test_cli_errors_name_the_option(evaluated, capsys):
    run = str(evaluated[0])
    for argv, message in ((["--num-fewshot", "-1"], "--num-fewshot: expected an integer ≥ 0"),
                          (["--iterations", "2,x"], "--iterations: '2,x' is not"),
                          (["--batch-size", "big"], "--batch-size: 'big' is not"),
                          (["--include-path", "/no/dir"], "--include-path: /no/dir")):
        assert main(["alignment-tax", run, "--tasks", TASK, *argv]) == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------ report


def test_report_of_a_real_run_shows_the_tax_section(model_dir, task_dir, tmp_path, capsys):
    from html.parser import HTMLParser

    from prefloop.report import write_report

    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"What is {a} plus {a + 3}?\n"} for a in range(4)])
    run = tmp_path / "run"
    assert main(["run", f"policy={model_dir('llama', 'nano')}", f"prompts.path={prompts}",
                 f"run_dir={run}", "iterations=1", "reward.type=function",
                 "reward.function=tests.reward_functions:length_and_letters",
                 "sampling.num_samples=2", "sampling.max_new_tokens=6", "training.batch_size=2",
                 "training.lr=5e-2", f"eval.prompts.path={prompts}",
                 "eval.sampling.max_new_tokens=6", "-q"]) == 0
    assert "alignment-tax" not in write_report([run]).read_text()  # no files: no section

    assert main(["alignment-tax", str(run), "--tasks", TASK, "--include-path", str(task_dir),
                 "--iterations", "1", "-q"]) == 0
    capsys.readouterr()
    page = write_report([run]).read_text()

    class Section(HTMLParser):
        def __init__(self):
            super().__init__()
            self.inside, self.rows, self.cell = False, [], None

        def handle_starttag(self, tag, attrs):
            if tag == "section" and ("id", "alignment-tax") in attrs:
                self.inside = True
            elif self.inside and tag == "tr":
                self.rows.append([])
            elif self.inside and tag == "td":
                self.cell = ""

        def handle_endtag(self, tag):
            if tag == "section":
                self.inside = False
            elif tag == "td" and self.cell is not None:
                self.rows[-1].append(self.cell)
                self.cell = None

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

    parser = Section()
    parser.feed(page)
    shown = [r for r in parser.rows if r]
    records = {t: json.loads((run / f"iter_{t}" / "alignment_tax.json").read_text())
               for t in (0, 1)}
    expected = []
    for metric in ("acc", "acc_norm"):
        b, s = records[0]["scores"][TASK][metric], records[1]["scores"][TASK][metric]
        diffs = [v1 - v0 for (_, v0), (_, v1) in zip(
            records[0]["per_document"][TASK][metric], records[1]["per_document"][TASK][metric],
            strict=True)]
        expected.append([TASK, metric, "1", f"{b['value']:.4f} ± {b['stderr']:.4f}",
                         f"{s['value']:.4f} ± {s['stderr']:.4f}",
                         f"{s['value'] - b['value']:+.4f} ± "
                         f"{statistics.stdev(diffs) / math.sqrt(len(diffs)):.4f}"])
    assert shown == expected


def test_the_loop_runs_the_step_on_chosen_iterations(model_dir, task_dir, tmp_path):
    """`alignment_tax.tasks` in a run config: π₀ and the chosen policies evaluated as a
    stage of the loop, their scores in metrics.jsonl, the summary holding every one of them,
    the stage skipped on a re-run."""
    from prefloop.loop import load_run_config, plan, run

    prompts = write_jsonl(tmp_path / "prompts.jsonl",
                          [{"prompt": f"What is {a} plus {a + 3}?\n"} for a in range(4)])
    args = [f"policy={model_dir('llama', 'nano')}", f"prompts.path={prompts}",
            f"run_dir={tmp_path / 'run'}", "iterations=3", "reward.type=function",
            "reward.function=tests.reward_functions:length_and_letters",
            "sampling.num_samples=2", "sampling.max_new_tokens=6", "training.batch_size=2",
            f"eval.prompts.path={prompts}", "eval.sampling.max_new_tokens=6",
            f"alignment_tax.tasks=[{TASK}]", f"alignment_tax.include_path={task_dir}",
            "alignment_tax.iterations=[1, 3]", "alignment_tax.batch_size=3",
            "alignment_tax.device=cpu"]
    cfg = load_run_config(None, args)
    assert dict(plan(cfg))["alignment tax"] == f"lm_eval {TASK} on π₀ and iterations 1, 3"
    result = run(cfg, progress=False)
    out = tmp_path / "run"
    assert [k for k in result.stages_run if k.endswith("alignment_tax")] == \
        ["iter_1/alignment_tax", "iter_3/alignment_tax"]
    assert sorted(p.parent.name for p in out.glob("iter_*/alignment_tax.json")) == \
        ["iter_0", "iter_1", "iter_3"]
    summary = json.loads((out / "alignment_tax_summary.json").read_text())
    assert sorted(summary["files"]) == ["0", "1", "3"]  # every policy, not the last call's
    assert {r["iteration"] for r in summary["rows"]} == {0, 1, 3}
    metrics = {m["iteration"]: m for m in json.loads(
        "[" + ",".join((out / "metrics.jsonl").read_text().split("\n")[:-1]) + "]")}
    for t in (0, 1, 3):
        scores = json.loads((out / f"iter_{t}" / "alignment_tax.json").read_text())["scores"]
        assert metrics[t]["alignment_tax"] == {
            TASK: {m: v["value"] for m, v in scores[TASK].items()}}
    assert "alignment_tax" not in metrics[2]
    assert run(cfg, progress=False).stages_run == []


@pytest.mark.parametrize(("extra", "message"), [
    (["alignment_tax.limit=5"], "alignment_tax.limit: set without alignment_tax.tasks"),
    ([f"alignment_tax.tasks=[{TASK}]", "alignment_tax.iterations=[4]"],
     "alignment_tax.iterations: 4 is past the run's last iteration"),
])
def test_run_config_refuses_tax_options_that_do_not_apply(extra, message):
    from prefloop.errors import PrefloopError
    from prefloop.loop import load_run_config

    with pytest.raises(PrefloopError, match=message):
        load_run_config(None, ["policy=p", "prompts.path=x.jsonl", "iterations=3",
                               "reward.model=rm", *extra]).validate()


def test_an_unknown_task_fails_the_dry_run_and_the_run_before_any_stage(model_dir, task_dir,
                                                                         tmp_path):
    from prefloop.errors import PrefloopError
    from prefloop.loop import load_run_config, plan, run

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "What is 1 plus 2?\n"}] * 2)
    cfg = load_run_config(None, [
        f"policy={model_dir('llama', 'nano')}", f"prompts.path={prompts}",
        f"run_dir={tmp_path / 'run'}", "iterations=1", "reward.type=function",
        "reward.function=tests.reward_functions:length_and_letters",
        f"alignment_tax.tasks=[{TASK}x]", f"alignment_tax.include_path={task_dir}"])
    for attempt in (plan, lambda c: run(c, progress=False)):
        with pytest.raises(PrefloopError, match=rf"{TASK}x.*{TASK}"):
            attempt(cfg)
    assert not (tmp_path / "run").exists()
