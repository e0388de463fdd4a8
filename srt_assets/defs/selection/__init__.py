"""Stage 6, selection: the student's decisions, their agreement with other statistics, the selected
dataset, the baselines it is compared with, and the sets side by side."""

from dagster import Definitions

from srt_assets.defs.partitions import repartition
from srt_assets.defs.selection.assets import (
    baseline_full,
    baseline_random,
    baseline_teacher,
    sample_decisions,
    score_agreement,
    selected_dataset,
)
from srt_assets.defs.selection.comparison import training_sets
from srt_assets.partitions import Partitioning

ASSETS = [
    sample_decisions,
    score_agreement,
    selected_dataset,
    baseline_full,
    baseline_random,
    baseline_teacher,
    training_sets,
]


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(assets=repartition(ASSETS, layout))
