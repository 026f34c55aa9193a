"""Silencing the Hugging Face libraries' own progress bars (loading weights, writing
shards): `-q` on the command line, and a library call with `progress=False`."""

from __future__ import annotations

import os
import sys


def quiet_libraries() -> None:
    """No progress bars from huggingface_hub or transformers from now on in this process."""
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when they are first imported
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
