"""Run reports: plots and one self-contained HTML page for one or several run directories.

``write_report([RUN_A, RUN_B], out)`` reads each run directory, draws the plots with
matplotlib's Agg renderer into ``out.parent / "plots" / *.png`` and writes ``out``, an HTML
page that embeds the same PNGs as ``data:`` URIs and carries its CSS inline, so the page can be
mailed or opened offline. Several runs are overlaid on the same axes, one colour per run, so
that e.g. iDPO's growing length and iLR-DPO's flat one are visible at a glance.

When any run's metrics carry ``gold_accuracy`` (the testbed's program-checked correctness),
the page opens with a headline panel: one line of numbers per run (:func:`headline_summary`,
e.g. ``idpo: length 24 → 47 tokens (×1.9), gold 39 → 48%``), gold accuracy and mean length
per iteration side by side, and each run's trajectory in the (mean length, gold accuracy) and
(mean length, mean reward) planes with iterations numbered: a run moving right is getting
longer, one moving up is getting better. Without gold the (length, reward) trajectory is one
of the ordinary plots.

The run directory layout it reads (written by the loop)::

    RUN/config.yaml                  optional; only its top-level `name:` is used
    RUN/metrics.jsonl                required; one row per evaluated iteration (0 = initial)
        {"iteration", "mean_reward", "mean_tokens", "median_tokens", "mean_chars",
         "median_chars", "win_rate", "win_rate_se", "lc_win_rate", "kl", "gold_accuracy"?,
         "alpha"?, "alpha_last"?, "alpha_mean"? (lr_dpo's α at the first and last step of
         the iteration's training, and its mean), "length_target"? (the length lr_dpo's
         α held, in "length_target_unit": tokens | chars)}
        (win rates in percent against the initial policy; any field but iteration may be
        null or absent)
    RUN/iter_<t>/eval_samples.jsonl  optional; {"prompt_id", "response", "score",
                                     "num_tokens", "num_chars"} per evaluated response
    RUN/iter_<t>/judge.json          optional; an LLM judge's summary (prefloop.judge), shown
                                     in a "judged by <model>" section (judge_section)
    RUN/iter_<t>/policy/train_log.jsonl  optional; per-step {"step", "loss", "accuracy",
                                     "alpha"?, ...} (the loop writes it beside the policy)
    RUN/iter_<t>/alignment_tax.json  optional; lm-evaluation-harness scores of the policy
                                     (prefloop.alignment_tax, `prefloop alignment-tax`)

Optional files and fields that are missing are skipped (their plot or column is left out).
A run directory without ``metrics.jsonl``, or a file that is not valid JSONL, raises
:class:`~prefloop.errors.PrefloopError` naming the file and row.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prefloop.data import read_jsonl
from prefloop.errors import PrefloopError, where
from prefloop.io import atomic_path
from prefloop.loop.metrics import METRICS
from prefloop.loop.rundir import RunDir

__all__ = ["RunData", "headline_summary", "judge_section", "load_run", "write_report"]

METRIC_FIELDS = tuple(m.key for m in METRICS if m.key != "iteration")
# At most this many responses per iteration go into the reward-vs-length scatter.
_MAX_SCATTER_POINTS = 3000


# ------------------------------------------------------------------------------- loading


@dataclass
class RunData:
    """Everything a report shows about one run directory."""

    name: str
    path: Path
    metrics: list[dict[str, Any]]  # sorted by iteration
    samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # iteration → rows
    train_logs: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # iteration → rows
    judge: str = "reward"  # what scored the evaluation: "reward model PATH", …

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(iterations, values) of a metrics field, rows where it is null or absent dropped."""
        pairs = [(r["iteration"], r[key]) for r in self.metrics if r.get(key) is not None]
        return [p[0] for p in pairs], [float(p[1]) for p in pairs]

    def has(self, key: str) -> bool:
        return any(row.get(key) is not None for row in self.metrics)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return read_jsonl(path)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_numbers(path: Path, rows: list[dict[str, Any]], keys: Sequence[str]) -> None:
    for i, row in enumerate(rows):
        for key in keys:
            value = row.get(key)
            if value is not None and not _is_number(value):
                raise PrefloopError(
                    f"{where(str(path), i, key)}: expected a number or null, got {value!r}"
                )


