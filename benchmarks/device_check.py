"""Device check for a lent GPU (issue 16): bf16 training and sampling on a 0.5B-shaped Llama.

What is measured, on one randomly initialised Llama with Qwen2.5-0.5B's body (hidden 896,
24 layers, 14 heads / 2 KV heads, intermediate 4864; the testbed's 512-token tokenizer, so
the LM head is small and sampled log-probs fit in memory), the testbed's chat prompts:

1. HF sampling tokens/s: `prefloop.sampling.HFSampler` (batched `generate`, KV cache, K
   samples per prompt, log-probs recorded) with the weights in fp32 (what the hf backend
   loads today) and in bf16; medians of `--repeats` rounds.
2. The gap between sampling-time and training-forward log-probs: each sample's summed
   log-prob as the sampler recorded it (bf16 weights; fp32 weights) against the trainer's
   no-grad forward over the same tokens, in fp32 and under bf16 autocast (what
   `training.precision: bf16` runs); per sequence, per token, and as the noise it would put
   into a DPO margin, β·|Δ_chosen − Δ_rejected| with β 0.1. This says when reusing
   sampling log-probs as reference log-probs is safe (vLLM's, in bf16, are like the bf16
   rows here: other kernels, same precision).
3. Training pairs/s in bf16 (fp32 master weights, bf16 autocast): `train_preferences` (loss
   dpo, prefloop's `[prompt | chosen | rejected]` layout, length-grouped batches, cached
   reference pass) against `bare`: the same pairs, micro-batch stream and rows with nothing
   around the model (one forward, summed response log-probs as the loss, backward, fused
   AdamW); reference pass and optimisation loop apart, rounds interleaved, medians.

Uses only torch, transformers, accelerate, peft (and their own dependencies: tokenizers,
safetensors, PyYAML, numpy) and prefloop's source, so it runs on a machine without a
package index and without vLLM:

    PYTHONPATH=src python benchmarks/device_check.py --json $OUT/device_check.json
    PYTHONPATH=src python benchmarks/device_check.py --tiny          # CPU smoke run, ~1 min

About 3–4 minutes on one H200 at the default sizes (under 8 with a cold start).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

SHAPES = {
    # Qwen2.5-0.5B's body as a Llama
    "0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, intermediate_size=4864),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=2, intermediate_size=128),
}
# per shape: prompts, samples per prompt, max new tokens, sampler batch (prompts), pairs
SIZES = {
    "0.5b": dict(prompts=64, samples=4, max_new_tokens=128, batch_size=64, pairs=256),
    "tiny": dict(prompts=8, samples=2, max_new_tokens=16, batch_size=8, pairs=16),
}
BETA = 0.1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---------------------------------------------------------------- 0. the model


def build(args, directory: Path):
    """(tokenizer, model directory): a random Llama of `args.shape` saved as safetensors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prefloop import testbed
    from prefloop.tiny import save_pretrained_pair, train_tokenizer

    tok = train_tokenizer(testbed.corpus(0), 512)
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                      **SHAPES[args.shape])
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    save_pretrained_pair(model, tok, directory)
    n = sum(p.numel() for p in model.parameters())
    return tok, n


def prompts_of(args):
    from prefloop import testbed
    from prefloop.sampling import PromptRecord

    n = max(args.prompts, args.pairs)
    return [PromptRecord(r["id"], r["prompt"]) for r in testbed.prompt_rows(n, 10)]


# ---------------------------------------------------------------- 1. sampling


