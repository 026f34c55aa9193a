"""`prefloop train`, `sft` and `reward-model`: training from a config file and overrides."""

from __future__ import annotations

import argparse

from prefloop.cli.common import OVERRIDES_HELP, print_rows


def add_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser(
        "train", help="offline preference training (DPO family) on a preference dataset",
        description="Train a causal LM on prompt/chosen/rejected pairs with any registered "
        "loss. Run under `accelerate launch --num_processes N` for data parallelism.",
    )
    train.add_argument("config", nargs="?", help="YAML config (see `prefloop config`)")
    train.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    train.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    train.add_argument("--overwrite", action="store_true",
                       help="replace output_dir when it exists (refused otherwise)")
    train.set_defaults(func=_cmd_train)

    for name, func, help_, example in [
        ("sft", _cmd_sft, "supervised fine-tuning on prompt/completion or messages rows",
         "training.lr=1e-5 l1_delta=1e-4"),
        ("reward-model", _cmd_reward_model, "Bradley–Terry reward model from preference pairs",
         "training.lr=1e-5 center_coef=0.01"),
    ]:
        p = sub.add_parser(name, help=help_, description=help_ + ". Run under `accelerate "
                           "launch --num_processes N` for data parallelism.")
        p.add_argument("config", nargs="?", help="YAML config")
        p.add_argument("overrides", nargs="*", help="dotted overrides (every key and its "
                       f"default: prefloop config --kind {name}), e.g. {example}")
        p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
        p.add_argument("--overwrite", action="store_true",
                       help="replace output_dir when it exists (refused otherwise)")
        p.set_defaults(func=func)


def _cmd_train(args: argparse.Namespace) -> int:
    from prefloop.config import TrainConfig, load_config
    from prefloop.summary import print_table
    from prefloop.trainer import train_preferences

    cfg = load_config(TrainConfig, args.config, args.overrides)
    from prefloop.harness import refuse_existing_output

    refuse_existing_output(cfg.output_dir, args.overwrite)
    result = train_preferences(cfg, progress=not args.quiet)
    if not result.is_main_process:
        return 0
    first, last = result.log[0], result.log[-1]
    params = ", ".join(f"{k}={v:.4g}" for k, v in result.loss_params.items())
    print_table("prefloop train", [
        ("model", cfg.model),
        ("loss", f"{cfg.loss.name}({params})"
         + (f" — α {result.alpha_steps[0]:.4g} → {result.alpha_steps[-1]:.4g} "
            f"(loss.length_control.mode={cfg.loss.alpha_mode})"
            if result.alpha_steps and cfg.loss.alpha_mode != "fixed" else "")),
        ("steps", result.steps),
        ("pairs seen", result.pairs_seen),
        ("pairs/s", result.pairs_per_second),
        ("loss first → last", f"{first['loss']:.4f} → {last['loss']:.4f}"),
        ("accuracy first → last", f"{first['accuracy']:.2f} → {last['accuracy']:.2f}"),
        ("margin last", last["margin"]),
        ("truncated prompts / responses / skipped",
         "{prompts_truncated} / {responses_truncated} / {skipped}".format(**result.truncation)
         if result.truncation else "-"),
        ("output", str(result.output_dir)),
    ])
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from prefloop.config import load_config
    from prefloop.sft import SFTConfig, train_sft

    cfg = load_config(SFTConfig, args.config, args.overrides)
    from prefloop.harness import refuse_existing_output

    refuse_existing_output(cfg.output_dir, args.overwrite)
    result = train_sft(cfg, progress=not args.quiet)
    if not result.is_main_process:
        return 0
    s, first, last = result.summary, result.log[0], result.log[-1]
    print_rows("prefloop sft", [
        ("model", cfg.model), ("steps", result.steps), ("examples seen", result.examples_seen),
        ("tokens/s", s["tokens_per_second"]),
        ("loss first → last", f"{first['loss']:.4f} → {last['loss']:.4f}"),
        ("delta sparsity (|δ| ≤ 1e-8)", s["delta_sparsity"]),
        ("truncated prompts / responses / skipped",
         "{prompts_truncated} / {responses_truncated} / {skipped}".format(**result.truncation)),
        ("output", str(result.output_dir)),
    ])
    return 0


def _cmd_reward_model(args: argparse.Namespace) -> int:
    from prefloop.config import load_config
    from prefloop.reward_training import RewardModelConfig, train_reward_model

    cfg = load_config(RewardModelConfig, args.config, args.overrides)
    from prefloop.harness import refuse_existing_output

    refuse_existing_output(cfg.output_dir, args.overwrite)
    result = train_reward_model(cfg, progress=not args.quiet)
    if not result.is_main_process:
        return 0
    s, first, last = result.summary, result.log[0], result.log[-1]
    print_rows("prefloop reward-model", [
        ("model", cfg.model), ("head", s["head"]), ("steps", result.steps),
        ("pairs train / eval", f"{s['num_train_pairs']} / {s['num_eval_pairs']}"),
        ("loss first → last", f"{first['loss']:.4f} → {last['loss']:.4f}"),
        ("train accuracy (last epoch)", s["train_accuracy"]),
        ("eval accuracy", "-" if s["eval_accuracy"] is None else f"{s['eval_accuracy']:.3f}"),
        ("output", str(result.output_dir)),
    ])
    return 0
