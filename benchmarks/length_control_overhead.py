"""What lr_dpo's length controller costs per optimizer step (`prefloop.length_control`).

    python benchmarks/length_control_overhead.py [--repeats 5] [--steps 64]

After every step the target mode re-solves the length-neutral root over all the run's pairs
(each with its latest h) and updates the length estimate; this times `after_step` alone,
for runs of 512 pairs (the demo's iteration), 4 096 and 32 768, with 16 pairs per step
(the demo's batch). Medians over `--repeats` runs of `--steps` steps; one torch thread.
Compare with a training step of the demo's policy (~0.1 s on this 2-core VM) or of a real
model (seconds).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch


def time_steps(num_pairs: int, steps: int, batch: int, seed: int) -> float:
    """Seconds per `after_step` call, averaged over `steps` calls."""
    from prefloop.length_control import AlphaController, LengthGoal

    g = torch.Generator().manual_seed(seed)
    rejected = torch.randint(5, 60, (num_pairs,), generator=g).double()
    chosen = rejected + torch.randint(-20, 30, (num_pairs,), generator=g).double()
    ctl = AlphaController.start("target", chosen, rejected, 0.01,
                                LengthGoal(start=35.0, target=35.0))
    start = time.perf_counter()
    for k in range(steps):
        index = torch.arange(k * batch, (k + 1) * batch) % num_pairs
        h = torch.randn(batch, generator=g, dtype=torch.float64) * (1 + k / 16)
        ctl.after_step(index.double(), h, 0.1)
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--batch", type=int, default=16, help="pairs per optimizer step")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"| pairs in the run | ms per step (median of {args.repeats}) | spread |")
    print("|---:|---:|---:|")
    for n in (512, 4096, 32768):
        runs = [time_steps(n, args.steps, args.batch, seed) * 1000 for seed in range(args.repeats)]
        print(f"| {n} | {statistics.median(runs):.2f} | {min(runs):.2f}–{max(runs):.2f} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    sys.exit(main())