def sampling(args, path: str, tok, prompts, device) -> tuple[dict, dict[str, list[dict]]]:
    """Tokens/s of HFSampler with fp32 and bf16 weights, and the last round's rows of each."""
    import torch

    from prefloop.config import SamplingConfig
    from prefloop.models import load_causal_lm
    from prefloop.sampling import HFSampler

    config = SamplingConfig(num_samples=args.samples, max_new_tokens=args.max_new_tokens,
                            batch_size=args.batch_size, temperature=1.0, seed=0)
    results, rows = {}, {}
    for dtype in ("fp32", "bf16"):
        model = load_causal_lm(path).to(device)
        if dtype == "bf16":
            model = model.to(torch.bfloat16)
        sampler = HFSampler(model, tok)
        sampler.sample(prompts[:2], config)  # warm-up
        rounds = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            out = sampler.sample(prompts[: args.prompts], config)
            _sync(device)
            seconds = time.perf_counter() - start
            tokens = sum(r["num_tokens"] for r in out)
            rounds.append({"seconds": seconds, "tokens": tokens})
        rows[dtype] = out
        results[dtype] = {"median_tokens_per_second": statistics.median(
            r["tokens"] / r["seconds"] for r in rounds), "rounds": rounds,
            "logprobs_recorded": all(r["logprob"] is not None for r in out)}
        log(f"sampling {dtype}: {results[dtype]['median_tokens_per_second']:.0f} tokens/s")
        del model, sampler
        _free(device)
    return results, rows


# ---------------------------------------------------------------- 2. log-prob gap


def training_forward(path: str, rows: list[dict], pad_id: int, device, autocast: bool):
    """(n,) summed log-probs of each row's response from a no-grad forward of the fp32
    weights, under bf16 autocast when `autocast` (training.precision: bf16)."""
    import contextlib

    import torch

    from prefloop.logprobs import sequence_logps
    from prefloop.models import load_causal_lm

    model = load_causal_lm(path).to(device).eval()
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast \
        else contextlib.nullcontext()
    with ctx:
        values = sequence_logps(model, [r["prompt_ids"] for r in rows],
                                [r["response_ids"] for r in rows], pad_id)
    del model
    _free(device)
    return values.double()


def gap_stats(sampled, forward, rows: list[dict], k: int) -> dict:
    """|sampling − forward| per sequence and per token, and β·|Δ_w − Δ_l| of pairs made of
    samples 0 and 1 of each prompt (the reference term a DPO margin would be off by)."""
    import torch

    diff = sampled - forward
    tokens = torch.tensor([r["num_tokens"] for r in rows], dtype=torch.float64)
    per_seq = diff.abs()
    margin = (BETA * (diff[0::k] - diff[1::k]).abs()) if k > 1 else torch.zeros(1)

    def q(x, p):
        return float(torch.quantile(x, p))

    return {"per_sequence_p50": q(per_seq, 0.5), "per_sequence_p95": q(per_seq, 0.95),
            "per_sequence_max": float(per_seq.max()),
            "per_token_mean": float((per_seq / tokens).mean()),
            "per_token_max": float((per_seq / tokens).max()),
            "mean_signed_per_sequence": float(diff.mean()),
            "dpo_margin_noise_p50": q(margin, 0.5), "dpo_margin_noise_p95": q(margin, 0.95),
            "mean_tokens": float(tokens.mean())}


def logprob_gaps(args, path: str, rows: dict[str, list[dict]], pad_id: int, device) -> dict:
    import torch

    out = {}
    for forward_kind, autocast in (("fp32", False), ("bf16-autocast", True)):
        for dtype, sampled_rows in rows.items():
            if not all(r["logprob"] is not None for r in sampled_rows):
                continue
            forward = training_forward(path, sampled_rows, pad_id, device, autocast)
            sampled = torch.tensor([r["logprob"] for r in sampled_rows], dtype=torch.float64)
            key = f"sampling {dtype} vs forward {forward_kind}"
            out[key] = gap_stats(sampled, forward, sampled_rows, args.samples)
            log(f"gap {key}: per token {out[key]['per_token_mean']:.2e}, per sequence p95 "
                f"{out[key]['per_sequence_p95']:.3g}, DPO margin noise p95 "
                f"{out[key]['dpo_margin_noise_p95']:.3g}")
    return out


# ---------------------------------------------------------------- 3. training


