"""Which process this is, under `accelerate launch` or alone: one answer for the whole
package (the trainers ask their Accelerator, which reads the same launch)."""

from __future__ import annotations

import os


def is_main_process() -> bool:
    """Rank 0 of the launch (`RANK`, set by accelerate/torchrun), or the only process; usable
    before any process group exists (e.g. to clean up after a failed start)."""
    return int(os.environ.get("RANK", "0")) == 0


class Processes:
    """Rank, world size, gather and barrier; one process when not launched by accelerate."""

    def __init__(self):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.state = None
        if self.world > 1:
            import torch
            from accelerate import PartialState

            self.state = PartialState(cpu=not torch.cuda.is_available())
        self.rank = self.state.process_index if self.state else 0
        self.is_main = self.rank == 0  # the same answer as is_main_process()

    @property
    def device(self):
        import torch

        return self.state.device if self.state else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")

    def gather(self, items: list) -> list:
        if self.world == 1:
            return items
        from accelerate.utils import gather_object

        return gather_object(items)

    def barrier(self) -> None:
        if self.state:
            self.state.wait_for_everyone()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]
