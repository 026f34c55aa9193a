"""prefloop: iterative length-regularised DPO and the preference-optimisation family."""

__version__ = "0.1.0"


def run(cfg, resume: bool = False, redo_from: str | None = None, progress: bool = True,
        overwrite: bool = False):
    """`prefloop.run(cfg)`: run (or continue) the iterative loop of a `RunConfig` — see
    `prefloop.loop.run`; imported on first use, so `import prefloop` stays light."""
    from prefloop.loop import run as run_loop

    return run_loop(cfg, resume, redo_from, progress, overwrite)
