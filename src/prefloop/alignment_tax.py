"""The alignment tax: lm-evaluation-harness scores of a run's policies against its initial one.

Preference training can cost a policy some of what it knew (the *alignment tax*). This
module runs `lm-evaluation-harness <https://github.com/EleutherAI/lm-evaluation-harness>`_
(``lm_eval.simple_evaluate`` with its ``hf`` model) on chosen policies with user-chosen
tasks, and reports per task and metric each policy's score, its difference to the initial
policy π₀ (Δ = π_t − π₀) and lm_eval's standard errors::

    cfg = TaxConfig(tasks=["arc_easy", "hellaswag"], iterations=[0, 3], limit=200)
    models = run_policies("runs/ilr", cfg.iterations)   # {0: π₀, 3: "runs/ilr/iter_3/policy"}
    summary = evaluate_policies(cfg, models, "runs/ilr")  # or: evaluate_run(cfg, "runs/ilr")

Files (written atomically; layout of the per-model file in :func:`evaluate_model`):

    OUT/iter_<t>/alignment_tax.json      one per model: its settings and scores
    OUT/alignment_tax_summary.json       every model's scores against π₀ (:func:`tax_rows`)

A model whose file exists with the same settings (tasks, limit, few-shot count, task
directory, model arguments, and the model: a hub id, or a local directory's files) is not
evaluated again unless ``overwrite``. lm_eval is an optional dependency (``pip install
'prefloop[lm-eval]'``); it is imported only when a model is evaluated, so this module and the
report import without it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefloop.errors import PrefloopError
from prefloop.io import write_json

__all__ = [
    "TaxConfig",
    "evaluate_model",
    "evaluate_policies",
    "evaluate_run",
    "load_results",
    "paired_stderr",
    "run_policies",
    "tax_rows",
]

INSTALL_HINT = "pip install 'prefloop[lm-eval]'"
ITERATION_CHOICES = ("last", "all")


@dataclass
class TaxConfig:
    """Settings of the alignment-tax step (`alignment_tax.*` in a config)."""

    tasks: list[str] = field(default_factory=list)  # lm_eval task (or group) names
    # iterations whose policy is evaluated besides π₀ (always evaluated: it is the baseline):
    # a list of t, "last" (the run's last trained policy) or "all"
    iterations: list[int] | str = "last"
    limit: int | float | None = None  # first N documents per task (a float < 1: a fraction)
    num_fewshot: int | None = None  # None: each task's own default
    batch_size: int | str = 8  # lm_eval's batch size: a number, or "auto"
    include_path: str = ""  # a directory of the user's own task YAML files
    device: str = "auto"  # auto (cuda when available, else cpu) | cpu | cuda | cuda:1 | …
    # further keyword arguments of lm_eval's HF model, e.g. {"dtype": "bfloat16"}
    model_args: dict[str, Any] = field(default_factory=dict)
    trust_remote_code: bool = False

    def validate(self, prefix: str = "alignment_tax") -> None:
        """Raise PrefloopError naming the first bad key (``alignment_tax.tasks: required``);
        prefix "--" names command-line options instead (``--num-fewshot``)."""

        def key(name: str) -> str:
            return f"--{name.replace('_', '-')}" if prefix == "--" else f"{prefix}.{name}"

        if not self.tasks:
            raise PrefloopError(f"{key('tasks')}: required (lm_eval task names, e.g. "
                                "arc_easy, hellaswag)")
        if isinstance(self.tasks, str) or not all(isinstance(t, str) and t.strip()
                                                  for t in self.tasks):
            raise PrefloopError(f"{key('tasks')}: expected a list of task names, got "
                                f"{self.tasks!r}")
        if isinstance(self.iterations, str):
            if self.iterations not in ITERATION_CHOICES:
                raise PrefloopError(f"{key('iterations')}: {self.iterations!r} is not a list "
                                    f"of iterations, 'last' or 'all'")
        elif not self.iterations or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0
                for t in self.iterations):
            raise PrefloopError(f"{key('iterations')}: expected iterations ≥ 0 (0 = the "
                                f"initial policy), 'last' or 'all'; got {self.iterations!r}")
        if self.limit is not None and (isinstance(self.limit, bool)
                                       or not isinstance(self.limit, int | float)
                                       or self.limit <= 0
                                       or (isinstance(self.limit, float) and self.limit >= 1
                                           and not self.limit.is_integer())):
            raise PrefloopError(f"{key('limit')}: expected a number of documents ≥ 1 or a "
                                f"fraction in (0, 1), got {self.limit!r}")
        if self.num_fewshot is not None and (not isinstance(self.num_fewshot, int)
                                             or self.num_fewshot < 0):
            raise PrefloopError(f"{key('num_fewshot')}: expected an integer ≥ 0, got "
                                f"{self.num_fewshot!r}")
        if not (self.batch_size == "auto" or (isinstance(self.batch_size, int)
                                              and self.batch_size >= 1)):
            raise PrefloopError(f"{key('batch_size')}: expected an integer ≥ 1 or 'auto', got "
                                f"{self.batch_size!r}")
        if self.include_path and not Path(self.include_path).is_dir():
            raise PrefloopError(f"{key('include_path')}: {self.include_path}: not a directory "
                                "(of task YAML files)")
        if not isinstance(self.device, str) or not self.device:
            raise PrefloopError(f"{key('device')}: expected auto, cpu, cuda or cuda:N")
        reserved = {"pretrained", "device", "batch_size", "trust_remote_code"} & set(
            self.model_args)
        if reserved:
            raise PrefloopError(f"{key('model_args')}: {', '.join(sorted(reserved))} are set "
                                f"by prefloop; use {prefix}.<key> or the models given")


# ------------------------------------------------------------------------- which models


def run_policies(run_dir: str | Path, iterations: Sequence[int] | str = "last") -> dict[int, str]:
    """{iteration: model} of a run directory: 0 → config.yaml's `policy` (always included,
    the baseline), t → RUN/iter_t/policy. `iterations` is a list of t, "last" or "all"."""
    from prefloop.loop.rundir import RunDir

    run = RunDir(run_dir)
    config = run.config
    if not config.is_file():
        raise PrefloopError(f"{config}: not found (is {run_dir} a prefloop run directory?)")
    import yaml

    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise PrefloopError(f"{config}: not valid YAML ({str(e).splitlines()[0]})") from None
    policy = data.get("policy") if isinstance(data, dict) else None
    if not isinstance(policy, str) or not policy:
        raise PrefloopError(f"{config}, field 'policy': missing (the initial policy π₀)")
    trained = [t for t in run.iterations_present() if run.output(t, "train").is_file()]
    if iterations == "last":
        wanted = trained[-1:]
    elif iterations == "all":
        wanted = trained
    else:
        wanted = sorted(set(iterations) - {0})
        missing = [t for t in wanted if t not in trained]
        if missing:
            have = ", ".join(map(str, trained)) or "none yet"
            raise PrefloopError(f"{run.policy(missing[0])}: no trained policy (iterations "
                                f"with one: {have})")
    return {0: policy, **{t: str(run.policy(t)) for t in wanted}}


# -------------------------------------------------------------------------- evaluation


def require_lm_eval() -> Any:
    """The `lm_eval` module, or one line saying how to install it."""
    try:
        import lm_eval
        import lm_eval.tasks
    except ImportError as e:
        raise PrefloopError(f"the alignment tax needs lm-evaluation-harness, which is not "
                            f"installed ({e}): {INSTALL_HINT}") from None
    return lm_eval


_TASK_MANAGERS: dict[str, Any] = {}


def task_manager(include_path: str = "") -> Any:
    """lm_eval's TaskManager (indexing its thousands of task files takes seconds: one per
    include path and process)."""
    lm_eval = require_lm_eval()
    key = str(Path(include_path).resolve()) if include_path else ""
    if key not in _TASK_MANAGERS:
        _TASK_MANAGERS[key] = lm_eval.tasks.TaskManager(include_path=key or None)
    return _TASK_MANAGERS[key]


def check_tasks(names: Sequence[str], manager: Any) -> None:
    """Refuse a task name lm_eval does not know, naming the close matches."""
    known = manager.all_tasks
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
            hint = f"; close matches: {', '.join(close)}" if close else ""
            raise PrefloopError(f"unknown lm_eval task {name!r}{hint} (all names: lm-eval "
                                "ls tasks; tasks in your own YAML files: include_path, "
                                "--include-path DIR)")


def _device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _limit(limit: int | float | None) -> int | float | None:
    """lm_eval reads a float as a fraction of each task's documents only below 1."""
    return int(limit) if isinstance(limit, float) and limit >= 1 else limit


