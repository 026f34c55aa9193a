"""`prefloop evaluate` (win rate and length-controlled win rate of A vs B) and `report`."""

from __future__ import annotations

import argparse
import sys

from prefloop.cli.common import (
    add_reward_options,
    check_response_values,
    print_rows,
    require_fields,
    reward_config,
)
from prefloop.cli.stages import add_backend_options, backend_options
from prefloop.errors import PrefloopError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("evaluate", help="win rate and length-controlled win rate of A vs B")
    ev.add_argument("a", help="model A: a responses .jsonl (prompt_id, prompt, response) or a "
                    "model to sample from on --prompts")
    ev.add_argument("b", help="baseline B on the same prompts: a .jsonl or a model")
    add_reward_options(ev)
    ev.add_argument("--prompts", help="prompts to sample from when A or B is a model")
    ev.add_argument("--prompt-column", default="prompt",
                    help="the --prompts column: a string or chat messages")
    ev.add_argument("--chat", action="store_true",
                    help="send a plain-text prompt as one user message, through the model's "
                    "chat template (for an instruction-tuned model)")
    ev.add_argument("--limit", type=int, default=0, help="use the first N prompts")
    ev.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    ev.add_argument("--max-new-tokens", type=int, default=256,
                    help="longest answer sampled from a model")
    ev.add_argument("--seed", type=int, default=0,
                    help="sampling seed; with --judge-order random, the order's seed")
    ev.add_argument("--rescore", action="store_true", help="score even rows that have a score")
    ev.add_argument("--lc-fit", default="glm", choices=("glm", "alpacaeval"),
                    help="glm: maximum likelihood; alpacaeval: AlpacaEval's L1 fit with C by CV")
    ev.add_argument("--difficulty-column", metavar="NAME",
                    help="per-prompt difficulty covariate θ_d of the LC GLM: a number in the "
                    "response rows (A's, then B's) or in the --prompts rows (matched by "
                    "prompt_id, or by row number in a file without that field)")
    ev.add_argument("--verbose-baseline", metavar="FILE",
                    help="responses .jsonl of B prompted to be verbose, on the same prompts: "
                    "regularises the LC GLM's length slope as AlpacaEval 2 does")
    ev.add_argument("--concise-baseline", metavar="FILE",
                    help="responses .jsonl of B prompted to be concise (as --verbose-baseline)")
    ev.add_argument("--regularize-lambda", type=float, default=0.2, metavar="λ",
                    help="total weight per row of the verbose/concise rows, shared among the "
                    "files given (default 0.2, AlpacaEval's)")
    ev.add_argument("--batch-size", type=int, default=16,
                    help="prompts per generate call when sampling a model")
    ev.add_argument("--trust-remote-code", action="store_true",
                    help="run a model's own code from its directory or hub repo")
    ev.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    ev.add_argument("--judgements-out", metavar="FILE",
                    help="write one JSONL row per prompt: both responses, the scores (or the "
                    "LLM judge's verdicts) and the preference (1 = A better)")
    ev.add_argument("--alpaca-eval-dir", metavar="DIR",
                    help="write alpaca_eval's files there: model_outputs.json (A), "
                    "reference_outputs.json (B) and, with --judge-model, annotations.json "
                    "(`alpaca_eval --model_outputs DIR/model_outputs.json ...` reads them)")
    ev.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"),
                    help="generator names of A and B in the alpaca_eval files (default: the "
                    "file or model names; B from its alpaca_eval file's `generator`)")
    add_backend_options(ev)
    add_judge_options(ev)
    ev.set_defaults(func=_cmd_evaluate, defaults={
        a.dest: a.default for a in ev._actions if a.option_strings and a.dest != "help"})

    report = sub.add_parser("report", help="HTML report with plots for one or more run dirs")
    report.add_argument("runs", nargs="+", help="run directories (several are overlaid)")
    report.add_argument("--out", help="HTML path (default: RUN/report.html)")
    report.set_defaults(func=_cmd_report)


