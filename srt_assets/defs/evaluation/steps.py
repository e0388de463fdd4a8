"""The decorator arguments the evaluation assets share, defined once."""

from srt_assets.defs.common import GPU_STEP
from srt_assets.defs.partitions import SOURCES
from srt_assets.defs.training.assets import CHECKPOINT_KEYS


def checkpoint_step(*also_reads: str) -> dict:
    """A model step that reads all three checkpoints of a source (and ``also_reads``)."""
    return {
        "partitions_def": SOURCES,
        "group_name": "evaluation",
        "kinds": {"pytorch", "polars"},
        "deps": [*CHECKPOINT_KEYS, *also_reads],
        **GPU_STEP,
    }


JUDGE_STEP = {"partitions_def": SOURCES, "group_name": "evaluation", "kinds": {"polars"}, **GPU_STEP}