def model_identity(model: str) -> str:
    """A hub id as it is; a local directory as `dir:HASH` of its weight and JSON files' names,
    sizes and modification times: a policy retrained in place is a new model, a run directory
    moved elsewhere (`cp -a`, `mv`) is the same one."""
    path = Path(model)
    if not path.is_dir():
        return model
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json")):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return f"dir:{h.hexdigest()[:16]}"


def _contents_hash(directory: str) -> str:
    """A hash of the user's task files (every file under `directory`, names and bytes): an
    edited task or its data is evaluated again. The data files a YAML names elsewhere by an
    absolute path are not followed."""
    if not directory or not Path(directory).is_dir():
        return ""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(directory).rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(directory)}\0".encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def settings(cfg: TaxConfig, model: str) -> dict[str, Any]:
    """What a model's scores depend on (batch size and device only change rounding); a
    stored file with other settings is evaluated again."""
    s = {"model": model_identity(model), "tasks": list(cfg.tasks), "limit": cfg.limit,
         "num_fewshot": cfg.num_fewshot,
         "include_path": str(Path(cfg.include_path).resolve()) if cfg.include_path else "",
         "include_files": _contents_hash(cfg.include_path),
         "model_args": dict(cfg.model_args), "trust_remote_code": cfg.trust_remote_code}
    return json.loads(json.dumps(s))  # as it reads back from the file


