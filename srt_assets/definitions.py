"""The Dagster code location: every asset, check, job and resource of the pipeline in one Definitions."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions

from srt_assets import paths
from srt_assets.core.sources import load_catalog
from srt_assets.defs import audit, evaluation, raw, selection, student, teacher, training
from srt_assets.executors import executor_from_env
from srt_assets.io_managers import PolarsParquetIOManager
from srt_assets.partitions import catalog_partitioning
from srt_assets.recovery import free_dead_runs_sensor
from srt_assets.resources import (
    ComputeResource,
    SourceCatalogResource,
    StorageResource,
    StudentModelResource,
    TrainingResource,
    TransformersChatResource,
)
from srt_assets.settings_file import resources_from_file


def build_definitions(
    sources_file: str | os.PathLike[str] | None = None,
    storage_dir: str | os.PathLike[str] | None = None,
    resources: dict[str, object] | None = None,
    executor: str | None = None,
    models_file: str | os.PathLike[str] | None = None,
) -> Definitions:
    """Build the pipeline over a source catalog (default: sources.yaml) and a storage folder.
    Resources come from the embedded defaults, then the model settings file (``models_file``,
    default ``$SRT_MODELS_FILE`` or ``models.yaml``: teacher and judge backends, student, gpu,
    training), then ``resources`` (any resource object); without a judge of its own, the judge is
    the teacher. ``executor`` (default ``$SRT_EXECUTOR``) picks k8s, celery or the default."""
    sources_path = Path(sources_file) if sources_file else paths.sources_file()
    settings_file = Path(models_file) if models_file else paths.models_file()
    storage = Path(storage_dir) if storage_dir else paths.storage_dir()
    catalog = load_catalog(sources_path)
    layout = catalog_partitioning(catalog)
    chosen = {
        "io_manager": PolarsParquetIOManager(base_dir=str(storage)),
        "storage": StorageResource(base_dir=str(storage)),
        "gpu": ComputeResource(),
        "student": StudentModelResource(),
        "teacher": TransformersChatResource(),
        "training": TrainingResource(),
        "sources": SourceCatalogResource(sources_file=str(sources_path)),
        **(resources_from_file(settings_file) if settings_file else {}),
        **(resources or {}),
    }
    chosen.setdefault("judge", chosen["teacher"])
    return Definitions.merge(
        raw.definitions(layout, catalog),
        teacher.definitions(layout),
        student.definitions(layout),
        selection.definitions(layout),
        training.definitions(layout),
        evaluation.definitions(layout),
        audit.definitions(layout),
        Definitions(
            sensors=[free_dead_runs_sensor],
            resources=chosen,
            executor=executor_from_env(executor),
        ),
    )


defs = build_definitions()