def add_judge_options(ev: argparse.ArgumentParser) -> None:
    """The LLM judge's options of `prefloop evaluate` (prefloop.judge.JudgeConfig)."""
    from prefloop.judge_config import BASE_URL_ENV, JudgeConfig

    d = JudgeConfig()
    g = ev.add_argument_group(
        "LLM judge (AlpacaEval 2 protocol, any OpenAI-compatible server; replaces the reward)")
    g.add_argument("--judge-model", metavar="NAME",
                   help="judge A vs B with this model on an OpenAI-compatible server instead of "
                   "a reward; B may also be an alpaca_eval outputs .json "
                   "([{instruction, output, generator}], matched by instruction)")
    g.add_argument("--judge-base-url", metavar="URL",
                   help=f"the server's base URL, e.g. http://127.0.0.1:8000/v1 (default: "
                   f"${BASE_URL_ENV}, then $OPENAI_BASE_URL, then OpenAI's API)")
    g.add_argument("--judge-api-key-env", metavar="VAR", default=d.api_key_env,
                   help="environment variable holding the API key (default %(default)s; unset:"
                   " no key, fine for a local server)")
    g.add_argument("--judge-order", choices=("both", "random"), default=d.order,
                   help="against position bias: judge each prompt in both orders and average "
                   "(2 requests per prompt), or in one order drawn from --seed (default "
                   "%(default)s)")
    g.add_argument("--judge-top-logprobs", type=int, default=d.top_logprobs, metavar="K",
                   help="top log-probs asked for the answer token; the preference is read from"
                   " them, else from the text; 0: text only (default %(default)s)")
    g.add_argument("--judge-concurrency", type=int, default=d.concurrency, metavar="N",
                   help="requests in flight (default %(default)s)")
    g.add_argument("--judge-max-retries", type=int, default=d.max_retries, metavar="N",
                   help="retries of a request after 429, 5xx, a timeout or a connection error,"
                   " with exponential back-off (default %(default)s)")
    g.add_argument("--judge-timeout", type=float, default=d.timeout, metavar="S",
                   help="seconds per request (default %(default)s)")
    g.add_argument("--judge-cache", metavar="FILE",
                   help="JSONL cache of the judge's answers: a re-run or resume sends only "
                   "what is missing (default: none)")
    g.add_argument("--judge-summary", metavar="FILE",
                   help="write the judge's summary as JSON (the `iter_t/judge.json` a run's "
                   "report shows)")


# options that only mean something when A or B is a model to sample from
SAMPLING_OPTIONS = ("prompt_column", "chat", "temperature", "max_new_tokens", "batch_size",
                    "backend", "dtype", "tensor_parallel_size", "gpu_memory_utilization",
                    "max_model_len", "enable_prefix_caching", "engine_arg")