def _number(value: Any) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _scores(output: dict) -> dict[str, dict[str, dict[str, Any]]]:
    """{task: {metric: {value, stderr, higher_is_better}}} from simple_evaluate's output;
    lm_eval's keys "acc,none" → "acc", other filters kept: "exact_match,strict-match"."""
    better = output.get("higher_is_better") or {}
    scores: dict[str, dict[str, dict[str, Any]]] = {}
    for task, entry in output["results"].items():
        metrics = {}
        for key, value in entry.items():
            if "," not in key or "_stderr," in key or _number(value) is None:
                continue
            name, filt = key.split(",", 1)
            metrics[name if filt == "none" else key] = {
                "value": _number(value),
                "stderr": _number(entry.get(f"{name}_stderr,{filt}")),
                "higher_is_better": (better.get(task) or {}).get(name),
            }
        if metrics:
            scores[task] = metrics
    return scores


def _document_value(value: Any) -> float | None:
    """A per-document metric value as a float: numbers, numpy scalars and booleans (lm_eval
    tasks return `pred == gold` as a bool); None for anything else (tuples of corpus-level
    metrics, strings, non-finite values)."""
    if isinstance(value, str | bytes) or not hasattr(value, "__float__"):
        return None
    try:
        return _number(float(value))
    except (TypeError, ValueError):  # e.g. an array of several values
        return None


def _per_document(output: dict, scores: dict) -> dict[str, dict[str, Any]]:
    """Each document's value of the metrics that are the mean of them (accuracy, exact
    match, …), from simple_evaluate's logged samples, for a standard error of Δ paired by
    document: {task: {"documents": digest of the documents' hashes in doc_id order,
    metric: [[doc_id, value], …]}}. A metric is kept only when every document has a finite
    number and their mean is the reported score (not perplexities, BLEU or other
    corpus-level aggregates)."""
    kept: dict[str, dict[str, Any]] = {}
    for task, samples in (output.get("samples") or {}).items():
        for metric, score in (scores.get(task) or {}).items():
            name, filt = metric.split(",", 1) if "," in metric else (metric, "none")
            mine = [s for s in samples if s.get("filter", "none") == filt]
            rows = [[s.get("doc_id"), _document_value(s.get(name))] for s in mine]
            if (len(rows) < 2 or any(v is None or not isinstance(d, int) for d, v in rows)
                    or len({d for d, _ in rows}) != len(rows)
                    or not math.isclose(sum(v for _, v in rows) / len(rows), score["value"],
                                        rel_tol=1e-9, abs_tol=1e-12)):
                continue
            entry = kept.setdefault(task, {})
            entry[metric] = sorted(rows)
            if "documents" not in entry:
                hashes = (str(s.get("doc_hash", "")) for s in sorted(mine, key=lambda s:
                                                                     s["doc_id"]))
                entry["documents"] = hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]
    return kept


