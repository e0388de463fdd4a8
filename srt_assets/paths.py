"""Where the project keeps its configuration and data by default (all overridable by environment)."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def sources_file() -> Path:
    """The source catalog: ``$SRT_SOURCES_FILE`` or ``sources.yaml`` at the repository root."""
    return Path(os.environ.get("SRT_SOURCES_FILE", REPO_ROOT / "sources.yaml")).resolve()


def models_file() -> Path | None:
    """Model settings (teacher, judge, student, gpu, training): ``$SRT_MODELS_FILE`` (set but empty:
    none), else ``models.yaml`` at the repository root when there is one; None: the embedded defaults."""
    named = os.environ.get("SRT_MODELS_FILE")
    if named is not None:
        return Path(named).resolve() if named.strip() else None
    default = REPO_ROOT / "models.yaml"
    return default if default.is_file() else None


def dagster_home() -> Path:
    """``$DAGSTER_HOME`` or the repository's ``dagster_home/`` folder."""
    return Path(os.environ.get("DAGSTER_HOME", REPO_ROOT / "dagster_home")).resolve()


def storage_dir() -> Path:
    """Asset files (Parquet tables, model directories): ``$SRT_STORAGE_DIR`` or ``<dagster_home>/data``."""
    return Path(os.environ.get("SRT_STORAGE_DIR", dagster_home() / "data")).resolve()


def cache_dir() -> str:
    """The model-call cache folder: ``$SRT_CACHE_DIR``, or "" for ``<storage>/cache``. Several
    machines sharing one storage over a network file system should each set a local folder here:
    SQLite's locking is not safe over NFS."""
    return os.environ.get("SRT_CACHE_DIR", "")


def cache_url() -> str:
    """``$SRT_CACHE_URL``: a ``postgresql://`` database that holds the model-call cache for every
    machine of a cluster (workers score and generate once for all); "" keeps the SQLite file."""
    return os.environ.get("SRT_CACHE_URL", "")


BUNDLED_EVAL_DIR = REPO_ROOT / "data" / "eval"


def eval_data_dir() -> Path:
    """Held-out prompt sets: ``$SRT_EVAL_DATA_DIR`` (a folder with the full sets), else the few
    prompts per set that ship with the repository (``data/eval``), so a bare clone evaluates."""
    return Path(os.environ.get("SRT_EVAL_DATA_DIR") or BUNDLED_EVAL_DIR).resolve()
