"""Stages 3 and 5, the student: its base model, the IFD / r-IFD of every variant, and whether it can
judge pairs at all (a diagnosis before any teacher call)."""

from dagster import Definitions

from srt_assets.defs.partitions import repartition
from srt_assets.defs.student.assets import student_base_model, student_diagnosis, student_scores
from srt_assets.partitions import Partitioning

ASSETS = [student_base_model, student_scores, student_diagnosis]


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(assets=repartition(ASSETS, layout))
