"""What the experiment report is made of: parts, each naming the assets it reads and the function that
turns their tables into sections. A stage with something to report declares its parts beside its
assets (``REPORT_PARTS``); ``experiment_report`` renders every registered part whose tables exist for
the source, and names the assets still to materialize for the others."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import polars as pl

from srt_assets.report import Section
from srt_assets.resources import StorageResource


@dataclass(frozen=True)
class ReportInputs:
    """What a part may read: the source, the storage, and the tables of the assets parts name (None
    where an asset is not materialized for every partition of the source)."""

    source: str
    storage: StorageResource
    tables: Mapping[str, pl.DataFrame | None]


@dataclass(frozen=True)
class ReportPart:
    title: str  # what the part shows; the report names it while its tables are missing
    reads: tuple[str, ...]  # the assets whose tables the part reads
    sections: Callable[[ReportInputs], list[Section]]

    def render(self, inputs: ReportInputs) -> list[Section]:
        """The part's sections, or one that says which assets to materialize first."""
        missing = [name for name in self.reads if inputs.tables.get(name) is None]
        if not missing:
            return self.sections(inputs)
        return [
            Section(
                self.title,
                f"Not in this report yet: materialize {', '.join(missing)} for source '{inputs.source}' "
                "(every partition of it), then the report again.",
            )
        ]
