"""The loop's metrics: one record per evaluated iteration (`eval.json`, `metrics.jsonl`)
and the table row the loop prints for it."""

from __future__ import annotations

from dataclasses import dataclass


def evaluate_iteration(t: int, rows: list[dict], baseline: list[dict],
                       initial_logps: list[float] | None, lc_fit: str = "glm") -> dict:
    """Metrics of iteration t's eval samples against the initial policy's (iteration 0)."""
    import numpy as np

    from prefloop.evaluate import compare, kl_estimate, length_stats

    scores = np.array([r["score"] for r in rows], dtype=float)
    record: dict = {"iteration": t, "n": len(rows), "mean_reward": float(scores.mean())}
    record.update(length_stats([r["num_tokens"] for r in rows], [r["num_chars"] for r in rows]))
    record["mean_tokens_se"] = prompt_clustered_se(rows, "num_tokens")
    record["mean_chars_se"] = prompt_clustered_se(rows, "num_chars")
    record["eos_rate"] = float(np.mean([r["finish_reason"] == "eos" for r in rows]))
    if any("gold" in r for r in rows):
        record["gold_accuracy"] = float(np.mean([r.get("gold", 0.0) for r in rows]))
        record["gold_accuracy_se"] = prompt_clustered_se(rows, "gold")
    # the same comparison `prefloop evaluate` makes: first answer per prompt, σ(s_A − s_B)
    result = compare(rows, baseline, lc_fit, names=(f"iteration {t}", "iteration 0"))
    wr = result.win_rate  # percent
    record.update(win_rate=wr.soft, win_rate_se=wr.soft_se, win_rate_hard=wr.hard,
                  win_rate_hard_se=wr.hard_se)
    record["lc_win_rate"] = float(result.lc.lc)
    if result.lc.warnings:
        record["lc_warnings"] = list(result.lc.warnings)
    record["kl"] = None
    if initial_logps is not None:
        kl, kl_se = kl_estimate([r["logprob"] for r in rows], initial_logps)
        record.update(kl=float(kl), kl_se=float(kl_se))
    return record


def prompt_clustered_se(rows: list[dict], key: str) -> float | None:
    """Standard error of the mean of `key` over rows, prompts as the sampling unit: the sd
    of the per-prompt means over √(number of prompts) (with one sample per prompt, the
    usual √(p(1−p)/(n−1)) for a 0/1 value). None with fewer than two prompts."""
    import numpy as np

    by_prompt: dict[str, list[float]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(float(r.get(key, 0.0)))
    if len(by_prompt) < 2:
        return None
    means = np.array([np.mean(v) for v in by_prompt.values()])
    return float(means.std(ddof=1) / np.sqrt(len(means)))


@dataclass(frozen=True)
class Metric:
    """One field of a metrics.jsonl row: how the loop's printed table and the report's
    per-iteration table show it ("" = not a column there)."""

    key: str
    short: str = ""  # the loop's column header
    short_fmt: str = ""  # its format; "rate" = evaluate.format_rate (never shows 0.0)
    label: str = ""  # the report's column header
    fmt: str = ""


# Every numeric field of a metrics row, once: the report checks these are numbers (or null).
METRICS = (
    Metric("iteration", "iter", "{:d}", "iteration", "{:d}"),
    Metric("mean_reward", "reward", "{:+.3f}", "mean reward", "{:.4g}"),
    Metric("gold_accuracy", "gold", "{:.1%}", "gold accuracy", "{:.3f}"),
    Metric("mean_tokens", "tokens", "{:.1f}", "mean tokens", "{:.1f}"),
    Metric("median_tokens", label="median tokens", fmt="{:.1f}"),
    Metric("mean_chars", "chars", "{:.0f}", "mean chars", "{:.0f}"),
    Metric("median_chars", label="median chars", fmt="{:.0f}"),
    Metric("win_rate", "WR%", "rate", "win rate %", "{:.1f}"),
    Metric("win_rate_se"),
    Metric("lc_win_rate", "LC%", "rate", "LC win rate %", "{:.1f}"),
    Metric("kl", "KL", "{:.2f}", "KL (nats)", "{:.3g}"),
    Metric("eos_rate", "EOS%", "{:.0%}", "EOS rate", "{:.2f}"),
    Metric("length_target", label="length target", fmt="{:.1f}"),
    Metric("alpha", label="α first step (lr_dpo)", fmt="{:.4g}"),
    Metric("alpha_last", label="α last step", fmt="{:.4g}"),
    Metric("alpha_mean"),
    Metric("trainings", label="trainings (length guard)", fmt="{:d}"),
    Metric("alpha_scale", label="α scale (length guard)", fmt="{:.3g}"),
    Metric("probe_ratio", label="probe length / π₀'s", fmt="{:.3f}"),
    Metric("judge_win_rate", label="judge win rate %", fmt="{:.1f}"),
    Metric("judge_lc_win_rate", label="judge LC win rate %", fmt="{:.1f}"),
)
METRIC_COLUMNS = [(m.key, m.short, m.short_fmt) for m in METRICS if m.short]


def format_metrics_row(record: dict, header: bool = False) -> str:
    from prefloop.evaluate import format_rate

    cells = []
    for key, _, fmt in METRIC_COLUMNS:
        value = record.get(key)
        if value is None:
            cells.append("-")
        else:  # a degenerate LC of 1.6e-05 % must not read as 0.0
            cells.append(format_rate(value) if fmt == "rate" else fmt.format(value))
    line = "  ".join(f"{c:>8}" for c in cells)
    if header:
        head = "  ".join(f"{h:>8}" for _, h, _ in METRIC_COLUMNS)
        return head + "\n" + line
    return line