def _refuse_unused_options(args: argparse.Namespace) -> None:
    """An option that does not apply to this comparison raises instead of being ignored."""
    from pathlib import Path

    def given(dest: str) -> bool:
        return getattr(args, dest) != args.defaults[dest]

    def flag(dest: str) -> str:
        return "--" + {"enable_prefix_caching": "no-prefix-caching"}.get(
            dest, dest.replace("_", "-"))

    if not args.judge_model:
        for dest in args.defaults:
            if dest.startswith("judge_") and given(dest):
                raise PrefloopError(f"{flag(dest)}: only with --judge-model (the LLM judge)")
    files = all(Path(x).suffix in (".jsonl", ".json") for x in (args.a, args.b))
    if files:
        for dest in SAMPLING_OPTIONS:
            if given(dest):
                raise PrefloopError(f"{flag(dest)}: A and B are both responses files; it "
                                    "applies only to sampling a model")
        if args.prompts and not args.difficulty_column:
            raise PrefloopError("--prompts: A and B are both responses files; --prompts is "
                                "read only to sample a model or for --difficulty-column")
    if args.names and not (args.alpaca_eval_dir or args.judgements_out or args.judge_model):
        raise PrefloopError("--names: names the generators in --alpaca-eval-dir, "
                            "--judgements-out or the judge's files; none is asked for")
    if given("regularize_lambda") and not (args.verbose_baseline or args.concise_baseline):
        raise PrefloopError("--regularize-lambda: weighs --verbose-baseline/--concise-baseline "
                            "rows; neither is given")
    if args.reward_model and args.reward_function:
        raise PrefloopError("--reward-model and --reward-function: give one reward")


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prefloop import evaluate as ev
    from prefloop.data import load_rows, read_jsonl
    from prefloop.workers import Processes, score_rows

    _refuse_unused_options(args)
    if args.judge_model:
        return _cmd_judge(args)
    procs = Processes()
    a, b = _first_prompts(_responses(args.a, args, procs), args.limit), \
        _responses(args.b, args, procs)
    variants = []  # the baseline prompted to be verbose / concise: responses files only
    for flag, path in (("--verbose-baseline", args.verbose_baseline),
                       ("--concise-baseline", args.concise_baseline)):
        if path and Path(path).suffix != ".jsonl":
            raise PrefloopError(f"{path}: {flag} takes a responses .jsonl file (prompt_id, "
                                "prompt, response), the baseline's answers on the same prompts")
        if path:
            variants.append((path, read_jsonl(path)))
    for rows, path in ((a, args.a), (b, args.b), *((r, p) for p, r in variants)):
        require_fields(rows, path, ("prompt_id", "prompt", "response"))
        check_response_values(rows, path, scores=not args.rescore)
    for rows in (a, b, *(r for _, r in variants)):
        if args.rescore or any("score" not in r for r in rows):
            scores = score_rows(rows, reward_config(args), procs, args.trust_remote_code,
                                not args.quiet)
            for r, s in zip(rows, scores, strict=True):
                r["score"] = s
    if not procs.is_main:
        return 0
    difficulty = None
    if args.difficulty_column:
        sources = [(args.a, a), (args.b, b)]
        if args.prompts:
            sources.append((args.prompts, load_rows(args.prompts)))

        def difficulty(ids: list[str]):
            return ev.prompt_numbers(args.difficulty_column, ids, sources)
    result = ev.compare(a, b, args.lc_fit, difficulty, variants, args.regularize_lambda,
                        names=(args.a, args.b))
    pa, pb, wr, lc, regularize = result.a, result.b, result.win_rate, result.lc, \
        result.regularize
    sa, sb = [r["score"] for r in pa], [r["score"] for r in pb]
    chars_a, chars_b = [ev.response_chars(r) for r in pa], [ev.response_chars(r) for r in pb]
    la = ev.length_stats([r.get("num_tokens", 0) for r in pa], chars_a)
    lb = ev.length_stats([r.get("num_tokens", 0) for r in pb], chars_b)
    thetas = f"θ_len {lc.theta_length:+.3f}, θ_m {lc.theta_model:+.3f}"
    if lc.theta_difficulty is not None:
        thetas += f", θ_d {lc.theta_difficulty:+.3f}"
    rows = [
        ("prompts", wr.n),
        ("win rate (soft)", f"{ev.format_rate(wr.soft)} ± {wr.soft_se:.1f}"),
        ("win rate (hard, ties ½)", f"{ev.format_rate(wr.hard)} ± {wr.hard_se:.1f}"),
        ("length-controlled win rate", ev.format_rate(lc.lc)
         + (f" ({len(lc.warnings)} warning(s) below)" if lc.warnings else "")),
        (f"LC GLM ({lc.fit})", thetas + (f", C {lc.C:.3g}" if lc.C is not None else "")),
    ]
    if regularize:
        rows.append(("LC regularised: rows, λ", " + ".join(
            f"{len(r[0])} {Path(p).name}" for (p, _), r in zip(variants, regularize, strict=True))
            + f", λ {args.regularize_lambda:g}"))
    rows += [
        ("mean / median chars A", f"{la['mean_chars']:.0f} / {la['median_chars']:.0f}"),
        ("mean / median chars B", f"{lb['mean_chars']:.0f} / {lb['median_chars']:.0f}"),
        ("mean reward A / B", f"{sum(sa) / len(sa):+.3f} / {sum(sb) / len(sb):+.3f}"),
    ]
    print_rows(f"prefloop evaluate: {args.a} vs {args.b}", rows)
    _print_lc_warnings(lc.warnings)
    for text in _unmatched_warnings(a, b, wr.n, (args.a, args.b), bool(args.limit)):
        print(f"prefloop evaluate: warning: {text}", file=sys.stderr)
    if args.judgements_out or args.alpaca_eval_dir:
        from prefloop.io import write_jsonl
        from prefloop.judge import reward_judgements, write_alpaca_eval_files

        per_prompt = reward_judgements(pa, pb, _names(args, b))
        if args.judgements_out:
            write_jsonl(args.judgements_out, per_prompt)
        if args.alpaca_eval_dir:
            write_alpaca_eval_files(args.alpaca_eval_dir, per_prompt)
    return 0


