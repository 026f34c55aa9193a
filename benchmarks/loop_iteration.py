"""One iteration of the loop on the offline testbed, its time split by stage and by kind.

What is measured
    `prefloop.loop.Loop` runs the testbed's run config (`prefloop.demo.run_config`, loss
    `lr_dpo`, `--iterations` iterations, default 2): the SFT policy's baseline evaluation
    (iter_0/evaluate) and each iteration's stages sample → score → pair → train →
    evaluate. The last iteration is the one reported as "the iteration": the first also
    pays one-off costs of the process (lazy imports such as transformers' schedulers),
    which a run of several iterations pays once. Each stage's wall time is the manifest's
    `seconds`. Inside each stage, timers installed
    in this benchmark process (never in library code) split the time into

    * model compute: `generate` calls (the forward passes inside them shown apart; the
      rest of `generate` is sampling from the logits, the KV cache, stopping), forward
      calls of every `transformers` model and of prefloop's `ResponseLogProbs` wrapper,
      the log-softmax of the sampled tokens over `generate`'s logits
      (`sampling.sampled_token_logps`: the reference log-probs, which a trainer without
      them computes in a forward pass), `Tensor.backward`, gradient clipping and optimizer
      steps — the union of these intervals (nested calls count once);
    * model load/save: `from_pretrained` / `save_pretrained` of models and tokenizers;
    * JSON I/O: prefloop's `read_jsonl`, `write_jsonl`, `write_json`;
    * the rest: tokenisation (tokenizer calls, decoding, chat templates: shown apart),
      collation, pairing, metrics, Python around the model.

    Python's cyclic garbage collector is timed too (`gc.callbacks`), wherever its
    collections fall (inside a forward as much as in tokenisation): shown apart, not
    subtracted from any kind.

    The share outside model compute is (stage seconds − model compute) / stage seconds,
    summed over the iteration's stages.

How
    The testbed is built once (or reused) with `prefloop.demo.build_testbed` in
    `--cache-dir`, or taken from `--testbed DIR` (a built testbed: `sft/`,
    `reward_model/`). Each round is a fresh subprocess with a fresh run directory, so model
    loads hit the page cache alike; medians over `--repeats` rounds. `--profile` writes a
    cProfile of one extra round's iteration (top functions by own time).

    .venv/bin/python benchmarks/loop_iteration.py --threads 1
    .venv/bin/python benchmarks/loop_iteration.py --threads 1 --testbed DIR   # a built testbed
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGE_NAMES = ["sample", "score", "pair", "train", "evaluate"]
KINDS = ["compute", "generate", "forward_in_generate", "load_save", "json_io", "tokenise", "gc",
         "logps_and_clip"]


class Clock:
    """Exclusive-per-kind interval timers: nested entries of one kind count once; every
    compute kind also feeds the union `compute`."""

    def __init__(self):
        self.total = {k: 0.0 for k in KINDS}
        self.depth = {k: 0 for k in KINDS}
        self.since = {k: 0.0 for k in KINDS}
        self.in_generate = 0

    def enter(self, kind: str) -> None:
        if self.depth[kind] == 0:
            self.since[kind] = time.perf_counter()
        self.depth[kind] += 1

    def leave(self, kind: str) -> None:
        self.depth[kind] -= 1
        if self.depth[kind] == 0:
            self.total[kind] += time.perf_counter() - self.since[kind]

    def wrap(self, fn, *kinds):
        @functools.wraps(fn)
        def timed(*a, **k):
            for kind in kinds:
                self.enter(kind)
            try:
                return fn(*a, **k)
            finally:
                for kind in reversed(kinds):
                    self.leave(kind)
        return timed

    def snapshot(self) -> dict[str, float]:
        return dict(self.total)


def install(clock: Clock) -> None:
    """Timers around model compute, loads/saves and JSON I/O, in this process only."""
    import torch
    import transformers
    from torch import nn
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from transformers.generation.utils import GenerationMixin

    import prefloop.data
    import prefloop.io
    import prefloop.logprobs
    import prefloop.loop.stages

    def forward_call(self, *a, **k):
        inside = clock.in_generate > 0
        clock.enter("compute")
        if inside:
            clock.enter("forward_in_generate")
        try:
            return nn.Module.__call__(self, *a, **k)
        finally:
            if inside:
                clock.leave("forward_in_generate")
            clock.leave("compute")

    PreTrainedModel.__call__ = forward_call
    prefloop.logprobs.ResponseLogProbs.__call__ = forward_call

    generate = GenerationMixin.generate

    @functools.wraps(generate)
    def timed_generate(self, *a, **k):
        clock.in_generate += 1
        clock.enter("compute")
        clock.enter("generate")
        try:
            return generate(self, *a, **k)
        finally:
            clock.leave("generate")
            clock.leave("compute")
            clock.in_generate -= 1

    GenerationMixin.generate = timed_generate
    torch.Tensor.backward = clock.wrap(torch.Tensor.backward, "compute")
    from torch.optim.optimizer import (
        register_optimizer_step_post_hook,
        register_optimizer_step_pre_hook,
    )

    gc.callbacks.append(lambda phase, info: clock.enter("gc") if phase == "start"
                        else clock.leave("gc"))
    import prefloop.sampling

    prefloop.sampling.sampled_token_logps = clock.wrap(
        prefloop.sampling.sampled_token_logps, "compute", "logps_and_clip")
    torch.nn.utils.clip_grad_norm_ = clock.wrap(torch.nn.utils.clip_grad_norm_, "compute",
                                                "logps_and_clip")
    register_optimizer_step_pre_hook(lambda *a: clock.enter("compute"))
    register_optimizer_step_post_hook(lambda *a: clock.leave("compute"))

    for cls in (PreTrainedModel, PreTrainedTokenizerBase, transformers.PretrainedConfig):
        load = cls.from_pretrained.__func__
        cls.from_pretrained = classmethod(clock.wrap(load, "load_save"))
    for name in ("__call__", "decode", "batch_decode", "apply_chat_template"):
        setattr(PreTrainedTokenizerBase, name,
                clock.wrap(getattr(PreTrainedTokenizerBase, name), "tokenise"))
    for cls in (PreTrainedModel, PreTrainedTokenizerBase):
        cls.save_pretrained = clock.wrap(cls.save_pretrained, "load_save")
    for module, name in ((prefloop.io, "write_jsonl"), (prefloop.io, "write_json"),
                         (prefloop.data, "read_jsonl"), (prefloop.loop.stages, "read_jsonl")):
        setattr(module, name, clock.wrap(getattr(module, name), "json_io"))


# ---------------------------------------------------------------- one round (worker)


def worker(spec: dict) -> dict:
    import torch

    from prefloop.demo import DemoConfig, _paths, build_testbed, run_config, write_prompt_sets
    from prefloop.loop import driver, run

    torch.set_num_threads(spec["threads"])
    cfg = DemoConfig(iterations=spec["iterations"], cache_dir=spec["cache_dir"], **spec["demo"])
    bed = _paths(Path(spec["testbed"])) if spec["testbed"] else build_testbed(cfg, False)
    run_dir = Path(spec["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    prompts = write_prompt_sets(cfg, run_dir)
    run_cfg = run_config(cfg, bed, prompts, run_dir / "ilr-dpo", {"name": "lr_dpo"})
    run_cfg.validate()

    clock = Clock()
    install(clock)
    split: dict[str, dict[str, float]] = {}
    stage = driver._run_stage

    def timed_stage(ctx, result, t, name, fn):
        before = clock.snapshot()
        stage(ctx, result, t, name, fn)
        split[f"iter_{t}/{name}"] = {k: v - before[k] for k, v in clock.snapshot().items()}

    driver._run_stage = timed_stage
    profiler = None
    if spec.get("profile"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    start = time.perf_counter()
    run(run_cfg, progress=False)
    wall = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(spec["profile"])
    manifest = json.loads((run_dir / "ilr-dpo" / "manifest.json").read_text())
    stages = {k: {"seconds": v["seconds"], **split.get(k, {}),
                  **({"reference_seconds": v["reference_seconds"]}
                     if "reference_seconds" in v else {})}
              for k, v in manifest["stages"].items() if "seconds" in v}
    return {"wall": wall, "stages": stages,
            "rows": {k: v.get("rows") for k, v in manifest["stages"].items()}}


# ---------------------------------------------------------------- driver


def run_round(args, tag: str, workdir: Path, profile: str | None = None) -> dict:
    spec = {"threads": args.threads, "cache_dir": str(args.cache_dir), "testbed":
            str(args.testbed) if args.testbed else "", "run_dir": str(workdir / f"run-{tag}"),
            "demo": demo_overrides(args), "profile": profile, "iterations": args.iterations}
    spec_path = workdir / f"spec-{tag}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    out = subprocess.run([sys.executable, __file__, "--worker", str(spec_path)], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"round {tag} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def demo_overrides(args) -> dict:
    return {"prompts_per_iteration": args.prompts, "eval_prompts": args.eval_prompts}


def summarise(rounds: list[dict], last: int) -> dict:
    stages = [f"iter_{last}/{name}" for name in STAGE_NAMES]
    keys = sorted(rounds[0]["stages"], key=lambda k: (int(k.split("/")[0][5:]),
                                                      STAGE_NAMES.index(k.split("/")[1])))
    out = {}
    for key in keys:
        rs = [r["stages"][key] for r in rounds]
        out[key] = {field: statistics.median(x.get(field, 0.0) for x in rs)
                    for field in ["seconds", *KINDS, "reference_seconds"]}
    it = [{field: sum(r["stages"][k].get(field, 0.0) for k in stages if k in r["stages"])
           for field in ["seconds", *KINDS]} for r in rounds]
    out["iteration"] = {field: statistics.median(x[field] for x in it)
                        for field in ["seconds", *KINDS]}
    out["iteration"]["outside_share_per_round"] = [1 - x["compute"] / x["seconds"] for x in it]
    out["iteration"]["forward_only_outside_share_per_round"] = [
        1 - (x["compute"] - generate_overhead(r, stages)) / x["seconds"]
        for x, r in zip(it, rounds, strict=True)]
    return out


def generate_overhead(round_: dict, stages: list[str]) -> float:
    """Seconds inside `generate` but outside the model's forward (sampling, cache, stopping)."""
    return sum(round_["stages"][k].get("generate", 0.0) - round_["stages"][k].get(
        "forward_in_generate", 0.0) for k in stages if k in round_["stages"])


