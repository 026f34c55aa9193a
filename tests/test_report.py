"""Tests of prefloop.report on fake run directories: files, self-containment, rendering."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from prefloop.errors import PrefloopError
from prefloop.report import headline_summary, load_run, write_report


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def make_run(
    root: Path,
    name: str,
    growth: float,
    iterations: int = 3,
    samples: bool = True,
    train_logs: bool = True,
    gold: bool = True,
    seed: int = 0,
) -> Path:
    """A fake run dir: mean length multiplies by `growth` per iteration, reward rises."""
    rng = np.random.default_rng(seed)
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(f"name: {name}\nloss:\n  name: lr_dpo\n")
    metrics = []
    step = 0
    for t in range(iterations + 1):
        tokens = rng.lognormal(np.log(80 * growth**t), 0.35, size=60)
        chars = tokens * rng.normal(4.5, 0.3, size=60)
        scores = 0.4 * t + 0.8 * np.log(tokens) + rng.normal(0, 0.5, size=60)
        if samples:
            _write_jsonl(
                run / f"iter_{t}" / "eval_samples.jsonl",
                [
                    {
                        "prompt_id": f"p{i}",
                        "response": "word " * int(n),
                        "score": float(s),
                        "num_tokens": int(n),
                        "num_chars": int(c),
                    }
                    for i, (n, c, s) in enumerate(zip(tokens, chars, scores, strict=True))
                ],
            )
        if train_logs and t >= 1:
            rows = []
            for _ in range(40):
                step += 1
                rows.append(
                    {
                        "step": step,
                        "loss": float(0.69 * np.exp(-step / 60) + rng.normal(0, 0.03)),
                        "accuracy": float(min(1.0, 0.5 + step / 200 + rng.normal(0, 0.05))),
                        "margin": float(step / 100),
                        "chosen_reward": 0.1,
                        "rejected_reward": -0.1,
                    }
                )
            _write_jsonl(run / f"iter_{t}" / "policy" / "train_log.jsonl", rows)
        row = {
            "iteration": t,
            "mean_reward": float(scores.mean()),
            "mean_tokens": float(tokens.mean()),
            "median_tokens": float(np.median(tokens)),
            "mean_chars": float(chars.mean()),
            "median_chars": float(np.median(chars)),
            "win_rate": None if t == 0 else 50 + 8 * t * growth,
            "win_rate_se": None if t == 0 else 2.1,
            "lc_win_rate": None if t == 0 else 50 + 6 * t / growth**2,
            "kl": 0.0 if t == 0 else 1.5 * t * growth,
        }
        if gold:
            row["gold_accuracy"] = 0.4 + 0.05 * t / growth**2
        metrics.append(row)
    _write_jsonl(run / "metrics.jsonl", metrics)
    return run


@pytest.fixture
def two_runs(tmp_path):
    return [
        make_run(tmp_path / "runs", "idpo", growth=1.35, seed=0),
        make_run(tmp_path / "runs", "ilr-dpo", growth=1.0, seed=1),
    ]


HEADLINE = {"gold_and_length", "quality_vs_length"}
PLOTS = {"reward", "length", "win_rate", "kl", "reward_vs_length", "training"} | HEADLINE


def test_two_runs_report_is_self_contained(two_runs, tmp_path):
    out = write_report(two_runs, tmp_path / "compare" / "report.html")
    assert out == tmp_path / "compare" / "report.html"
    page = out.read_text()
    assert {p.stem for p in (out.parent / "plots").glob("*.png")} == PLOTS
    assert page.count("data:image/png;base64,") == len(PLOTS)
    # no network assets: no http(s) URL anywhere, no external script/stylesheet/src
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page
    assert not re.findall(r'src="(?!data:image/png;base64,)', page)
    # the tables: a summary and one per-iteration table per run
    assert page.count("<table>") == 3
    assert "idpo" in page and "ilr-dpo" in page
    assert "LC win rate %" in page and "gold accuracy" in page
    assert "How to read this report" in page
    # no leftover temporary files from the atomic writes
    assert sorted(p.name for p in out.parent.iterdir()) == ["plots", "report.html"]


def test_embedded_images_are_the_written_pngs(two_runs, tmp_path):
    import base64

    out = write_report(two_runs, tmp_path / "r.html")
    page = out.read_text()
    for png in (tmp_path / "plots").glob("*.png"):
        assert base64.b64encode(png.read_bytes()).decode() in page
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_single_run_defaults_to_report_in_run_dir(tmp_path):
    run = make_run(tmp_path, "solo", growth=1.2)
    out = write_report([run])
    assert out == run / "report.html" and out.is_file()
    assert (run / "plots" / "length.png").is_file()


def test_run_with_only_metrics_renders(tmp_path):
    run = make_run(tmp_path, "bare", growth=1.1, samples=False, train_logs=False, gold=False)
    (run / "config.yaml").unlink()
    out = write_report([run])
    names = {p.stem for p in (run / "plots").glob("*.png")}
    assert names == {"reward", "length", "quality_vs_length", "win_rate", "kl"}
    page = out.read_text()
    assert "gold accuracy" not in page and "bare" in page  # name from the directory


def test_metrics_with_only_some_fields(tmp_path):
    run = tmp_path / "partial"
    _write_jsonl(run / "metrics.jsonl", [{"iteration": 1, "mean_tokens": 90.0}, {"iteration": 0}])
    write_report([run])
    assert {p.stem for p in (run / "plots").glob("*.png")} == {"length"}
    assert load_run(run).metrics[0]["iteration"] == 0  # sorted


def test_missing_metrics_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PrefloopError, match=r"empty/metrics\.jsonl: not found"):
        write_report([tmp_path / "empty"])
    with pytest.raises(PrefloopError, match="is not a directory"):
        write_report([tmp_path / "nowhere"])


def test_bad_rows_name_file_row_and_field(tmp_path):
    run = tmp_path / "bad"
    _write_jsonl(run / "metrics.jsonl", [{"iteration": 0, "mean_reward": "high"}])
    with pytest.raises(PrefloopError, match=r"metrics\.jsonl, line 1, field 'mean_reward'"):
        load_run(run)
    (run / "metrics.jsonl").write_text('{"iteration": 0}\n{oops\n')
    with pytest.raises(PrefloopError, match=r"metrics\.jsonl, line 2: not valid JSON"):
        load_run(run)


def test_several_runs_need_an_output_path_and_duplicate_names_are_told_apart(tmp_path):
    a = make_run(tmp_path / "a", "same", growth=1.0, samples=False, train_logs=False)
    b = make_run(tmp_path / "b", "same", growth=1.3, samples=False, train_logs=False)
    with pytest.raises(PrefloopError, match="need an output path"):
        write_report([a, b])
    page = write_report([a, b], tmp_path / "out.html").read_text()
    assert f"same ({a})" in page and f"same ({b})" in page


def test_html_escapes_run_names(tmp_path):
    run = make_run(tmp_path, "x", growth=1.0, samples=False, train_logs=False)
    (run / "config.yaml").write_text('name: "<b>bold</b>"\n')
    page = write_report([run]).read_text()
    assert "<b>bold</b>" not in page and "&lt;b&gt;bold&lt;/b&gt;" in page


def test_renders_in_headless_chromium(two_runs, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium not installed (apt-get install chromium) - rendering not checked")
    out = write_report(two_runs, tmp_path / "site" / "report.html")
    shot = tmp_path / "shot.png"
    cmd = [
        chromium,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        out.resolve().as_uri(),
    ]
    subprocess.run(cmd, check=True, timeout=120, capture_output=True)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    assert pixels[..., :3].std() > 0.05  # not a blank page
    assert len(np.unique(pixels[..., :3].reshape(-1, 3), axis=0)) > 100  # text + plots


# ------------------------------------------------------------------------ headline panel


class _Page(HTMLParser):
    """Collects the headline section's summary lines and figure ids, and all figure ids."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0  # > 0 inside <section id="headline">
        self.headline_seen = 0
        self.in_item = False
        self.lines: list[str] = []
        self.headline_figures: list[str] = []
        self.figures: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "section" and attrs.get("id") == "headline":
            self.headline_seen += 1
            self.depth = 1
        elif self.depth and tag == "section":
            self.depth += 1
        if tag == "figure":
            self.figures.append(attrs["id"])
            if self.depth:
                self.headline_figures.append(attrs["id"])
        if self.depth and tag == "li":
            self.in_item = True
            self.lines.append("")

    def handle_endtag(self, tag):
        if self.depth and tag == "section":
            self.depth -= 1
        if tag == "li":
            self.in_item = False

    def handle_data(self, data):
        if self.in_item:
            self.lines[-1] += data


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    return parser


