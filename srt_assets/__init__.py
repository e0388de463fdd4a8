"""srt: Selective Reflection-Tuning (Li et al., 2024) as a partitioned Dagster asset pipeline."""

import os

__version__ = "0.1.0"

# Third-party progress bars (the GGUF conversion, datasets' map/filter, alpaca_eval's annotation
# chunks, the hub) write carriage-return bars into the terminal and into every Dagster compute log;
# srt reports its own progress as log lines instead. Set before any of them imports tqdm (which reads
# TQDM_* once), and inherited by every step and training process. A value set by the user wins.
for _variable in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_variable, "1")