def print_table(summary: dict, args) -> None:
    print("\n| stage | seconds | model compute s | (forward in generate s) | load/save s | "
          "JSON I/O s | rest s | (of which tokenisation s) | (Python GC s) | "
          "outside model compute |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, s in summary.items():
        rest = s["seconds"] - s["compute"] - s["load_save"] - s["json_io"]
        label = f"**{key}**" if key == "iteration" else key
        print(f"| {label} | {s['seconds']:.2f} | {s['compute']:.2f} | "
              f"{s['forward_in_generate']:.2f} | {s['load_save']:.2f} | {s['json_io']:.2f} | "
              f"{rest:.2f} | {s['tokenise']:.2f} | {s['gc']:.2f} | "
              f"{100 * (1 - s['compute'] / s['seconds']):.1f} % |")
    it = summary["iteration"]
    share = statistics.median(it["outside_share_per_round"])
    verdict = "met" if share <= args.target else "not met"
    strict = statistics.median(it["forward_only_outside_share_per_round"])
    print(f"\nof the iteration's model compute, {it['logps_and_clip']:.2f} s are the sampled "
          "tokens' log-probs and gradient clipping")
    print(f"\niteration (iter_{args.iterations} stages): outside model compute "
          f"{100 * share:.1f} % (median of "
          f"per-round shares {', '.join(f'{100 * x:.1f}' for x in it['outside_share_per_round'])}"
          f"); target ≤ {100 * args.target:.0f} %: {verdict}\n"
          f"counting generate's own work (sampling, KV cache, stopping) as outside too: "
          f"{100 * strict:.1f} %")
    for t in range(1, args.iterations + 1):
        ref = summary.get(f"iter_{t}/train", {}).get("reference_seconds")
        if ref is not None:
            print(f"reference pass in iter_{t}/train: {ref:.2f} s (0: reused from sampling)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--testbed", type=Path, help="a built testbed directory (sft/, reward_model/)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache/prefloop/testbed",
                   help="where build_testbed caches the testbed when --testbed is not given")
    from prefloop.demo import DemoConfig

    demo = DemoConfig()
    p.add_argument("--prompts", type=int, default=demo.prompts_per_iteration,
                   help="prompts per iteration (default: the demo's)")
    p.add_argument("--eval-prompts", type=int, default=demo.eval_prompts,
                   help="held-out prompts evaluated per iteration (default: the demo's)")
    p.add_argument("--iterations", type=int, default=2,
                   help="loop iterations per round; the last one is reported as `iteration` "
                   "(the first pays one-off imports)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--target", type=float, default=0.10,
                   help="largest share of the iteration outside model compute")
    p.add_argument("--profile", type=Path, help="cProfile one extra round into this file")
    p.add_argument("--json", type=Path)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(Path(args.worker).read_text()))))
        return
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="prefloop-loop-bench-"))
    print(f"testbed {args.testbed or args.cache_dir}, {args.prompts} prompts × 4 samples, "
          f"{args.eval_prompts} eval prompts, {args.threads} thread(s), torch "
          f"{torch.__version__}; rounds in {workdir}")
    try:
        run_rounds(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run_rounds(args, workdir: Path) -> None:
    rounds = []
    for r in range(args.repeats):
        result = run_round(args, f"r{r}", workdir)
        rounds.append(result)
        st = result["stages"]
        print(f"  round {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v['seconds']:.1f}s" for k, v in st.items()), flush=True)
    summary = summarise(rounds, args.iterations)
    print_table(summary, args)
    if args.profile:
        run_round(args, "profile", workdir, str(args.profile))
        import pstats

        stats = pstats.Stats(str(args.profile))
        stats.sort_stats("tottime").print_stats(30)
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "rounds": rounds, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    main()