def test_headline_panel_appears_with_gold_and_its_numbers_match_the_metrics(two_runs, tmp_path):
    page = write_report(two_runs, tmp_path / "r.html").read_text()
    parsed = _parse(page)
    assert parsed.headline_seen == 1
    assert parsed.headline_figures == ["gold_and_length", "quality_vs_length"]
    assert parsed.figures[:2] == parsed.headline_figures  # at the top, before the other plots
    assert page.index('id="headline"') < page.index("How to read this report")
    assert "gold_accuracy" not in parsed.figures  # the headline replaces the lone gold plot
    for run_dir, line in zip(two_runs, parsed.lines, strict=True):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        t0, t1 = rows[0]["mean_tokens"], rows[-1]["mean_tokens"]
        g0, g1 = rows[0]["gold_accuracy"], rows[-1]["gold_accuracy"]
        expected = (f"{run_dir.name}: length {t0:.0f} → {t1:.0f} tokens (×{t1 / t0:.1f}), "
                    f"gold {100 * g0:.0f} → {100 * g1:.0f}%")
        assert line == expected
    # the fixture's iDPO-like run grows ×1.35 a step; the iLR-DPO-like one stays put
    assert "idpo: length" in parsed.lines[0] and "(×2." in parsed.lines[0]
    assert "(×1.0)" in parsed.lines[1]


