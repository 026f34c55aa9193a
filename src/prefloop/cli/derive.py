"""`prefloop merge` and `distill`: a new model made from existing ones."""

from __future__ import annotations

import argparse

from prefloop.cli.common import print_rows


def add_parsers(sub: argparse._SubParsersAction) -> None:
    mrg = sub.add_parser(
        "merge", help="merge fine-tuned models through their deltas to a base (PAFT)",
        description="θ = θ_base + merge(θ_k − θ_base): task arithmetic, TIES, or DARE followed "
        "by either. Reads safetensors tensor by tensor; writes an HF model directory with the "
        "base's config and tokenizer. Options set config keys; key=value overrides win.",
    )
    mrg.add_argument("config", nargs="?", help="YAML config (keys of MergeConfig)")
    mrg.add_argument("overrides", nargs="*", help="dotted overrides, e.g. scale=0.8 seed=1")
    mrg.add_argument("--base", help="the model directory the others were fine-tuned from")
    mrg.add_argument("--models", nargs="+", metavar="DIR", help="fine-tuned model directories")
    mrg.add_argument("--method", help="task_arithmetic (default) | ties | dare_linear | dare_ties")
    mrg.add_argument("--weights", nargs="+", type=float, metavar="W",
                     help="one weight per model (default 1 each)")
    mrg.add_argument("--density", nargs="+", type=float, metavar="RHO",
                     help="share of each delta kept, one value or one per model (ties, dare_*; "
                     "DARE drops with probability 1 − ρ)")
    mrg.add_argument("--scale", type=float, help="λ, multiplies the merged delta (default 1)")
    mrg.add_argument("--seed", type=int, help="seed of DARE's drops (default 0)")
    mrg.add_argument("--out", help="output model directory")
    mrg.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    mrg.set_defaults(func=_cmd_merge)

    dst = sub.add_parser(
        "distill", help="distil a teacher into a student: teacher vs student answers, daDPO",
        description="Sample the teacher's and the student's answers on the prompts, pair them "
        "(teacher preferred), and train the student with daDPO (γ > 0) or dDPO (γ = 0). The "
        "teacher must share the student's tokenizer. Options set config keys; key=value "
        "overrides (e.g. training.lr=1e-6 prompts.id_column=id) win.",
    )
    dst.add_argument("config", nargs="?", help="YAML config (keys of DistillConfig)")
    dst.add_argument("overrides", nargs="*",
                     help="dotted overrides, e.g. training.lr=1e-6 prompts.id_column=id")
    dst.add_argument("--student", help="the student's SFT model (policy and reference)")
    dst.add_argument("--teacher", help="the teacher model (same tokenizer)")
    dst.add_argument("--prompts", help="prompts: jsonl/parquet/dir/hub id")
    dst.add_argument("--limit", type=int, help="use the first N prompts")
    dst.add_argument("-n", "--num-samples", type=int, help="answers per prompt from each model")
    dst.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    dst.add_argument("--max-new-tokens", type=int)
    dst.add_argument("--beta", type=float, help="β (default 0.1)")
    dst.add_argument("--gamma", type=float, help="γ, the teacher's weight; 0 = dDPO (default 0.5)")
    dst.add_argument("--out", help="output model directory (with pairs.jsonl and logs)")
    dst.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    dst.set_defaults(func=_cmd_distill)


def _options_as_overrides(options: list[tuple[str, object]]) -> list[str]:
    """Command-line options as dotted overrides (JSON-quoted, so paths stay strings); they go
    before the user's own `key=value` overrides, which win."""
    import json

    return [f"{key}={json.dumps(value)}" for key, value in options if value is not None]

def _cmd_merge(args: argparse.Namespace) -> int:
    from prefloop.config import load_config
    from prefloop.merge import SPARSITY_TOLERANCE, MergeConfig, merge_models

    options = [("base", args.base), ("models", args.models), ("method", args.method),
               ("weights", args.weights), ("density", args.density), ("scale", args.scale),
               ("seed", args.seed), ("output_dir", args.out)]
    cfg = load_config(MergeConfig, args.config, _options_as_overrides(options) + args.overrides)
    result = merge_models(cfg, progress=not args.quiet)
    tol = f"{SPARSITY_TOLERANCE:g}"
    print_rows(f"delta sparsity (share of δ = θ − θ_base exactly 0 / |δ| ≤ {tol})", [
        (model, f"{d.zero_share:.2%} / {d.near_zero_share:.2%}   mean |δ| "
                f"{d.l1 / max(d.elements, 1):.3g}")
        for model, d in zip(cfg.models, result.deltas, strict=True)
    ] + [("merged", f"{result.merged.zero_share:.2%} / {result.merged.near_zero_share:.2%}")])
    print_rows("prefloop merge", [
        ("base", cfg.base), ("method", cfg.method),
        ("weights", ", ".join(f"{w:g}" for w in cfg.model_weights())),
        ("density", ", ".join(f"{d:g}" for d in cfg.model_densities())
         if cfg.method != "task_arithmetic" else "-"),
        ("scale λ", cfg.scale), ("tensors / parameters", f"{result.tensors} / {result.parameters}"),
        ("seconds", result.seconds), ("output", str(result.output_dir)),
    ])
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from prefloop.config import load_config
    from prefloop.distill import DistillConfig, distill

    options = [("student", args.student), ("teacher", args.teacher),
               ("prompts.path", args.prompts), ("prompts.limit", args.limit),
               ("sampling.num_samples", args.num_samples),
               ("sampling.temperature", args.temperature),
               ("sampling.max_new_tokens", args.max_new_tokens), ("beta", args.beta),
               ("gamma", args.gamma), ("output_dir", args.out)]
    cfg = load_config(DistillConfig, args.config, _options_as_overrides(options) + args.overrides)
    result = distill(cfg, progress=not args.quiet)
    if not result.is_main_process:
        return 0
    p, log = result.pairs, result.train.log
    print_rows("prefloop distill", [
        ("student / teacher", f"{cfg.student} / {cfg.teacher}"), ("objective", cfg.objective),
        ("prompts", p.prompts),
        ("pairs (identical answers dropped)", f"{p.pairs} ({p.identical_dropped})"),
        ("mean tokens teacher / student",
         f"{p.teacher_mean_tokens:.1f} / {p.student_mean_tokens:.1f}"),
        ("steps", result.train.steps),
        ("loss first → last", f"{log[0]['loss']:.4f} → {log[-1]['loss']:.4f}"),
        ("accuracy first → last", f"{log[0]['accuracy']:.2f} → {log[-1]['accuracy']:.2f}"),
        ("output", str(result.output_dir)),
    ])
    return 0

