"""What every stage of a run shares, passed explicitly: the config, the run directory and
its manifest, the processes, the kept reward model, progress and output."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from prefloop.loop.config import RunConfig
from prefloop.loop.rundir import Manifest, RunDir
from prefloop.sampling import PromptRecord
from prefloop.workers import Processes, ScorerCache


def silent(*_args: object, **_kwargs: object) -> None:
    return None


@dataclass
class Context:
    cfg: RunConfig
    run: RunDir
    procs: Processes = field(default_factory=Processes)
    scorers: ScorerCache = field(default_factory=ScorerCache)
    progress: bool = True  # progress bars (main process only)
    echo: Callable[..., None] = print  # the loop's lines and tables (main process only)
    manifest: Manifest | None = None  # set once the run directory is open
    eval_prompts: list[PromptRecord] = field(default_factory=list)
    targets: dict[str, str] = field(default_factory=dict)  # prompt id → SFT answer
    probe_prompts: list[PromptRecord] = field(default_factory=list)  # the length guard's

    def __post_init__(self) -> None:
        if not self.procs.is_main:
            self.progress, self.echo = False, silent
