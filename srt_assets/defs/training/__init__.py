"""Stage 7, training: the student fine-tuned on each training dataset of a source."""

from dagster import Definitions

from srt_assets.defs.partitions import repartition
from srt_assets.defs.training.assets import CHECKPOINTS
from srt_assets.partitions import Partitioning

ASSETS = CHECKPOINTS  # finetuned_selected, finetuned_random, finetuned_full, finetuned_teacher


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(assets=repartition(ASSETS, layout))
