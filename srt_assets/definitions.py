"""The Dagster code location: every asset, check and resource of the pipeline in one Definitions."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions, StaticPartitionsDefinition

from srt_assets import paths
from srt_assets.assets.common import Partitioning
from srt_assets.assets.evaluation import build_evaluation_assets
from srt_assets.assets.finetuning import build_finetuning_assets
from srt_assets.assets.raw import build_raw_assets
from srt_assets.assets.reflection import build_reflection_assets
from srt_assets.assets.scoring import build_scoring_assets
from srt_assets.assets.selection import build_selection_assets
from srt_assets.core.sources import load_catalog
from srt_assets.executors import executor_from_env
from srt_assets.io_managers import PolarsParquetIOManager
from srt_assets.resources import (
    GPUResource,
    SourceCatalogResource,
    StorageResource,
    StudentModelResource,
    TeacherResource,
    TrainingResource,
)


def build_definitions(
    sources_file: str | os.PathLike[str] | None = None,
    storage_dir: str | os.PathLike[str] | None = None,
    resources: dict[str, object] | None = None,
    executor: str | None = None,
) -> Definitions:
    """Build the pipeline over a source catalog (default: sources.yaml) and a storage folder;
    ``resources`` replaces any default resource (e.g. another student model or device);
    ``executor`` (default ``$SRT_EXECUTOR``) picks k8s, celery or the default (srt_assets/executors.py)."""
    sources_path = Path(sources_file) if sources_file else paths.sources_file()
    storage = Path(storage_dir) if storage_dir else paths.storage_dir()
    catalog = load_catalog(sources_path)
    source_partitions = StaticPartitionsDefinition(catalog.names)
    layout = Partitioning(source_partitions, catalog.shards)
    return Definitions(
        assets=[
            *build_raw_assets(source_partitions),
            *build_reflection_assets(layout),
            *build_scoring_assets(layout),
            *build_selection_assets(layout),
            *build_finetuning_assets(source_partitions),
            *build_evaluation_assets(source_partitions),
        ],
        resources={
            "io_manager": PolarsParquetIOManager(base_dir=str(storage)),
            "storage": StorageResource(base_dir=str(storage)),
            "gpu": GPUResource(),
            "student": StudentModelResource(),
            "teacher": TeacherResource(),
            "training": TrainingResource(),
            "sources": SourceCatalogResource(sources_file=str(sources_path)),
            **(resources or {}),
        },
        executor=executor_from_env(executor),
    )


defs = build_definitions()
