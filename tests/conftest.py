"""Shared fixtures: temporary source catalogs, Dagster instances and definitions over them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def write_catalog(directory: Path, sources: dict) -> Path:
    """Write a sources.yaml with the given entries into ``directory`` and return its path."""
    path = directory / "sources.yaml"
    path.write_text(yaml.safe_dump({"sources": sources}), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.fixture
def dagster_instance():
    from dagster import instance_for_test

    with instance_for_test() as instance:
        yield instance


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
