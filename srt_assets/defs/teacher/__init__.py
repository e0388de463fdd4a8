"""Stages 2 and 4, the teacher: instruction reflection (variant Q) and response reflection (A, QA)."""

from dagster import Definitions

from srt_assets.defs.partitions import repartition
from srt_assets.defs.teacher.assets import better_responses, new_instructions
from srt_assets.partitions import Partitioning

ASSETS = [new_instructions, better_responses]


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(assets=repartition(ASSETS, layout))
