"""Row-level audit in the UI: the explain_sample job."""

from dagster import Definitions

from srt_assets.defs.audit.jobs import explain_sample
from srt_assets.partitions import Partitioning


def definitions(layout: Partitioning) -> Definitions:
    return Definitions(jobs=[explain_sample])