def pair_rows(rows: list[dict], k: int, n: int) -> list[dict]:
    """Preference rows with token ids: sample 0 of a prompt chosen over its sample 1."""
    out = []
    for i in range(0, len(rows) - k + 1, k):
        a, b = rows[i], rows[i + 1]
        out.append({"prompt": a["prompt"], "prompt_ids": a["prompt_ids"],
                    "chosen": a["response"], "chosen_ids": a["response_ids"],
                    "rejected": b["response"], "rejected_ids": b["response_ids"]})
    return (out * (n // max(len(out), 1) + 1))[:n]


def train_config(args, path: str, out: Path):
    from prefloop.config import DataConfig, LossConfig, TrainConfig, TrainingConfig

    return TrainConfig(
        model=path, output_dir=str(out), data=DataConfig(path="<rows>"),
        loss=LossConfig(name="dpo"),
        training=TrainingConfig(epochs=1.0, batch_size=args.train_batch, lr=1e-6,
                                warmup_ratio=0.0, precision=args.precision, log_every=1000),
    )


def run_prefloop(args, path: str, pairs, workdir: Path, r: int) -> dict:
    from prefloop.trainer import train_preferences

    result = train_preferences(train_config(args, path, workdir / f"prefloop-{r}"),
                               pairs=pairs, progress=False)
    return {"loop_seconds": result.seconds, "reference_seconds": result.reference_seconds,
            "pairs": result.pairs_seen, "steps": result.steps}


def run_bare(args, path: str, pairs, pad_id: int, device) -> dict:
    """prefloop's pairs, micro-batch stream and rows; one forward + backward + AdamW step."""
    import contextlib

    import torch

    from prefloop import harness
    from prefloop.logprobs import causal_lm_of, collate_pairs
    from prefloop.models import load_causal_lm

    t_cfg = train_config(args, path, Path("unused")).training
    model = load_causal_lm(path).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if args.precision == "bf16" \
        else contextlib.nullcontext()

    def summed_logps(lm, batch):
        with autocast:
            hidden = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              position_ids=batch.position_ids, use_cache=False
                              ).last_hidden_state
            logits = lm.lm_head(hidden[batch.source_row, batch.source_col]).float()
        return (logits.gather(-1, batch.target[:, None]).squeeze(-1)
                - logits.logsumexp(-1)).sum()

    order = sorted(range(len(pairs)), key=lambda i: pairs[i].length)
    model.eval()
    _sync(device)
    start = time.perf_counter()
    with torch.no_grad():
        for k in range(0, len(order), 2 * t_cfg.batch_size):
            summed_logps(causal_lm_of(model), collate_pairs(
                [pairs[i] for i in order[k : k + 2 * t_cfg.batch_size]], pad_id, t_cfg.layout
            ).to(device))
    _sync(device)
    reference_seconds = time.perf_counter() - start
    model.train()
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr, fused=True)
    except (RuntimeError, TypeError):
        optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.lr)
    steps = harness.training_steps(len(pairs), t_cfg.batch_size, t_cfg)
    stream = harness.micro_batches([p.length for p in pairs], t_cfg.batch_size, t_cfg)
    seen = 0
    start = time.perf_counter()
    for _ in range(steps):
        _, idx, _ = next(stream)
        batch = collate_pairs([pairs[i] for i in idx], pad_id, t_cfg.layout).to(device)
        (-summed_logps(causal_lm_of(model), batch)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += len(idx)
    _sync(device)
    loop_seconds = time.perf_counter() - start
    del model, optimizer
    _free(device)
    return {"loop_seconds": loop_seconds, "reference_seconds": reference_seconds,
            "pairs": seen, "steps": steps}


def training(args, path: str, tok, rows: list[dict], device, workdir: Path) -> dict:
    from prefloop.data import pairs_from_rows

    pairs, _ = pairs_from_rows(pair_rows(rows, args.samples, args.pairs), tok)
    log(f"training on {len(pairs)} pairs, {sum(p.length for p in pairs) / len(pairs):.0f} "
        f"tokens per pair")
    runs: dict[str, list[dict]] = {"prefloop": [], "bare": []}
    for r in range(args.train_repeats):
        for name in (["prefloop", "bare"] if r % 2 == 0 else ["bare", "prefloop"]):
            res = run_prefloop(args, path, pairs, workdir, r) if name == "prefloop" \
                else run_bare(args, path, pairs, tok.pad_token_id, device)
            res["pairs_per_second"] = res["pairs"] / res["loop_seconds"]
            runs[name].append(res)
            log(f"train {name} round {r + 1}: {res['pairs_per_second']:.1f} pairs/s "
                f"(loop {res['loop_seconds']:.2f} s, reference {res['reference_seconds']:.2f} s)")
    summary = {name: {key: statistics.median(x[key] for x in rs)
                      for key in ("pairs_per_second", "loop_seconds", "reference_seconds")}
               for name, rs in runs.items()}
    summary["prefloop/bare loop time"] = (summary["prefloop"]["loop_seconds"]
                                          / summary["bare"]["loop_seconds"])
    summary["prefloop/bare reference time"] = (summary["prefloop"]["reference_seconds"]
                                               / summary["bare"]["reference_seconds"])
    return {"summary": summary, "runs": runs}


# ---------------------------------------------------------------- helpers and main


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment(device) -> dict:
    import importlib.metadata as md

    import torch

    env = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"}
    for name in ("torch", "transformers", "accelerate", "peft"):
        try:
            env[name] = md.version(name)
        except md.PackageNotFoundError:
            env[name] = None
    return env


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="tiny model on CPU: a smoke run")
    p.add_argument("--repeats", type=int, default=3, help="sampling rounds per dtype")
    p.add_argument("--train-repeats", type=int, default=3, help="training rounds per side")
    p.add_argument("--train-batch", type=int, default=8, help="pairs per micro-batch")
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--json", type=Path, help="write every number here")
    args = p.parse_args(argv)
    args.shape = "tiny" if args.tiny else "0.5b"
    for key, value in SIZES[args.shape].items():
        setattr(args, key, value)

    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.tiny:
        args.repeats, args.train_repeats = min(args.repeats, 2), min(args.train_repeats, 2)
    env = environment(device)
    log(f"device check on {env}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="device-check-") as tmp:
        workdir = Path(tmp)
        tok, n_params = build(args, workdir / "model")
        path = str(workdir / "model")
        log(f"{args.shape} Llama: {n_params / 1e6:.0f} M parameters, saved")
        prompts = prompts_of(args)
        speed, rows = sampling(args, path, tok, prompts, device)
        gaps = logprob_gaps(args, path, rows, tok.pad_token_id, device)
        many = prompts[: args.pairs]
        from prefloop.config import SamplingConfig
        from prefloop.models import load_causal_lm
        from prefloop.sampling import HFSampler

        model = load_causal_lm(path).to(device).to(torch.bfloat16)
        train_rows = HFSampler(model, tok).sample(many, SamplingConfig(
            num_samples=2, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            record_logprobs=False))
        del model
        _free(device)
        train = training(_with(args, samples=2), path, tok, train_rows, device, workdir)
    result = {"environment": env, "shape": SHAPES[args.shape], "parameters": n_params,
              "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "sampling": speed, "logprob_gaps": gaps, "training": train,
              "seconds": time.perf_counter() - started}
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")


def _with(args, **changes):
    out = argparse.Namespace(**vars(args))
    for key, value in changes.items():
        setattr(out, key, value)
    return out


def print_report(result: dict) -> None:
    s, t = result["sampling"], result["training"]["summary"]
    print(f"\n{result['environment']['device']}, {result['parameters'] / 1e6:.0f} M parameters, "
          f"{result['seconds']:.0f} s in all\n")
    print("| HF sampling | tokens/s (median) |\n|---|---:|")
    for dtype, v in s.items():
        print(f"| {dtype} weights | {v['median_tokens_per_second']:.0f} |")
    print("\n| training | pairs/s (median) | loop s | reference pass s |\n|---|---:|---:|---:|")
    for name in ("prefloop", "bare"):
        print(f"| {name} | {t[name]['pairs_per_second']:.1f} | {t[name]['loop_seconds']:.2f} | "
              f"{t[name]['reference_seconds']:.2f} |")
    print(f"\nprefloop / bare: loop time {t['prefloop/bare loop time']:.3f}×, reference pass "
          f"{t['prefloop/bare reference time']:.3f}×")
    print("\n| sampling-time vs training-forward log-probs | per token mean | per sequence p95 "
          "| β·|Δw−Δl| p95 (β 0.1) |\n|---|---:|---:|---:|")
    for key, g in result["logprob_gaps"].items():
        print(f"| {key} | {g['per_token_mean']:.2e} | {g['per_sequence_p95']:.3g} | "
              f"{g['dpo_margin_noise_p95']:.3g} |")


if __name__ == "__main__":
    main()
