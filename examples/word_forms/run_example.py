"""Word forms: does prefloop's length control hold on a task family nobody tuned it on?

From nothing, through prefloop's public interfaces only (its CLI and YAML configs):

  1. data        task.py writes SFT rows and the iteration / eval prompt sets (seeded)
  2. models      a byte-level BPE tokenizer trained on the task's text and a random 2-layer,
                 64-wide LlamaForCausalLM, saved as an HF directory (tokenizers/transformers)
  3. SFT         `prefloop sft configs/sft.yaml` on right/wrong, concise/verbose answers
  4. loops       `prefloop run configs/loop.yaml` twice from the same SFT policy:
                 iDPO (loss dpo) and iLR-DPO (loss lr_dpo, no α: prefloop's default)
  5. report      `prefloop report` over both run directories
  6. verdict     a table per iteration and the pass/fail lines of the length story (with
                 --trainings N, also over N trainings: prefloop.demo.over_trainings)

Every step skips what is already done, and the loops resume, so a rerun only re-reads
the finished runs. Usage:

    python examples/word_forms/run_example.py                 # seed 0, ~4 min on one core
    python examples/word_forms/run_example.py --quick         # plumbing check, ~1 min
    python examples/word_forms/run_example.py --seed 1 --lr-scale 0.5
    python examples/word_forms/run_example.py --trainings 3   # + 2 more trainings, ~3 min
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import task  # noqa: E402  (the example's own module, next to this file)

RUNS = {"idpo": ["loss.name=dpo"], "ilr-dpo": []}  # loop.yaml's loss is lr_dpo without α
LOOP_LR = 2e-4  # configs/loop.yaml's training.lr (the testbed demo's)

# full: the testbed demo's sizes; quick: enough to see every stage run
SIZES = {
    "full": dict(sft_examples=2000, sft_epochs=20, prompts_per_iteration=512,
                 eval_prompts=500, iterations=3),
    "quick": dict(sft_examples=500, sft_epochs=4, prompts_per_iteration=48,
                  eval_prompts=64, iterations=2),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Build the word-forms task, SFT a tiny Llama on it, run iDPO and iLR-DPO "
        "with the testbed demo's loop settings, and check the length story.")
    p.add_argument("--seed", type=int, default=0, help="seeds data, models, sampling, training")
    p.add_argument("--out", help="output directory (default runs/word_forms/seed-S, with "
                   "-quick, -lrX and -itN when those are set)")
    lr = p.add_mutually_exclusive_group()
    lr.add_argument("--lr", type=float, help=f"loop learning rate (default {LOOP_LR:g}, "
                    "configs/loop.yaml)")
    lr.add_argument("--lr-scale", type=float, help="multiply the loop learning rate")
    p.add_argument("--iterations", type=int, help="loop iterations (default 3; 2 with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="reduced sizes (short SFT, 48 prompts per iteration, 64 eval prompts): "
                   "checks the pipeline, not the story")
    p.add_argument("--ilr-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra override for the iLR-DPO run only, e.g. loss.auto_alpha=true "
                   "(give another --out: a changed config is refused in an existing run dir)")
    p.add_argument("--trainings", type=int, default=1, metavar="N",
                   help="train both loops N times from the same SFT policy (training seeds "
                        "S, S+1000, …; runs idpo-train-K, ilr-dpo-train-K) and check the "
                        "claims on the means over the N trainings")
    p.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    p.add_argument("-v", "--verbose", action="store_true", help="progress bars of prefloop")
    args = p.parse_args(argv)
    if args.trainings < 1:
        p.error("--trainings: must be ≥ 1")
    return args


# ---------------------------------------------------------------- 1. data


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.rename(path)


def write_data(out: Path, seed: int, size: dict) -> dict[str, Path]:
    """SFT rows, iteration prompts (one fresh slice per iteration) and eval prompts; the
    two prompt sets are separate seeded draws with distinct ids."""
    paths = {"sft": out / "sft.jsonl", "prompts": out / "prompts.jsonl",
             "eval": out / "eval_prompts.jsonl"}
    write_jsonl(paths["sft"], task.sft_rows(size["sft_examples"], seed + 1))
    write_jsonl(paths["prompts"], task.prompt_rows(
        size["prompts_per_iteration"] * size["iterations"], seed + 10, prefix="train"))
    write_jsonl(paths["eval"], task.prompt_rows(size["eval_prompts"], seed + 20, prefix="eval"))
    return paths


# ---------------------------------------------------------------- 2. tokenizer and model


def build_base_model(directory: Path, seed: int, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer trained on the task's text (<|pad|> pads, <|end|> ends a
    turn) and a randomly initialised 2-layer, 64-wide Llama, saved side by side."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    specials = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(task.corpus(seed), trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|pad|>",
                                  eos_token="<|end|>", padding_side="right")
    tok.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=2048,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id

    tmp = directory.with_name(f".{directory.name}.partial")
    hf_logging.disable_progress_bar()
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    tmp.rename(directory)


# ---------------------------------------------------------------- 3–5. the prefloop CLI


def prefloop(args: list[str], verbose: bool) -> None:
    """One `prefloop` command, single-threaded, with the task module importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(HERE),
                                                        os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "prefloop", *args, *([] if verbose else ["-q"])]
    print("$ prefloop " + " ".join(args), flush=True)
    done = subprocess.run(cmd, env=env)
    if done.returncode:
        sys.exit(f"prefloop {args[0]} failed (exit {done.returncode})")