def test_no_headline_without_gold(tmp_path):
    a = make_run(tmp_path, "a", growth=1.3, samples=False, train_logs=False, gold=False)
    b = make_run(tmp_path, "b", growth=1.0, samples=False, train_logs=False, gold=False, seed=2)
    page = write_report([a, b], tmp_path / "r.html").read_text()
    parsed = _parse(page)
    assert parsed.headline_seen == 0 and parsed.lines == []
    assert "Headline" not in page
    # the (length, reward) trajectory is one of the ordinary plots, right after length
    assert parsed.figures[:3] == ["reward", "length", "quality_vs_length"]


def test_headline_when_only_one_run_has_gold(tmp_path):
    gold = make_run(tmp_path, "gold", growth=1.0, samples=False, train_logs=False)
    plain = make_run(tmp_path, "plain", growth=1.2, samples=False, train_logs=False, gold=False)
    parsed = _parse(write_report([gold, plain], tmp_path / "r.html").read_text())
    assert parsed.headline_seen == 1
    assert parsed.lines[0].startswith("gold: length ") and "gold 40 → 55%" in parsed.lines[0]
    assert parsed.lines[1].startswith("plain: length ") and "gold " not in parsed.lines[1][7:]


def test_headline_summary_edge_cases(tmp_path):
    run = tmp_path / "chars_only"
    _write_jsonl(run / "metrics.jsonl", [
        {"iteration": 0, "mean_chars": 200.0, "gold_accuracy": 0.391},
        {"iteration": 1, "mean_chars": 300.0, "gold_accuracy": None},
        {"iteration": 2, "mean_chars": 500.0, "gold_accuracy": 0.476},
    ])
    assert headline_summary(load_run(run)) == (
        "chars_only: length 200 → 500 chars (×2.5), gold 39 → 48%")
    short = tmp_path / "short"
    _write_jsonl(short / "metrics.jsonl", [
        {"iteration": 0, "mean_tokens": 7.905, "gold_accuracy": 0.905},
        {"iteration": 3, "mean_tokens": 9.29, "gold_accuracy": 0.92},
    ])
    assert headline_summary(load_run(short)) == (
        "short: length 7.9 → 9.3 tokens (×1.2), gold 90.5 → 92.0%")
    empty = tmp_path / "empty_run"
    _write_jsonl(empty / "metrics.jsonl", [{"iteration": 0}])
    assert headline_summary(load_run(empty)) == "empty_run: no length or gold metrics yet"


def test_length_plot_rings_the_iterations_the_length_guard_trained_again(tmp_path):
    from prefloop.report import _plot_length

    run = tmp_path / "guarded"
    _write_jsonl(run / "metrics.jsonl", [
        {"iteration": 0, "mean_tokens": 30.0},
        {"iteration": 1, "mean_tokens": 31.0, "trainings": 1, "length_target": 30.0,
         "length_target_unit": "tokens"},
        {"iteration": 2, "mean_tokens": 30.5, "trainings": 3, "length_target": 30.0,
         "length_target_unit": "tokens"},
    ])
    fig = _plot_length([load_run(run)])
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "guarded retrained by the length guard" in labels
    rings = [c for c in ax.collections if c.get_label().endswith("length guard")]
    assert rings[0].get_offsets().tolist() == [[2.0, 30.5]]  # only the retrained iteration
    assert [t.get_text() for t in ax.texts] == ["×3"]
    write_report([run])  # and the whole report renders with it