def _run_config(run_dir: Path) -> dict[str, Any]:
    config = RunDir(run_dir).config
    if config.is_file():
        import yaml

        try:
            data = yaml.safe_load(config.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            data = None
        if isinstance(data, dict):
            return data
    return {}


def _run_name(run_dir: Path) -> str:
    name = _run_config(run_dir).get("name")
    return name if isinstance(name, str) and name else run_dir.resolve().name


# What scored a run's evaluation, by `reward.type`: the words the report uses for its score.
JUDGE_KINDS = {"model": "reward model", "function": "reward function",
               "implicit": "implicit DPO reward"}


def _run_judge(run_dir: Path) -> str:
    """The evaluation's judge as the run's config names it (`eval.reward`, else `reward`)."""
    config = _run_config(run_dir)
    if not config:
        return "judge the run did not record (no config.yaml)"
    evaluation = config.get("eval") if isinstance(config.get("eval"), dict) else {}
    reward = evaluation.get("reward") or config.get("reward") or {}
    if not isinstance(reward, dict):
        return JUDGE_KINDS["model"]
    kind = JUDGE_KINDS.get(reward.get("type", "model"), "reward")
    what = reward.get("function") if reward.get("type") == "function" else reward.get("model")
    return f"{kind} {what}" if what else kind


def _score_noun(runs: Sequence[RunData]) -> str:
    """'reward-model score', 'reward-function score', … when every run was judged by the same
    kind of reward, else 'reward'."""
    kinds = {next((k for k in JUDGE_KINDS.values() if r.judge.startswith(k)), "reward")
             for r in runs}
    if len(kinds) != 1:
        return "reward"
    kind = kinds.pop()
    return {"reward model": "reward-model score", "reward function": "reward-function score",
            "implicit DPO reward": "implicit-reward score"}.get(kind, "reward")


def load_run(run_dir: Path | str) -> RunData:
    """Read a run directory (layout in the module docstring) into a :class:`RunData`."""
    run_dir = Path(run_dir)
    run = RunDir(run_dir)
    metrics_path = run.metrics
    if not metrics_path.is_file():
        what = "is not a directory" if not run_dir.is_dir() else "has no metrics.jsonl"
        raise PrefloopError(
            f"{metrics_path}: not found; {run_dir} {what} (is it a prefloop run directory?)"
        )
    metrics = _read_jsonl(metrics_path)
    for i, row in enumerate(metrics):
        if not isinstance(row.get("iteration"), int) or isinstance(row["iteration"], bool):
            raise PrefloopError(
                f"{where(str(metrics_path), i, 'iteration')}: expected an integer, "
                f"got {row.get('iteration')!r}"
            )
    _check_numbers(metrics_path, metrics, METRIC_FIELDS)
    metrics.sort(key=lambda r: r["iteration"])

    samples: dict[int, list[dict[str, Any]]] = {}
    train_logs: dict[int, list[dict[str, Any]]] = {}
    for t in run.iterations_present():
        if run.eval_samples(t).is_file():
            rows = _read_jsonl(run.eval_samples(t))
            _check_numbers(run.eval_samples(t), rows, ("score", "num_tokens", "num_chars"))
            samples[t] = rows
        log = run.train_log(t)
        if log.is_file():
            rows = _read_jsonl(log)
            _check_numbers(log, rows, ("step", "loss", "accuracy", "alpha"))
            train_logs[t] = rows
    return RunData(
        name=_run_name(run_dir),
        path=run_dir,
        metrics=metrics,
        samples=dict(sorted(samples.items())),
        train_logs=dict(sorted(train_logs.items())),
        judge=_run_judge(run_dir),
    )


# --------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kw: Any):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)  # render with Agg whatever the user's default backend is
    axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def _colour(index: int) -> str:
    from matplotlib import colormaps

    return colormaps["tab10"](index % 10)


def _iteration_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("iteration (0 = initial policy)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _plot_reward(runs: Sequence[RunData]):
    if not any(r.has("mean_reward") for r in runs):
        return None
    fig, axes = _new_figure(7, 4)
    ax = axes[0, 0]
    for i, run in enumerate(runs):
        xs, ys = run.series("mean_reward")
        ax.plot(xs, ys, "o-", color=_colour(i), label=run.name)
    ax.set_ylabel(f"mean {_score_noun(runs)}")
    ax.set_title("Reward on the evaluation prompts")
    _iteration_axis(ax)
    ax.legend()
    return fig


def _target_band(ax: Any, run: RunData, unit: str, colour: Any) -> None:
    """Shade the run's length target ±10 % where it held α to one in this unit."""
    from prefloop.length_control import LENGTH_BAND

    xs, ys = run.series("length_target")
    units = {r.get("length_target_unit") for r in run.metrics if r.get("length_target")}
    if not xs or units != {unit}:
        return
    lo = [y * (1 - LENGTH_BAND) for y in ys]
    hi = [y * (1 + LENGTH_BAND) for y in ys]
    ax.fill_between(xs, lo, hi, color=colour, alpha=0.12, lw=0,
                    label=f"{run.name} target ±{LENGTH_BAND:.0%}")
    ax.plot(xs, ys, ":", color=colour, lw=1)


def _guard_retrainings(ax: Any, run: RunData, unit: str, colour: Any) -> None:
    """Ring the iterations the length guard trained more than once, with their count."""
    rows = [r for r in run.metrics
            if (r.get("trainings") or 1) > 1 and r.get(f"mean_{unit}") is not None]
    if not rows:
        return
    xs, ys = [r["iteration"] for r in rows], [r[f"mean_{unit}"] for r in rows]
    ax.scatter(xs, ys, s=160, facecolors="none", edgecolors=colour, linewidths=1.5,
               label=f"{run.name} retrained by the length guard")
    for x, y, r in zip(xs, ys, rows, strict=True):
        ax.annotate(f"×{r['trainings']}", (x, y), textcoords="offset points", xytext=(8, 6),
                    fontsize="small", color=colour)


def _plot_length(runs: Sequence[RunData]):
    units = [u for u in ("tokens", "chars") if any(r.has(f"mean_{u}") for r in runs)]
    if not units:
        return None
    fig, axes = _new_figure(5.5 * len(units), 4, 1, len(units))
    for ax, unit in zip(axes[0], units, strict=True):
        for i, run in enumerate(runs):
            xs, ys = run.series(f"mean_{unit}")
            ax.plot(xs, ys, "o-", color=_colour(i), label=f"{run.name} mean")
            _target_band(ax, run, unit, _colour(i))
            _guard_retrainings(ax, run, unit, _colour(i))
            xs, ys = run.series(f"median_{unit}")
            if xs:
                ax.plot(xs, ys, "s--", color=_colour(i), alpha=0.6, label=f"{run.name} median")
        ax.set_ylabel(f"response length ({unit})")
        ax.set_title(f"Length in {unit}")
        _iteration_axis(ax)
        ax.legend(fontsize="small")
    return fig


def _plot_win_rates(runs: Sequence[RunData]):
    if not any(r.has("win_rate") or r.has("lc_win_rate") for r in runs):
        return None
    fig, axes = _new_figure(7, 4)
    ax = axes[0, 0]
    ax.axhline(50.0, color="grey", lw=1, ls=":")
    for i, run in enumerate(runs):
        xs, ys = run.series("lc_win_rate")
        if xs:
            ax.plot(xs, ys, "o-", color=_colour(i), label=f"{run.name} LC win rate")
        rows = [r for r in run.metrics if r.get("win_rate") is not None]
        if rows:
            ax.errorbar(
                [r["iteration"] for r in rows],
                [r["win_rate"] for r in rows],
                yerr=[r.get("win_rate_se") or 0.0 for r in rows],
                fmt="s--",
                color=_colour(i),
                alpha=0.6,
                capsize=3,
                label=f"{run.name} raw win rate",
            )
    ax.set_ylabel("% against the initial policy")
    ax.set_title("Win rate (dashed, ± s.e.) and length-controlled win rate (solid)")
    _iteration_axis(ax)
    ax.legend(fontsize="small")
    return fig


def _plot_metric(runs: Sequence[RunData], key: str, ylabel: str, title: str):
    if not any(r.has(key) for r in runs):
        return None
    fig, axes = _new_figure(7, 4)
    ax = axes[0, 0]
    for i, run in enumerate(runs):
        xs, ys = run.series(key)
        ax.plot(xs, ys, "o-", color=_colour(i), label=run.name)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _iteration_axis(ax)
    ax.legend()
    return fig


def _plot_reward_vs_length(runs: Sequence[RunData]):
    """One panel per run (shared axes): each response's score against its length in tokens,
    coloured by iteration, with each iteration's mean drawn as a large outlined marker."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.ticker import MaxNLocator

    with_samples = [r for r in runs if r.samples]
    if not with_samples:
        return None
    last = max(t for r in with_samples for t in r.samples)
    norm = Normalize(vmin=0, vmax=max(last, 1))
    cmap = colormaps["viridis"]
    n = len(with_samples)
    fig, axes = _new_figure(min(5.5 * n, 16), 4.2, 1, n, sharex=True, sharey=True)
    rng = np.random.default_rng(0)
    for ax, run in zip(axes[0], with_samples, strict=True):
        for t, rows in run.samples.items():
            pts = np.array(
                [
                    (r["num_tokens"], r["score"])
                    for r in rows
                    if r.get("num_tokens") is not None and r.get("score") is not None
                ],
                dtype=float,
            ).reshape(-1, 2)
            if not len(pts):
                continue
            if len(pts) > _MAX_SCATTER_POINTS:
                pts = pts[rng.choice(len(pts), _MAX_SCATTER_POINTS, replace=False)]
            colour = cmap(norm(t))
            ax.scatter(pts[:, 0], pts[:, 1], s=9, alpha=0.35, color=colour, lw=0)
            ax.scatter(*pts.mean(axis=0), s=110, color=colour, edgecolor="black", zorder=3)
        ax.set_title(run.name)
        ax.set_xlabel("response length (tokens)")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(_score_noun(runs))
    bar = fig.colorbar(
        ScalarMappable(norm=norm, cmap=cmap),
        ax=list(axes[0]),
        shrink=0.9,
        ticks=MaxNLocator(integer=True),
    )
    bar.set_label("iteration (large dots: iteration means)")
    return fig


def _smooth(values: Sequence[float]) -> Any:
    import numpy as np

    y = np.asarray(values, dtype=float)
    window = max(1, len(y) // 25)
    if window == 1:
        return y
    kernel = np.ones(window)
    # running mean that keeps the length and does not bias the ends toward 0
    return np.convolve(y, kernel, "same") / np.convolve(np.ones_like(y), kernel, "same")


def _concatenated_steps(run: RunData) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """Steps of all iterations on one axis: iteration t's steps start where t−1's ended.

    Returns (x, {field: values}, boundaries) with NaN where a row lacks a field.
    """
    xs: list[float] = []
    values: dict[str, list[float]] = {"loss": [], "accuracy": [], "alpha": []}
    boundaries: list[float] = []
    offset = 0.0
    for rows in run.train_logs.values():
        if not rows:
            continue
        if offset > 0:
            boundaries.append(offset - 0.5)
        steps = [r.get("step") for r in rows]
        if all(s is not None for s in steps):
            first = float(steps[0])
            local = [float(s) - first for s in steps]
        else:
            local = [float(j) for j in range(len(rows))]
        spacing = (local[-1] - local[0]) / (len(local) - 1) if len(local) > 1 else 1.0
        xs.extend(offset + v for v in local)
        for key, out in values.items():
            out.extend(float(r[key]) if r.get(key) is not None else math.nan for r in rows)
        offset += local[-1] + max(spacing, 1.0)
    return xs, values, boundaries


def _plot_training(runs: Sequence[RunData]):
    with_logs = [(i, r) for i, r in enumerate(runs) if any(r.train_logs.values())]
    if not with_logs:
        return None
    keys = ["loss", "accuracy"]
    if any(row.get("alpha") is not None for _, r in with_logs for rows in r.train_logs.values()
           for row in rows):
        keys.append("alpha")  # lr_dpo's α, step by step
    fig, axes = _new_figure(10, 3 * len(keys), len(keys), 1, sharex=True)
    for i, run in with_logs:
        xs, values, boundaries = _concatenated_steps(run)
        for ax, key in zip(axes[:, 0], keys, strict=True):
            ys = values[key]
            if all(math.isnan(v) for v in ys):
                continue
            if key == "alpha":  # α is set, not measured: drawn as it is, unsmoothed
                ax.plot(xs, ys, color=_colour(i), lw=1.5, label=run.name)
            else:
                ax.plot(xs, ys, color=_colour(i), alpha=0.2, lw=0.8)
                ax.plot(xs, _smooth(ys), color=_colour(i), lw=1.8, label=run.name)
            for b in boundaries:
                ax.axvline(b, color=_colour(i), ls=":", lw=1)
    axes[0, 0].set_ylabel("training loss")
    axes[0, 0].set_title("Training, iterations concatenated (dotted lines: iteration boundaries)")
    axes[1, 0].set_ylabel("preference accuracy\n(r(y_w) > r(y_l))")
    if "alpha" in keys:
        axes[2, 0].set_ylabel("α of lr_dpo\n(per unit of length)")
    axes[-1, 0].set_xlabel("optimizer step (all iterations)")
    for ax in axes[:, 0]:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def _has_gold(runs: Sequence[RunData]) -> bool:
    return any(r.has("gold_accuracy") for r in runs)


def _length_unit(runs: Sequence[RunData]) -> str | None:
    """The length unit the headline uses: tokens where any run has them, else characters."""
    for unit in ("tokens", "chars"):
        if any(r.has(f"mean_{unit}") for r in runs):
            return unit
    return None


def _gold_percent(run: RunData) -> tuple[list[int], list[float]]:
    xs, ys = run.series("gold_accuracy")
    return xs, [100.0 * y for y in ys]


def _plot_gold_and_length(runs: Sequence[RunData]):
    """The headline: gold accuracy (left) and mean length (right) per iteration, overlaid."""
    unit = _length_unit(runs)
    panels = [("gold", "gold accuracy (%)", "Gold accuracy (program-checked)")]
    if unit is not None:
        panels.append((unit, f"mean response length ({unit})", f"Mean length in {unit}"))
    fig, axes = _new_figure(5.6 * len(panels), 4, 1, len(panels))
    for ax, (key, ylabel, title) in zip(axes[0], panels, strict=True):
        for i, run in enumerate(runs):
            xs, ys = _gold_percent(run) if key == "gold" else run.series(f"mean_{key}")
            if xs:
                ax.plot(xs, ys, "o-", lw=2, color=_colour(i), label=run.name)
            if key != "gold":
                _target_band(ax, run, key, _colour(i))
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        _iteration_axis(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


def _trajectory(ax: Any, xs: list[float], ys: list[float], iters: list[int], colour: Any,
                label: str) -> None:
    """One run's path through the plane: points, arrows in iteration order, numbers."""
    ax.plot(xs, ys, "o", ms=7, color=colour, label=label)
    for k in range(1, len(xs)):
        ax.annotate("", xy=(xs[k], ys[k]), xytext=(xs[k - 1], ys[k - 1]),
                    arrowprops={"arrowstyle": "-|>", "color": colour, "lw": 1.6,
                                "shrinkA": 5, "shrinkB": 5})
    for x, y, t in zip(xs, ys, iters, strict=True):
        ax.annotate(str(t), (x, y), xytext=(5, 5), textcoords="offset points",
                    fontsize="small", color=colour, fontweight="bold")


def _plot_quality_vs_length(runs: Sequence[RunData]):
    """Each run's trajectory in the (mean length, quality) plane, iterations annotated.

    Quality is gold accuracy (%) and mean reward side by side when any run has gold, the
    mean reward alone otherwise; points are the iterations where both coordinates exist.
    """
    unit = _length_unit(runs)
    panels = [key for key in ("gold_accuracy", "mean_reward") if any(r.has(key) for r in runs)]
    if unit is None or not panels:
        return None
    labels = {"gold_accuracy": "gold accuracy (%)", "mean_reward": f"mean {_score_noun(runs)}"}
    fig, axes = _new_figure(5.6 * len(panels), 4.4, 1, len(panels), sharex=True)
    for ax, key in zip(axes[0], panels, strict=True):
        for i, run in enumerate(runs):
            lengths = dict(zip(*run.series(f"mean_{unit}"), strict=True))
            iters, ys = _gold_percent(run) if key == "gold_accuracy" else run.series(key)
            points = [(t, lengths[t], y) for t, y in zip(iters, ys, strict=True) if t in lengths]
            if points:
                ts, xs, qs = (list(v) for v in zip(*points, strict=True))
                _trajectory(ax, xs, qs, ts, _colour(i), run.name)
        ax.set_xlabel(f"mean response length ({unit})")
        ax.set_ylabel(labels[key])
        ax.set_title(f"{labels[key].split(' (')[0].capitalize()} against length")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    return fig


_QUALITY_VS_LENGTH_CAPTION = (
    "Each run's path through (mean length, quality): one point per iteration, numbered, with "
    "arrows in iteration order. Moving right is getting longer, moving up is getting better."
)

#: The headline panel, drawn when any run has gold accuracy: (name, caption, draw).
_HEADLINE: tuple[tuple[str, str, Callable[[Sequence[RunData]], Any]], ...] = (
    (
        "gold_and_length",
        "Gold (program-checked) accuracy, which does not depend on length or on the reward "
        "model, and mean response length per iteration; runs overlaid.",
        _plot_gold_and_length,
    ),
    (
        "quality_vs_length",
        _QUALITY_VS_LENGTH_CAPTION + " Left: gold accuracy, the truth; right: the judge's "
        "score the loop optimised. A run that buys reward with length moves right in both "
        "panels but up only on the right.",
        _plot_quality_vs_length,
    ),
)

_PLOTS: tuple[tuple[str, str, Callable[[Sequence[RunData]], Any]], ...] = (
    ("reward", "Mean score of the run's judge per iteration.", _plot_reward),
    (
        "length",
        "Mean (solid) and median (dashed) response length per iteration, in tokens and "
        "characters. A length-regularised run should stay flat here; a shaded band is the "
        "length target lr_dpo's α was held to (loss.length_control), ±10 %.",
        _plot_length,
    ),
    (
        "win_rate",
        "Win rate against the initial policy, raw (dashed, ± one standard error) and length "
        "controlled (solid). A raw win rate far above the LC win rate means the judge is being "
        "won over by length.",
        _plot_win_rates,
    ),
    (
        "kl",
        "Monte-Carlo estimate of KL(π_t ‖ π₀) on the policy's own samples, in nats per response.",
        lambda runs: _plot_metric(runs, "kl", "KL to the initial policy (nats)", "KL(π_t ‖ π₀)"),
    ),
    (
        "reward_vs_length",
        "Each evaluated response's reward against its length, coloured by iteration; large dots "
        "are iteration means. Means that move right as they move up show reward bought with "
        "length.",
        _plot_reward_vs_length,
    ),
    (
        "training",
        "Per-step training loss and preference accuracy (faint: raw, solid: running mean), "
        "and lr_dpo's α at every step where the run has one.",
        _plot_training,
    ),
)


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ---------------------------------------------------------------------------------- HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1150px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.8em; }
p.meta { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th { background: #f2f2f2; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1.2em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
#headline { background: #fafafa; border: 1px solid #e3e3e3; border-radius: 6px;
            padding: 0.2em 1.2em 0.6em; margin-top: 1.2em; }
#headline h2 { margin-top: 0.6em; }
ul.headline-summary { list-style: none; padding-left: 0; font-size: 1.1em;
                      font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 0.4em;
          border-radius: 2px; vertical-align: baseline; }
.up { color: #b03a2e; } .flat { color: #1e8449; }
.warn { color: #b03a2e; }
"""

_GUIDE = (
    "Each run is an iterative preference-optimisation loop: iteration 0 is the initial (SFT) "
    "policy, and iteration <i>t</i> is the policy after <i>t</i> rounds of sample → score → "
    "pair → train. Every iteration is evaluated on the same held-out prompts: the mean "
    "score of the run's judge (named above each run's table: a reward model, a reward "
    "function or the implicit reward), the response length in tokens and characters, and the "
    "win rate against the initial policy judged by it, both raw and length-controlled "
    "(LC: the win rate a logistic model of the judge predicts at equal length, as in "
    "AlpacaEval 2). Read the length plot next to the reward plot: reward that rises while "
    "length stays flat, with the LC win rate rising as much as the raw one, is a genuinely "
    "better policy; reward and raw win rate that rise together with length while the LC win "
    "rate stays near 50 are the judge's length bias being exploited. Win rates are in "
    "percent; ± is one standard error over prompts."
)

_COLUMNS = tuple((m.key, m.label, m.fmt) for m in METRICS if m.label)


def _warnings(run: RunData) -> list[str]:
    """Per iteration: answers cut at the token limit, and the LC fit's own warnings."""
    from prefloop.evaluate import EOS_WARNING

    out = []
    for row in run.metrics:
        t, eos = row["iteration"], row.get("eos_rate")
        if _is_number(eos) and eos < EOS_WARNING:
            out.append(f"iteration {t}: {1 - eos:.0%} of the answers hit the token limit "
                       "(max_new_tokens): their lengths, and the KL estimate, are of cut answers")
        out.extend(f"iteration {t}: length-controlled win rate: {w}"
                   for w in row.get("lc_warnings") or [])
    return out


def _cell(row: dict[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    if value is None:
        return "–"
    if key in ("win_rate", "lc_win_rate"):
        from prefloop.evaluate import format_rate

        text = format_rate(value)  # a degenerate 1.6e-05 % is not shown as 0.0
    else:
        text = fmt.format(value)
    se = row.get(f"{key}_se")  # the loop writes win_rate_se, kl_se and gold_accuracy_se
    if key in ("win_rate", "kl", "gold_accuracy") and _is_number(se):
        text += " ± " + fmt.format(se)
    return text


def _iteration_table(run: RunData) -> str:
    if not run.metrics:
        return "<p>metrics.jsonl has no rows yet.</p>"
    cols = [c for c in _COLUMNS if c[0] == "iteration" or run.has(c[0])]
    head = "".join(f"<th>{html.escape(label)}</th>" for _, label, _ in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{_cell(row, key, fmt)}</td>" for key, _, fmt in cols) + "</tr>"
        for row in run.metrics
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _first_last(run: RunData, key: str) -> tuple[float, float] | None:
    _, ys = run.series(key)
    return (ys[0], ys[-1]) if ys else None


def _summary_table(runs: Sequence[RunData]) -> str:
    from matplotlib.colors import to_hex

    head = (
        "<tr><th>run</th><th>iterations</th><th>mean reward first → last</th>"
        "<th>mean tokens first → last</th><th>mean chars first → last</th>"
        "<th>last win rate %</th><th>last LC win rate %</th></tr>"
    )
    body = []
    for i, run in enumerate(runs):
        iters = [r["iteration"] for r in run.metrics]
        cells = [
            f'<span class="swatch" style="background:{to_hex(_colour(i))}"></span>'
            f"{html.escape(run.name)}",
            f"{min(iters)}–{max(iters)}" if iters else "–",
        ]
        reward = _first_last(run, "mean_reward")
        cells.append(f"{reward[0]:.4g} → {reward[1]:.4g}" if reward else "–")
        for unit in ("tokens", "chars"):
            pair = _first_last(run, f"mean_{unit}")
            if pair is None:
                cells.append("–")
                continue
            change = (pair[1] / pair[0] - 1.0) * 100.0 if pair[0] else math.nan
            cls = "up" if change > 10.0 else "flat"
            cells.append(
                f'{pair[0]:.0f} → {pair[1]:.0f} <span class="{cls}">({change:+.0f}%)</span>'
            )
        for key in ("win_rate", "lc_win_rate"):
            pair = _first_last(run, key)
            cells.append(f"{pair[1]:.1f}" if pair else "–")
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def headline_summary(run: RunData) -> str:
    """One line of numbers per run, first → last iteration that has each field, e.g.

    ``idpo: length 24 → 47 tokens (×1.9), gold 39 → 48%``

    (mean length in tokens, else characters, with last/first, one decimal below 20; gold
    accuracy in percent, one decimal when it moved less than 2 points). A field a run lacks
    is left out.
    """
    parts = []
    for unit in ("tokens", "chars"):
        pair = _first_last(run, f"mean_{unit}")
        if pair is not None:
            ratio = f" (×{pair[1] / pair[0]:.1f})" if pair[0] > 0 else ""
            fmt = "{:.0f}" if min(pair) >= 20 else "{:.1f}"  # short answers: keep a decimal
            parts.append(f"length {fmt.format(pair[0])} → {fmt.format(pair[1])} {unit}{ratio}")
            break
    gold = _first_last(run, "gold_accuracy")
    if gold is not None:
        g0, g1 = 100 * gold[0], 100 * gold[1]
        fmt = "{:.0f}" if abs(g1 - g0) >= 2 else "{:.1f}"  # a small change keeps a decimal
        parts.append(f"gold {fmt.format(g0)} → {fmt.format(g1)}%")
    return f"{run.name}: " + (", ".join(parts) if parts else "no length or gold metrics yet")


def _figure_html(name: str, caption: str, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (
        f'<figure id="{name}"><img src="data:image/png;base64,{data}" '
        f'alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption>'
        "</figure>"
    )


def _headline_html(runs: Sequence[RunData], figures: list[tuple[str, str, bytes]]) -> str:
    from matplotlib.colors import to_hex

    items = "".join(
        f'<li><span class="swatch" style="background:{to_hex(_colour(i))}"></span>'
        f"{html.escape(headline_summary(run))}</li>"
        for i, run in enumerate(runs)
    )
    return (
        '<section id="headline"><h2>Headline: quality and length</h2>'
        "<p>Gold accuracy is checked by a program, so it cannot be won over by length. A "
        "run whose length grows while gold accuracy stands still is exploiting the reward "
        "model's taste for long answers; a run that gets better at equal length is genuinely "
        "improving.</p>"
        f'<ul class="headline-summary">{items}</ul>'
        + "".join(_figure_html(*f) for f in figures)
        + "</section>"
    )


def _html_page(
    runs: Sequence[RunData],
    figures: list[tuple[str, str, bytes]],
    headline: list[tuple[str, str, bytes]] | None = None,
) -> str:
    names = ", ".join(html.escape(r.name) for r in runs)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>prefloop report: {names}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>prefloop report: {names}</h1>",
        f'<p class="meta">{len(runs)} run(s): '
        + ", ".join(
            f"{html.escape(r.name)} (<code>{html.escape(str(r.path))}</code>)" for r in runs
        )
        + "</p>",
        *([_headline_html(runs, headline)] if headline else []),
        "<h2>How to read this report</h2>",
        f"<p>{_GUIDE}</p>",
        "<h2>Summary</h2>",
        _summary_table(runs),
        "<h2>Plots</h2>",
    ]
    if not figures:
        parts.append("<p>Nothing to plot: the metrics have no numeric fields yet.</p>")
    parts.extend(_figure_html(*f) for f in figures)
    parts.append("<h2>Per-iteration metrics</h2>")
    for run in runs:
        parts.append(f"<h3>{html.escape(run.name)}</h3>")
        parts.append(f'<p class="meta">judged by the {html.escape(run.judge)}</p>')
        parts.append(_iteration_table(run))
        parts.extend(f'<p class="warn">{html.escape(text)}</p>' for text in _warnings(run))
        parts.append(judge_section(run.path))
    parts.append(_alignment_tax_html(runs))
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def _alignment_tax_html(runs: Sequence[RunData]) -> str:
    """Section "Alignment tax": each run's lm-evaluation-harness scores per task and metric
    (RUN/iter_<t>/alignment_tax.json, from `prefloop alignment-tax`), π_t against π₀. A Δ
    against the metric's better direction by more than two standard errors is marked. Empty
    when no run has such files."""
    from prefloop.alignment_tax import (
        format_delta,
        format_score,
        load_results,
        other_settings,
        shown_rows,
        tax_rows,
    )

    parts = []
    for run in runs:
        records = load_results(run.path)
        if not records:
            continue
        parts.append(f"<h3>{html.escape(run.name)}</h3>")
        skipped = other_settings(records)
        if skipped:
            parts.append('<p class="warn">Not compared with π₀: '
                         + ", ".join(f"iter_{t}" for t in skipped)
                         + ", evaluated with other settings than π₀'s (tasks, limit, few-shot "
                         "count, task files or model arguments); run <code>prefloop "
                         "alignment-tax</code> with one set of settings for both.</p>")
        rows = shown_rows(tax_rows(records))
        if not rows:
            parts.append("<p>No alignment_tax.json of iteration 0 (the baseline): run "
                         "<code>prefloop alignment-tax</code> again to evaluate π₀.</p>")
            continue
        body = []
        for r in rows:
            se, better = r["delta_stderr"], r["higher_is_better"]
            worse = (better is not None and se is not None and r["iteration"] != 0
                     and (r["delta"] if better else -r["delta"]) < -2 * se)
            cells = [r["task"], r["metric"], str(r["iteration"]),
                     format_score(r["baseline"], r["baseline_stderr"]),
                     format_score(r["value"], r["stderr"])]
            delta = html.escape(format_delta(r))
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells)
                        + (f'<td class="up">{delta}</td>' if worse else f"<td>{delta}</td>")
                        + "</tr>")
        head = "".join(f"<th>{h}</th>" for h in
                       ("task", "metric", "iteration t", "π₀", "π_t", "Δ = π_t − π₀ ± se"))
        parts.append(f'<table class="alignment-tax"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{''.join(body)}</tbody></table>")
    if not parts:
        return ""
    return ('<section id="alignment-tax"><h2>Alignment tax (lm-evaluation-harness)</h2>'
            "<p>Scores of each policy on standard benchmarks, run by lm-evaluation-harness, "
            "and their change from the initial policy π₀: a drop is knowledge or skill the "
            "preference training cost. ± is lm_eval's standard error. Δ's standard error is "
            "paired by document (both policies answer the same ones) for metrics that are a "
            "mean over documents (accuracy, exact match); where it is not (corpus-level "
            "metrics, groups) it is marked <i>independent</i>: the two scores taken as "
            "independent, usually an upper bound. A drop larger than two standard errors is "
            "in red.</p>"
            + "".join(parts) + "</section>")


def judge_section(run_dir: Path | str) -> str:
    """HTML of a run's LLM-judge evaluations, "" when it has none.

    Reads every ``RUN/iter_<t>/judge.json`` (the summary :func:`prefloop.judge.write_judge_files`
    writes) and shows, per judge model, one row per iteration: win rate ± se and LC win rate ±
    se (percent, policy vs baseline), prompts judged, unparseable and failed answers, and tokens
    spent. A file that is not a JSON object raises :class:`PrefloopError` naming it.
    """
    import json

    from prefloop.evaluate import format_rate

    found: list[tuple[int, Path, dict[str, Any]]] = []
    run = RunDir(run_dir)
    for t in run.iterations_present():
        path = run.judge(t)
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise PrefloopError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise PrefloopError(f"{path}: expected a JSON object (a judge summary)")
            found.append((t, path, data))
    if not found:
        return ""

    def rate(data: dict[str, Any], key: str) -> str:
        value, se = data.get(key), data.get(f"{key}_se")
        if not _is_number(value):
            return "–"
        return format_rate(value) + (f" ± {se:.1f}" if _is_number(se) else "")

    def count(data: dict[str, Any], key: str) -> str:
        value = data.get(key)
        return str(value) if _is_number(value) else "–"

    parts = []
    for model in sorted({str(d.get("model", "?")) for _, _, d in found}):
        rows = sorted((t, d) for t, _, d in found if str(d.get("model", "?")) == model)
        names = rows[-1][1].get("names") or ["policy", "baseline"]
        head = "".join(f"<th>{h}</th>" for h in (
            "iteration", "win rate %", "LC win rate %", "judged", "unparseable", "failed",
            "tokens (prompt / completion)"))
        body = "".join(
            f"<tr><td>{t}</td><td>{rate(d, 'win_rate')}</td><td>{rate(d, 'lc_win_rate')}</td>"
            f"<td>{count(d, 'n')}</td><td>{count(d, 'n_unparseable')}</td>"
            f"<td>{count(d, 'n_failed')}</td>"
            f"<td>{count(d, 'prompt_tokens')} / {count(d, 'completion_tokens')}</td></tr>"
            for t, d in rows)
        parts.append(
            f"<h4>judged by {html.escape(model)}</h4>"
            f'<p class="meta">LLM judge, {html.escape(str(names[0]))} vs '
            f"{html.escape(str(names[1]))}, order {html.escape(str(rows[-1][1].get('order')))};"
            " rates in percent ± one standard error; unparseable and failed prompts are left "
            "out of the rates</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------- API


def _unique_names(runs: list[RunData]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
    for run in runs:
        if seen[run.name] > 1:  # same name twice: tell them apart by directory
            run.name = f"{run.name} ({run.path})"


def _draw_all(
    runs: Sequence[RunData],
    specs: Sequence[tuple[str, str, Callable[[Sequence[RunData]], Any]]],
    plots_dir: Path,
) -> list[tuple[str, str, bytes]]:
    """Draw each (name, caption, draw) that has data; write ``plots_dir/name.png``."""
    figures = []
    for name, caption, draw in specs:
        fig = draw(runs)
        if fig is None:
            continue
        png = _png_bytes(fig)
        with atomic_path(plots_dir / f"{name}.png") as tmp:
            tmp.write_bytes(png)
        figures.append((name, caption, png))
    return figures


def write_report(run_dirs: Sequence[Path | str], out: Path | str | None = None) -> Path:
    """Write an HTML report of one or several runs; return the HTML file's path.

    ``out`` is the HTML file; by default ``RUN_DIR/report.html`` for a single run (required
    for several). The plots are also written as PNG files to ``out.parent / "plots"``, and
    embedded in the page as ``data:image/png;base64`` URIs, so the page needs no other file
    and no network. Every file is written atomically (temporary name, then rename).
    """
    if not run_dirs:
        raise PrefloopError("report: give at least one run directory")
    runs = [load_run(d) for d in run_dirs]
    _unique_names(runs)
    if out is None:
        if len(runs) > 1:
            raise PrefloopError(
                "report: several run directories need an output path for the HTML file "
                "(e.g. --out compare/report.html)"
            )
        out = RunDir(run_dirs[0]).report
    out = Path(out)
    plots_dir = out.parent / "plots"

    if _has_gold(runs):
        headline = _draw_all(runs, _HEADLINE, plots_dir)
        figures = _draw_all(runs, _PLOTS, plots_dir)
    else:  # no headline: the (length, reward) trajectory joins the plots, after length
        headline = []
        specs = list(_PLOTS)
        specs.insert(2, ("quality_vs_length", _QUALITY_VS_LENGTH_CAPTION, _plot_quality_vs_length))
        figures = _draw_all(runs, specs, plots_dir)

    page = _html_page(runs, figures, headline)
    with atomic_path(out) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return out
