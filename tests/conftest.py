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


@pytest.fixture(scope="session")
def student_model_dir(tmp_path_factory) -> Path:
    """The bundled SmolLM2-135M-Instruct converted once per test session to an HF directory."""
    from srt_assets.models.student import ensure_default_student_dir

    return ensure_default_student_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def student_tokenizer(student_model_dir: Path):
    from srt_assets.models.student import load_tokenizer

    return load_tokenizer(str(student_model_dir))


def alpaca_rows(n: int, with_input: int = 2) -> list[dict]:
    """The first ``n`` Alpaca rows plus ``with_input`` rows that have an input (shared data, else demo)."""
    path = SHARED_DATA / "alpaca_data.json.gz"
    if path.is_file():
        import gzip

        records = json.loads(gzip.decompress(path.read_bytes()))
    else:
        lines = (REPO_ROOT / "data" / "demo" / "alpaca_demo.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
    plain = [r for r in records if not r["input"]][:n]
    return plain + [r for r in records if r["input"]][:with_input]
