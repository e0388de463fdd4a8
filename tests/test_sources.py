from pathlib import Path

import pytest
from conftest import REPO_ROOT, write_catalog

from srt_assets.core.sources import SourceConfigError, SourceFileMissing, infer_format, load_catalog


def test_repo_catalog_declares_required_sources():
    catalog = load_catalog(REPO_ROOT / "sources.yaml")
    assert {"demo", "alpaca", "alpaca_cherry5", "wizardlm"} <= set(catalog.names)
    assert catalog.get("demo").path.is_file()
    wizard = catalog.get("wizardlm")
    assert wizard.fields.instruction == "instruction" and wizard.fields.output == "output"


def test_relative_paths_resolve_against_the_catalog_folder(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    file = write_catalog(tmp_path / "sub", {"mine": {"path": "../data.jsonl"}})
    spec = load_catalog(file).get("mine")
    assert spec.path == (tmp_path / "data.jsonl").resolve()
    assert spec.format == "jsonl"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.json", "json"),
        ("a.json.gz", "json"),
        ("a.jsonl", "jsonl"),
        ("a.jsonl.gz", "jsonl"),
        ("a.parquet", "parquet"),
    ],
)
def test_infer_format(name: str, expected: str):
    assert infer_format(Path(name)) == expected


def test_unknown_key_is_named(tmp_path: Path):
    file = write_catalog(tmp_path, {"bad": {"path": "x.json", "colums": 3}})
    with pytest.raises(SourceConfigError, match=r"source 'bad': unknown key\(s\) \['colums'\]"):
        load_catalog(file)


def test_missing_file_names_path_and_variable(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("SRT_WIZARD_TEST", raising=False)
    file = write_catalog(tmp_path, {"wiz": {"path": "WizardLM_evol_instruct_70k.json", "path_env": "SRT_WIZARD_TEST"}})
    spec = load_catalog(file).get("wiz")
    with pytest.raises(SourceFileMissing) as info:
        spec.require_file()
    message = str(info.value)
    assert str(tmp_path / "WizardLM_evol_instruct_70k.json") in message
    assert "SRT_WIZARD_TEST" in message and "sources.wiz.path" in message


def test_path_env_overrides_path(tmp_path: Path, monkeypatch):
    real = tmp_path / "elsewhere.jsonl"
    real.write_text("{}\n")
    monkeypatch.setenv("SRT_WIZARD_TEST", str(real))
    file = write_catalog(tmp_path, {"wiz": {"path": "missing.json", "path_env": "SRT_WIZARD_TEST"}})
    spec = load_catalog(file).get("wiz")
    assert spec.path == real and spec.format == "jsonl"


def test_unknown_source_lists_known_ones(tmp_path: Path):
    catalog = load_catalog(write_catalog(tmp_path, {"one": {"path": "a.json"}}))
    with pytest.raises(KeyError, match=r"unknown source 'two'.*one"):
        catalog.get("two")
