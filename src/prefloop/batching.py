"""Which pairs go into which micro-batch, on which process: deterministic given the seed.

The plan is made for the *global* batch (all processes), then each process takes its
slice, so N processes see exactly the pairs one process would see with the same global
batch — the property the distributed test checks.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence


def epoch_batches(
    lengths: Sequence[int], global_batch: int, seed: int, epoch: int, group_by_length: bool
) -> list[list[int]]:
    """Index lists of size `global_batch` (the last may be smaller) covering every pair once.

    With `group_by_length`, pairs of similar length share a batch (less padding) while the
    order of batches stays random: shuffle, cut into windows of 64 batches, sort each
    window by length, cut into batches, shuffle the batches.
    """
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        window = global_batch * 64
        order = [
            i
            for start in range(0, len(order), window)
            for i in sorted(order[start : start + window], key=lambda j: lengths[j])
        ]
    batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


def shard(batch: Sequence[int], process_index: int, num_processes: int) -> list[int]:
    """This process's contiguous share of a global batch (sizes differ by at most one)."""
    per, extra = divmod(len(batch), num_processes)
    start = process_index * per + min(process_index, extra)
    return list(batch[start : start + per + (process_index < extra)])


def steps_per_epoch(num_pairs: int, global_batch: int, grad_accum: int) -> int:
    return math.ceil(num_pairs / (global_batch * grad_accum))