def paired_stderr(base: list, other: list) -> float | None:
    """Standard error of mean(other − base) over their documents (the sample standard
    deviation of the differences over √n, as lm_eval's own standard errors); None unless
    both hold the same document ids, at least two, as [[doc_id, value], …]."""
    try:
        a = {d: float(v) for d, v in base}
        b = {d: float(v) for d, v in other}
    except (TypeError, ValueError):  # not a list of [doc_id, number] pairs
        return None
    if a.keys() != b.keys() or len(a) < 2 or len(a) != len(base) or len(b) != len(other):
        return None
    from prefloop.evaluate import mean_se

    return mean_se([b[d] - a[d] for d in a])[1]


def evaluate_model(cfg: TaxConfig, model: str) -> dict[str, Any]:
    """Run lm_eval on one model; return its record (the per-model file's content)::

        {"model", "settings" (see settings()), "lm_eval_version", "seconds",
         "scores": {task: {metric: {"value", "stderr" | null, "higher_is_better" | null}}},
         "per_document": {task: {"documents", metric: [[doc_id, value], …]}}
                         (see _per_document),
         "samples": {task: documents scored}, "num_fewshot": {task: k},
         "task_versions": {task: version}}
    """
    lm_eval = require_lm_eval()
    from prefloop.models import check_source

    check_source(model)  # local weights as safetensors only, clear errors for bad paths
    manager = task_manager(cfg.include_path)
    check_tasks(cfg.tasks, manager)
    model_args = {"pretrained": model, "trust_remote_code": cfg.trust_remote_code,
                  "use_safetensors": True, **cfg.model_args}
    start = time.perf_counter()
    try:
        output = lm_eval.simple_evaluate(
            model="hf", model_args=model_args, tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot,
            batch_size=cfg.batch_size, device=_device(cfg.device), limit=_limit(cfg.limit),
            task_manager=manager, log_samples=True)
    except (OSError, ValueError) as e:  # a model or dataset that cannot be read or fetched
        from prefloop.models import load_error

        reason = str(load_error(model, "", e)).split(": cannot load  ", 1)[-1]
        raise PrefloopError(f"alignment tax: lm_eval on {model} with {', '.join(cfg.tasks)}: "
                            f"cannot load the model or a task's data {reason}") from None
    if output is None:  # simple_evaluate returns None on the non-main processes
        raise PrefloopError("alignment tax: lm_eval returned no results (run it as one process)")
    n = output.get("n-samples") or {}
    scores = _scores(output)
    return {
        "model": model,
        "settings": settings(cfg, model),
        "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
        "seconds": round(time.perf_counter() - start, 2),
        "scores": scores,
        "per_document": _per_document(output, scores),
        "samples": {t: v.get("effective") for t, v in n.items() if isinstance(v, dict)},
        "num_fewshot": dict(output.get("n-shot") or {}),
        "task_versions": {t: v for t, v in (output.get("versions") or {}).items()},
    }