def _names(args: argparse.Namespace, b_rows: list[dict]) -> tuple[str, str]:
    """Generator names of A and B: --names, else the sources' names."""
    from pathlib import Path

    if args.names:
        return args.names[0], args.names[1]

    def name(source: str) -> str:
        path = Path(source)
        return path.stem if path.suffix in (".jsonl", ".json") else path.name or source

    generator = b_rows[0].get("generator") if b_rows else None
    return name(args.a), generator if isinstance(generator, str) else name(args.b)


def _judge_responses(source: str, args: argparse.Namespace, procs) -> list[dict]:
    """Rows of a responses .jsonl, an alpaca_eval outputs .json, or samples from a model."""
    from pathlib import Path

    from prefloop.judge import load_alpaca_eval_outputs

    if Path(source).suffix == ".json":
        return load_alpaca_eval_outputs(source)
    rows = _responses(source, args, procs)
    require_fields(rows, source, ("prompt", "response"))
    check_response_values(rows, source, scores=False)
    return rows


def _cmd_judge(args: argparse.Namespace) -> int:
    """`prefloop evaluate A B --judge-model NAME`: A judged against B by an LLM judge."""
    from prefloop.evaluate import format_rate
    from prefloop.judge import JudgeConfig, judge_pairs, write_judge_files
    from prefloop.workers import Processes

    cfg = JudgeConfig(model=args.judge_model, base_url=args.judge_base_url or "",
                      api_key_env=args.judge_api_key_env, order=args.judge_order,
                      seed=args.seed, top_logprobs=args.judge_top_logprobs,
                      concurrency=args.judge_concurrency, max_retries=args.judge_max_retries,
                      timeout=args.judge_timeout, lc_fit=args.lc_fit)
    cfg.validate("judge")
    for flag, value in (("--reward-model", args.reward_model),
                        ("--reward-function", args.reward_function),
                        ("--rescore", args.rescore),
                        ("--difficulty-column", args.difficulty_column),
                        ("--verbose-baseline", args.verbose_baseline),
                        ("--concise-baseline", args.concise_baseline)):
        if value:
            raise PrefloopError(f"{flag}: not used with --judge-model (the LLM judge replaces "
                                "the reward, and its LC fit has no difficulty or prompted "
                                "baselines)")
    procs = Processes()
    a = _first_prompts(_judge_responses(args.a, args, procs), args.limit)
    b = _judge_responses(args.b, args, procs)
    if not procs.is_main:
        return 0
    result = judge_pairs(cfg, a, b, args.judge_cache, progress=not args.quiet,
                         names=_names(args, b))
    write_judge_files(result, args.judgements_out, args.judge_summary, args.alpaca_eval_dir)
    s = result.summary

    def rate(key: str) -> str:
        return "n/a" if s[key] is None else f"{format_rate(s[key])} ± {s[key + '_se']:.1f}"

    print_rows(f"prefloop evaluate: {args.a} vs {args.b}, judged by {cfg.model}", [
        ("prompts judged / matched", f"{s['n']} / {s['n_prompts']}"),
        ("unparseable / failed", f"{s['n_unparseable']} / {s['n_failed']}"),
        ("win rate (mean preference)", rate("win_rate")),
        ("win rate (discrete, ties ½)", rate("discrete_win_rate")),
        (f"length-controlled win rate ({s['lc_fit']})", rate("lc_win_rate")),
        ("order, labels", f"{s['order']}, {' / '.join(s['labels'])}"),
        ("read from logprobs / text / mixed", " / ".join(str(s["methods"][m]) for m in
                                                       ("logprobs", "text", "mixed"))),
        ("requests sent / cached", f"{s['requests_sent']} / {s['requests_cached']}"),
        ("tokens spent (prompt / completion)",
         f"{s['prompt_tokens']} / {s['completion_tokens']}"),
    ])
    _print_lc_warnings(tuple(s["lc_warnings"]))
    for text in s["warnings"]:
        print(f"prefloop evaluate: warning: judge: {text}", file=sys.stderr)
    return 0


