"""`prefloop demo`: the paper's experiment in the offline verbosity testbed.

  1. build (cached): tokenizer → random Llama → SFT policy; random Llama → reward model
     trained on length-biased annotator labels; iteration and eval prompt sets
  2. from the same SFT policy, T iterations of iDPO (loss `dpo`) and iLR-DPO (`lr_dpo`)
  3. compare: gold accuracy, proxy reward, length, win rate and LC win rate vs SFT;
     a table on screen, plots and an HTML report overlaying both runs
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prefloop import testbed
from prefloop.io import write_jsonl


@dataclass
class DemoConfig:
    seed: int = 0
    out_dir: str = "runs/demo"
    cache_dir: str = ""  # default: ~/.cache/prefloop/testbed
    iterations: int = 3
    # testbed build
    vocab_size: int = 512
    policy_size: str = "micro"
    rm_size: str = "micro"
    sft_examples: int = 2000
    sft_epochs: float = 20.0
    sft_lr: float = 2e-3
    rm_pairs: int = 2000
    rm_epochs: float = 10.0
    rm_lr: float = 1e-3
    annotator_w_correct: float = 3.0
    annotator_w_length: float = 0.03
    # loop
    prompts_per_iteration: int = 192
    eval_prompts: int = 300
    eval_temperature: float = 1.0  # the policy as it samples, not its greedy mode
    num_samples: int = 4
    temperature: float = 1.0
    max_new_tokens: int = 64
    beta: float = 0.1
    alpha: float = 0.1  # lr_dpo per-token length margin
    lr: float = 5e-4
    batch_size: int = 16
    epochs: float = 2.0
    runs: dict[str, dict] = field(default_factory=lambda: {
        "idpo": {"name": "dpo"},
        "ilr-dpo": {"name": "lr_dpo"},
    })

    def build_key(self) -> str:
        keys = ("seed", "vocab_size", "policy_size", "rm_size", "sft_examples", "sft_epochs",
                "rm_pairs", "rm_epochs", "annotator_w_correct", "annotator_w_length",
                "prompts_per_iteration", "eval_prompts", "iterations")
        text = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass
class Testbed:
    directory: Path
    sft: Path
    reward_model: Path
    prompts: Path
    eval_prompts: Path
    seconds: float
    cached: bool


def build_testbed(cfg: DemoConfig, progress: bool = True, echo=print) -> Testbed:
    """Tokenizer, SFT policy, reward model and prompt sets; reused when already built."""
    from prefloop.config import from_dict
    from prefloop.reward_training import RewardModelConfig, train_reward_model
    from prefloop.sft import SFTConfig, train_sft
    from prefloop.tiny import build_causal_lm, save_pretrained_pair, train_tokenizer

    root = Path(cfg.cache_dir or Path.home() / ".cache" / "prefloop" / "testbed")
    d = root / cfg.build_key()
    paths = Testbed(d, d / "sft", d / "reward_model", d / "prompts.jsonl",
                    d / "eval_prompts.jsonl", 0.0, True)
    if (d / "built.json").is_file():
        return paths
    start = time.perf_counter()
    d.mkdir(parents=True, exist_ok=True)
    echo(f"building the testbed in {d} (once; later runs reuse it)")
    tok = train_tokenizer(testbed.corpus(cfg.seed), cfg.vocab_size)
    save_pretrained_pair(build_causal_lm("llama", tok, cfg.policy_size, seed=cfg.seed), tok,
                         d / "base")
    save_pretrained_pair(build_causal_lm("llama", tok, cfg.rm_size, seed=cfg.seed + 1), tok,
                         d / "rm_base")
    n_prompts = cfg.prompts_per_iteration * cfg.iterations
    write_jsonl(paths.prompts, testbed.prompt_rows(n_prompts, cfg.seed + 10))
    write_jsonl(paths.eval_prompts, testbed.prompt_rows(cfg.eval_prompts, cfg.seed + 20))

    echo("  SFT policy on concise/verbose, correct/wrong answers")
    sft_cfg = from_dict(SFTConfig, {
        "model": str(d / "base"), "output_dir": str(paths.sft),
        "data": {"path": "<in memory>", "max_length": 256, "max_prompt_length": 64},
        "training": {"lr": cfg.sft_lr, "batch_size": 32, "epochs": cfg.sft_epochs,
                     "warmup_ratio": 0.05, "scheduler": "cosine", "seed": cfg.seed,
                     "max_grad_norm": 1.0},
    })
    train_sft(sft_cfg, rows=testbed.sft_rows(cfg.sft_examples, cfg.seed + 1), progress=progress)

    echo("  reward model on length-biased annotator labels")
    annotator = testbed.Annotator(cfg.annotator_w_correct, cfg.annotator_w_length)
    rm_cfg = from_dict(RewardModelConfig, {
        "model": str(d / "rm_base"), "output_dir": str(paths.reward_model),
        "data": {"path": "<in memory>"},
        "training": {"lr": cfg.rm_lr, "batch_size": 32, "epochs": cfg.rm_epochs,
                     "warmup_ratio": 0.05, "scheduler": "cosine", "seed": cfg.seed},
    })
    train_reward_model(rm_cfg, rows=testbed.annotated_pairs(cfg.rm_pairs, cfg.seed + 2,
                                                            annotator), progress=progress)
    paths.seconds = time.perf_counter() - start
    paths.cached = False
    (d / "built.json").write_text(json.dumps({"config": asdict(cfg), "seconds": paths.seconds}))
    return paths


def run_config(cfg: DemoConfig, bed: Testbed, name: str, loss: dict):
    from prefloop.config import from_dict
    from prefloop.loop import RunConfig

    return from_dict(RunConfig, {
        "name": name,
        "run_dir": str(Path(cfg.out_dir) / name),
        "policy": str(bed.sft),
        "iterations": cfg.iterations,
        "seed": cfg.seed,
        "prompts": {"path": str(bed.prompts), "id_column": "id",
                    "per_iteration": cfg.prompts_per_iteration},
        "sampling": {"num_samples": cfg.num_samples, "temperature": cfg.temperature,
                     "max_new_tokens": cfg.max_new_tokens, "batch_size": 64,
                     "seed": cfg.seed},
        "reward": {"type": "model", "model": str(bed.reward_model), "batch_size": 64},
        "loss": {"beta": cfg.beta, **({"alpha": cfg.alpha} if loss["name"] == "lr_dpo" else {}),
                 **loss},
        "data": {"max_length": 256, "max_prompt_length": 64},
        "training": {"lr": cfg.lr, "batch_size": cfg.batch_size, "epochs": cfg.epochs,
                     "warmup_ratio": 0.1, "seed": cfg.seed},
        "eval": {"prompts": {"path": str(bed.eval_prompts), "id_column": "id"},
                 "sampling": {"num_samples": 1, "temperature": cfg.eval_temperature,
                              "max_new_tokens": cfg.max_new_tokens, "batch_size": 100},
                 "gold": "prefloop.testbed:gold"},
    })


@dataclass
class DemoResult:
    testbed: Testbed
    metrics: dict[str, list[dict]]
    report: Path
    seconds: float


def run_demo(cfg: DemoConfig, progress: bool = True, echo=print) -> DemoResult:
    from prefloop.loop import Loop
    from prefloop.report import write_report

    start = time.perf_counter()
    bed = build_testbed(cfg, progress, echo)
    metrics = {}
    for name, loss in cfg.runs.items():
        echo(f"\n== {name}: {cfg.iterations} iterations with loss {loss['name']} ==")
        run_cfg = run_config(cfg, bed, name, loss)
        run_cfg.validate()
        metrics[name] = Loop(run_cfg, progress, echo).run(resume=True).metrics
    report = write_report([Path(cfg.out_dir) / name for name in cfg.runs],
                          Path(cfg.out_dir) / "report.html")
    return DemoResult(bed, metrics, report, time.perf_counter() - start)


def comparison_rows(result: DemoResult) -> list[list[str]]:
    """One row per (run, iteration) plus the SFT start; columns as in the README."""
    rows = []
    for name, records in result.metrics.items():
        for m in records:
            if m["iteration"] == 0 and rows:
                continue
            label = "SFT" if m["iteration"] == 0 else f"{name} t={m['iteration']}"
            rows.append([
                label, f"{100 * m.get('gold_accuracy', float('nan')):.1f}",
                f"{m['mean_reward']:+.2f}", f"{m['mean_tokens']:.1f}", f"{m['mean_chars']:.0f}",
                f"{m['win_rate']:.1f}", f"{m['lc_win_rate']:.1f}",
            ])
    return rows