def evaluate_policies(
    cfg: TaxConfig,
    models: dict[int, str],
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
    redo_hint: str = "--overwrite to redo",
) -> dict[str, Any]:
    """Evaluate each {iteration: model} (0 = π₀, the baseline, required) with lm_eval, write
    OUT/iter_<t>/alignment_tax.json per model and OUT/alignment_tax_summary.json, and return
    the summary::

        {"baseline": 0, "models": {"t": model}, "files": {"t": "iter_t/alignment_tax.json"},
         "settings": {"tasks", "limit", "num_fewshot", "include_path"},
         "rows": tax_rows(...)}

    A model whose file holds the same settings is read, not evaluated, unless `overwrite`
    (`redo_hint` says how to force it). The summary covers every policy with a file of
    these settings in `out_dir`, from this call or an earlier one.
    """
    cfg.validate()
    if 0 not in models:
        raise PrefloopError("alignment tax: models need iteration 0, the initial policy "
                            "(the baseline every Δ is measured against)")
    from prefloop.loop.rundir import RunDir

    out = RunDir(out_dir)
    shared = settings(cfg, "")  # the task files are read (hashed) once per call
    records: dict[int, dict[str, Any]] = {}
    todo, notes = {}, []
    for t, model in sorted(models.items()):
        path = out.alignment_tax(t)
        stored = _read_record(path) if path.is_file() and not overwrite else None
        mine = {**shared, "model": model_identity(model)}
        same = stored is not None and stored.get("settings") == mine
        if same and not overwrite and "per_document" in stored:
            notes.append(f"alignment tax: {path} has these settings, kept ({redo_hint})")
            records[t] = stored
        else:
            if stored is not None and not overwrite:
                why = ("was written before per-document values were kept (Δ's standard "
                       "error is paired by document)" if same else
                       "was made with other settings")
                notes.append(f"alignment tax: {path} {why}, evaluating again")
            todo[t] = model
    if todo:  # every task name checked before the first model is loaded
        check_tasks(cfg.tasks, task_manager(cfg.include_path))
    for note in notes:
        echo(note)
    for t, model in todo.items():
        path = out.alignment_tax(t)
        echo(f"alignment tax: iteration {t}: {model} on {', '.join(cfg.tasks)}")
        record = {"iteration": t, **evaluate_model(cfg, model)}
        write_json(path, record)
        records[t] = record
    # the summary covers every policy evaluated in this directory with these settings, not
    # only this call's (the loop evaluates one iteration at a time)
    for t, record in load_results(out.root).items():
        kept = {k: v for k, v in record.get("settings", {}).items() if k != "model"}
        if t not in records and kept == {k: v for k, v in shared.items() if k != "model"}:
            records[t] = record
    summary = {
        "baseline": 0,
        "models": {str(t): r.get("model", models.get(t)) for t, r in sorted(records.items())},
        "files": {str(t): str(out.alignment_tax(t).relative_to(out.root))
                  for t in sorted(records)},
        "settings": {k: v for k, v in shared.items()
                     if k in ("tasks", "limit", "num_fewshot", "include_path")},
        "rows": tax_rows(records),
    }
    write_json(out.alignment_tax_summary, summary)
    return summary


def evaluate_run(
    cfg: TaxConfig,
    run_dir: str | Path,
    *,
    overwrite: bool = False,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """:func:`evaluate_policies` on a run directory's π₀ and its `cfg.iterations` policies
    (:func:`run_policies`), files written into the run directory."""
    cfg.validate()
    models = run_policies(run_dir, cfg.iterations)
    return evaluate_policies(cfg, models, run_dir, overwrite=overwrite, echo=echo)


# ------------------------------------------------------------------- reading and tax rows


def _read_record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PrefloopError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("scores"), dict):
        raise PrefloopError(f"{path}, field 'scores': missing (not an alignment-tax file)")
    for task, metrics in record["scores"].items():
        for metric, score in (metrics or {}).items():
            if not isinstance(score, dict) or _number(score.get("value")) is None:
                raise PrefloopError(f"{path}, field 'scores.{task}.{metric}.value': expected "
                                    "a number")
    if "per_document" in record:
        _check_per_document(path, record["per_document"])
    return record


def _check_per_document(path: Path, docs: Any) -> None:
    """Raise on a `per_document` field that is not as `_per_document` writes it."""
    redo = "(`prefloop alignment-tax --overwrite` writes the file again)"
    if not isinstance(docs, dict):
        raise PrefloopError(f"{path}, field 'per_document': expected {{task: {{'documents': "
                            f"digest, metric: [[doc_id, value], …]}}}} {redo}")
    for task, entry in docs.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("documents"), str):
            raise PrefloopError(f"{path}, field 'per_document.{task}.documents': expected "
                                f"the documents' digest {redo}")
        for metric, values in entry.items():
            if metric != "documents" and not (isinstance(values, list) and all(
                    isinstance(v, list) and len(v) == 2 and isinstance(v[0], int)
                    and not isinstance(v[0], bool) and _number(v[1]) is not None
                    for v in values)):
                raise PrefloopError(f"{path}, field 'per_document.{task}.{metric}': expected "
                                    f"[[doc_id, number], …] {redo}")


def load_results(run_dir: str | Path) -> dict[int, dict[str, Any]]:
    """{iteration: record} of every RUN/iter_<t>/alignment_tax.json (empty when none)."""
    from prefloop.loop.rundir import RunDir

    run = RunDir(run_dir)
    return {t: _read_record(run.alignment_tax(t)) for t in run.iterations_present()
            if run.alignment_tax(t).is_file()}


def _shared_settings(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in (record.get("settings") or {}).items() if k != "model"}