def _print_lc_warnings(warnings: tuple[str, ...]) -> None:
    """One stderr line per reason to distrust the LC win rate (see evaluate.lc_warnings)."""
    for text in warnings:
        print(f"prefloop evaluate: warning: length-controlled win rate: {text}", file=sys.stderr)


def _first_prompts(rows: list[dict], limit: int) -> list[dict]:
    """The rows of the first `limit` prompts (by prompt_id, else by prompt text); all when 0.
    A model's samples are already limited (--limit cuts --prompts); this cuts a file."""
    if not limit:
        return rows
    kept: set = set()
    out = []
    for row in rows:
        key = row.get("prompt_id", str(row.get("prompt")))
        if key not in kept and len(kept) == limit:
            continue
        kept.add(key)
        out.append(row)
    return out


def _unmatched_warnings(a: list[dict], b: list[dict], compared: int, names: tuple[str, str],
                        limited: bool = False) -> list[str]:
    """Why fewer prompts were compared than A or B hold: prompts without a partner (B's
    not counted under --limit, which cuts A), and prompts with several rows (the first of
    each is compared)."""
    notes = []
    for rows, name, other in ((a, names[0], b), *(() if limited else ((b, names[1], a),))):
        ids = [r.get("prompt_id") for r in rows]
        distinct = len(set(ids))
        if distinct > compared:
            notes.append(f"{distinct - compared} of {distinct} prompts of {name} have no "
                         f"answer in {names[1] if other is b else names[0]}; compared on "
                         f"{compared}")
        if distinct < len(ids):
            notes.append(f"{name} has {len(ids) - distinct} rows beyond the first of their "
                         "prompt_id; only the first of each is compared")
    return notes


def _responses(source: str, args: argparse.Namespace, procs) -> list[dict]:
    """Rows of a responses file, or one sample per prompt drawn from a model."""
    from pathlib import Path

    from prefloop.config import SamplingConfig
    from prefloop.data import read_jsonl
    from prefloop.prompts import PromptsConfig, load_prompts
    from prefloop.workers import sample_prompts

    if Path(source).suffix == ".jsonl":
        return read_jsonl(source)
    if not args.prompts:
        raise PrefloopError(f"{source}: a model needs --prompts to sample from "
                            "(or give a responses .jsonl file)")
    prompts = load_prompts(PromptsConfig(path=args.prompts, column=args.prompt_column,
                                         limit=args.limit, chat=args.chat))
    sampling = SamplingConfig(num_samples=1, temperature=args.temperature,
                              max_new_tokens=args.max_new_tokens, seed=args.seed,
                              **backend_options(args))
    sampling.validate()
    return sample_prompts(source, prompts, sampling, procs, args.trust_remote_code,
                          not args.quiet)


def _cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from prefloop.loop.rundir import RunDir
    from prefloop.report import write_report

    runs = [Path(r) for r in args.runs]
    path = write_report(runs, Path(args.out) if args.out else RunDir(runs[0]).report)
    print_rows("prefloop report", [("runs", len(runs)), ("report", str(path))])
    return 0