def run_name(run: str, k: int) -> str:
    """The run directory of a loop's k-th training (k = 0: the run's own name)."""
    return run + (f"-train-{k}" if k else "")


def loop_overrides(name: str, out: Path, data: dict[str, Path], seed: int, size: dict,
                   lr: float | None, quick: bool, train_seed: int) -> list[str]:
    items = [f"name={name}", f"run_dir={out / name}", f"policy={out / 'sft'}",
             f"prompts.path={data['prompts']}", f"eval.prompts.path={data['eval']}",
             f"iterations={size['iterations']}", f"seed={seed}", f"sampling.seed={seed}",
             f"training.seed={train_seed}",
             f"eval.sampling.seed={seed + 1}"]
    if quick:
        items.append(f"prompts.per_iteration={size['prompts_per_iteration']}")
    if lr is not None:
        items.append(f"training.lr={lr}")
    return items


# ---------------------------------------------------------------- 6. verdict


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl, one record per iteration, with the α each lr_dpo iteration trained with
    as its train stage recorded it in manifest.json (first step, and mean over the steps
    when a controller moved it)."""
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    for m in records:
        train = stages.get(f"iter_{m['iteration']}/train", {})
        if train.get("alpha_mean") is not None:
            m["alpha_mean"] = train["alpha_mean"]
    return records


def table(metrics: dict[str, list[dict]]) -> str:
    sft = next(iter(metrics.values()))[0]
    head = (f"{'':<14}{'gold %':>13}{'reward':>9}{'tokens':>9}{'× SFT':>8}"
            f"{'α first/mean':>15}")
    lines = [head, "-" * len(head)]

    def row(label: str, m: dict) -> str:
        gold = f"{100 * m['gold_accuracy']:.1f} ± {100 * (m.get('gold_accuracy_se') or 0):.1f}"
        alpha = "-"
        if m.get("alpha") is not None:
            alpha = f"{m['alpha']:.3f}" + (f" / {m['alpha_mean']:.3f}" if "alpha_mean" in m
                                           else "")
        return (f"{label:<14}{gold:>13}{m['mean_reward']:>+9.2f}{m['mean_tokens']:>9.1f}"
                f"{m['mean_tokens'] / sft['mean_tokens']:>8.2f}{alpha:>15}")

    lines.append(row("SFT", sft))
    for name, records in metrics.items():
        lines += [row(f"{name} t={m['iteration']}", m) for m in records[1:]]
    return "\n".join(lines)


def starting_point(run_dir: Path) -> list[tuple[str, bool]]:
    """Is the SFT policy a sensible start, and is the reward length-biased on its samples?"""
    from itertools import combinations
    from statistics import mean, pstdev

    rows = [json.loads(x) for x in (run_dir / "iter_0" / "eval_samples.jsonl").open()]
    gold = 100 * mean(r["gold"] for r in rows)
    tokens = [r["num_tokens"] for r in rows]
    cv = pstdev(tokens) / mean(tokens)
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt_id"], []).append(r)
    wins = n = 0.0
    for group in by_prompt.values():  # same prompt, same gold, different length
        for a, b in combinations(group, 2):
            if a["gold"] == b["gold"] and a["num_tokens"] != b["num_tokens"]:
                n += 1
                wins += 0.5 if a["score"] == b["score"] else float(
                    (a["score"] > b["score"]) == (a["num_tokens"] > b["num_tokens"]))
    share = 100 * wins / n if n else float("nan")
    return [
        (f"SFT gold accuracy in [30, 60] % ({gold:.1f} %)", 30 <= gold <= 60),
        (f"SFT length spread: CV of tokens ≥ 0.3 ({cv:.2f})", cv >= 0.3),
        (f"reward prefers the longer of two same-gold answers to one prompt > 50 % "
         f"({share:.0f} % of {n:.0f} pairs)", share > 50),
    ]


def story(metrics: dict[str, list[dict]]) -> list[tuple[str, bool]]:
    sft = metrics["idpo"][0]
    gold0, tokens0 = 100 * sft["gold_accuracy"], sft["mean_tokens"]
    idpo, ilr = metrics["idpo"][-1], metrics["ilr-dpo"]
    ratios = [m["mean_tokens"] / tokens0 for m in ilr[1:]]
    gold_p, gold_r = 100 * idpo["gold_accuracy"], 100 * ilr[-1]["gold_accuracy"]
    return [
        (f"iDPO length ≥ 1.4× SFT at the last iteration ({idpo['mean_tokens'] / tokens0:.2f}×)",
         idpo["mean_tokens"] >= 1.4 * tokens0),
        ("iLR-DPO length within ±10 % of SFT at every iteration ("
         + ", ".join(f"{r:.2f}×" for r in ratios) + ")",
         all(abs(r - 1) <= 0.10 for r in ratios)),
        (f"iLR-DPO gold ≥ SFT + 8 points ({gold_r:.1f} vs {gold0:.1f})", gold_r >= gold0 + 8),
        (f"iLR-DPO gold ≥ iDPO − 2 points ({gold_r:.1f} vs {gold_p:.1f})",
         gold_r >= gold_p - 2),
    ]


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    size = dict(SIZES["quick" if args.quick else "full"])
    if args.iterations is not None:
        if args.iterations < 1:
            sys.exit("--iterations: must be ≥ 1")
        size["iterations"] = args.iterations
    lr = args.lr if args.lr is not None else (
        LOOP_LR * args.lr_scale if args.lr_scale is not None else None)
    out = Path(args.out or "runs/word_forms/seed-{}{}{}{}".format(
        args.seed, "-quick" if args.quick else "", f"-lr{lr:g}" if lr is not None else "",
        f"-it{args.iterations}" if args.iterations is not None else ""))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    print(f"== 1. data → {out}")
    data = write_data(out, args.seed, size)
    if not (out / "base" / "config.json").is_file():
        print("== 2. tokenizer and random Llama")
        build_base_model(out / "base", args.seed)
    if not (out / "sft" / "config.json").is_file():
        print(f"== 3. SFT ({size['sft_examples']} rows × {size['sft_epochs']} epochs)")
        prefloop(["sft", str(HERE / "configs" / "sft.yaml"), f"model={out / 'base'}",
                  f"output_dir={out / 'sft'}", f"data.path={data['sft']}",
                  f"training.seed={args.seed}", f"training.epochs={size['sft_epochs']}"],
                 args.verbose)
    from prefloop.demo import training_seed

    for k in range(args.trainings):
        for run, extra in RUNS.items():
            name = run_name(run, k)
            print(f"== 4. {name}: {size['iterations']} iterations")
            extra = extra + (args.ilr_set if run == "ilr-dpo" else [])
            prefloop(["run", str(HERE / "configs" / "loop.yaml"),
                      *loop_overrides(name, out, data, args.seed, size, lr, args.quick,
                                      training_seed(args.seed, k)), *extra, "--resume"],
                     args.verbose)
    print("== 5. report")
    prefloop(["report", *(str(out / name) for name in RUNS), "--out",
              str(out / "report.html")], verbose=True)

    metrics = {name: read_metrics(out / name) for name in RUNS}
    print(f"\nword forms, seed {args.seed}, loop lr {lr or LOOP_LR:g}"
          f"{' (quick)' if args.quick else ''}: gold accuracy over "
          f"{metrics['idpo'][0]['n']} eval samples (± one standard error, prompts as the "
          "unit), mean reward, mean length in tokens and its ratio to SFT's\n")
    print(table(metrics))
    checks = starting_point(out / "idpo") + story(metrics)
    print()
    for text, ok in checks:
        print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    if args.trainings > 1:
        from prefloop.demo import Outcome, over_trainings

        outcomes = [Outcome.of({run: read_metrics(out / run_name(run, k)) for run in RUNS})
                    for k in range(args.trainings)]
        checks += over_trainings(outcomes)
        print(f"\nover {args.trainings} trainings (training seeds "
              + ", ".join(str(training_seed(args.seed, k)) for k in range(args.trainings))
              + "):")
        for text, ok in checks[-4:]:
            print(f"  [{'PASS' if ok else 'FAIL'}] {text}")
    print(f"\nreport: {out / 'report.html'}   ({time.perf_counter() - start:.0f} s)")
    return 1 if args.strict and not all(ok for _, ok in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