def other_settings(records: dict[int, dict[str, Any]]) -> list[int]:
    """The iterations whose records were evaluated with other settings than the baseline's
    (iteration 0: tasks, limit, few-shot count, task files, model arguments): `tax_rows`
    does not compare them."""
    if 0 not in records:
        return []
    base = _shared_settings(records[0])
    return [t for t, r in sorted(records.items()) if _shared_settings(r) != base]


def tax_rows(records: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (task, metric, iteration) of the baseline's (iteration 0) metrics, for
    the records evaluated with the baseline's settings (`other_settings` lists the rest)::

        {"task", "metric", "iteration", "higher_is_better", "baseline", "baseline_stderr",
         "value", "stderr", "delta", "delta_stderr", "delta_paired", "other_documents"}

    delta = value − baseline. Both policies answer the same documents, so its stderr is
    paired by document where both records hold the metric's per-document values
    (`paired_stderr`; delta_paired true): sd(v_t − v_0)/√n. Otherwise (a corpus-level
    metric, a group, other documents) it is √(se₀² + se_t²), the scores taken as
    independent (usually an upper bound: the two policies' results on one document are
    positively correlated), and null when either stderr is unknown. other_documents: both
    records hold the task's documents' digest and they differ (the data set changed between
    the two evaluations), so Δ compares different documents. Iteration 0's own row has
    delta 0 and no stderr. No baseline: no rows.
    """
    if 0 not in records:
        return []
    skipped = set(other_settings(records))
    records = {t: r for t, r in records.items() if t not in skipped}
    rows = []
    base = records[0]["scores"]
    for task in sorted(base):
        for metric, b in sorted(base[task].items()):
            for t, record in sorted(records.items()):
                score = (record["scores"].get(task) or {}).get(metric)
                if score is None:
                    continue
                se0, se = b.get("stderr"), score.get("stderr")
                paired = None if t == 0 else _paired(records[0], record, task, metric)
                delta_se = (None if t == 0 or se0 is None or se is None
                            else math.sqrt(se0**2 + se**2))
                rows.append({
                    "task": task, "metric": metric, "iteration": t,
                    "higher_is_better": b.get("higher_is_better"),
                    "baseline": b["value"], "baseline_stderr": se0,
                    "value": score["value"], "stderr": se,
                    "delta": score["value"] - b["value"],
                    "delta_stderr": delta_se if paired is None else paired,
                    "delta_paired": paired is not None,
                    "other_documents": _other_documents(records[0], record, task),
                })
    return rows


def _task_documents(record: dict, task: str) -> dict:
    docs = record.get("per_document")
    found = docs.get(task) if isinstance(docs, dict) else None
    return found if isinstance(found, dict) else {}


def _other_documents(base: dict, record: dict, task: str) -> bool:
    digests = (_task_documents(base, task).get("documents"),
               _task_documents(record, task).get("documents"))
    return None not in digests and digests[0] != digests[1]


def _paired(base: dict, record: dict, task: str, metric: str) -> float | None:
    """`paired_stderr` of a metric when both records hold its per-document values for the
    same documents (the same digest of their hashes), else None."""
    task0, task_t = _task_documents(base, task), _task_documents(record, task)
    values0, values_t = task0.get(metric), task_t.get(metric)
    if (task0.get("documents") != task_t.get("documents")
            or not isinstance(values0, list) or not isinstance(values_t, list)):
        return None
    return paired_stderr(values0, values_t)


def format_delta(row: dict[str, Any]) -> str:
    """`-0.0500 ± 0.0316` (4 decimals: lm_eval's scores are mostly in [0, 1]); a standard
    error not paired by document is marked `(independent)`, a Δ over other documents than
    π₀'s `(other documents than π₀'s)`."""
    marks = []
    text = f"{row['delta']:+.4f}"
    if row["delta_stderr"] is not None:
        text += f" ± {row['delta_stderr']:.4f}"
        if row["iteration"] != 0 and not row.get("delta_paired"):
            marks.append("independent")
    if row.get("other_documents"):
        marks.append("other documents than π₀'s")
    return text + (f" ({'; '.join(marks)})" if marks else "")


def format_score(value: float, stderr: float | None) -> str:
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def shown_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows a table shows: iteration 0's only when it is the only policy evaluated."""
    later = [r for r in rows if r["iteration"] != 0]
    return later or rows
