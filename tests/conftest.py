"""Shared fixtures: temporary source catalogs, Dagster instances and definitions over them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

pytest_plugins = ["tier_guard", "pytester"]

REPO_ROOT = Path(__file__).resolve().parent.parent
# The tests build the models they need themselves: a models.yaml a user keeps at the repository root
# (say, a 7B student on vLLM) must not reach them, nor the subprocesses they start. Empty means none.
os.environ["SRT_MODELS_FILE"] = ""
# The full data sets (CI has them beside the repository; a clone does not): $SRT_SHARED_DATA or ../shared/data.
SHARED_DATA = Path(os.environ.get("SRT_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


def demo_ops() -> dict:
    """The ``ops`` of configs/demo.yaml: the loose teacher bounds the bundled 135M teacher needs."""
    return yaml.safe_load((REPO_ROOT / "configs" / "demo.yaml").read_text(encoding="utf-8"))["ops"]


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
        pytest.skip(
            f"needs the full data sets, not found at {SHARED_DATA}: set SRT_SHARED_DATA to the folder that holds "
            "alpaca_data.json.gz and the held-out sets (see ../shared/data/SOURCES.md)"
        )
    return SHARED_DATA


@pytest.fixture(scope="session")
def student_model_dir(tmp_path_factory) -> Path:
    """The bundled SmolLM2-135M-Instruct converted once per test session to an HF directory."""
    from srt_assets.models.identity import ensure_bundled_model_dir

    return ensure_bundled_model_dir(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def student_tokenizer(student_model_dir: Path):
    from srt_assets.models.student import load_tokenizer

    return load_tokenizer(str(student_model_dir))


def training_examples(model_dir: Path, max_length: int, n: int, with_input: int) -> list:
    """(token ids, response start) of the first Alpaca rows in the chat template, as the checkpoint
    asset builds them."""
    from srt_assets.core.ifd import ScoringConfig
    from srt_assets.core.training import sft_examples
    from srt_assets.models.student import build_text_builder, load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    builder = build_text_builder(tokenizer, "chat", ScoringConfig(max_length=max_length))
    rows = [(r["instruction"], r["input"], r["output"]) for r in alpaca_rows(n, with_input=with_input)]
    return sft_examples(builder, rows, tokenizer.eos_token_id)


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


def materialize(defs, partition: str, instance, upto: str | None = None, run_config=None, selection=None):
    """Run one partition through the real Definitions, never raising: everything, the assets
    ``upto`` needs (that asset and its upstream), or an explicit list of asset keys."""
    from dagster import AssetSelection

    job = defs.resolve_implicit_global_asset_job_def()
    if upto is not None:
        selection = AssetSelection.assets(upto).upstream().required_multi_asset_neighbors()
        selection = list(selection.resolve(defs.resolve_asset_graph()))
    return job.execute_in_process(
        partition_key=partition,
        instance=instance,
        raise_on_error=False,
        asset_selection=selection,
        run_config=run_config,
    )


def latest_metadata(instance, key) -> dict:
    """The metadata values of an asset's latest materialization."""
    from dagster import AssetKey

    asset_key = key if isinstance(key, AssetKey) else AssetKey(key)
    event = instance.get_latest_materialization_event(asset_key)
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


def table_cells(markdown: str) -> dict:
    """A metadata table as the UI shows it (``table_value``), read back: first column → the cell of a
    two-column table, else → {column: cell}; cells as the text a person reads, escapes undone."""
    import re

    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    if not lines:
        return {}
    split = [[re.sub(r"\\(.)", r"\1", c.strip()) for c in line.strip("|").split(" | ")] for line in lines]
    header, rows = split[0], split[2:]
    if len(header) == 2:
        return {row[0]: row[1] for row in rows}
    return {row[0]: dict(zip(header[1:], row[1:], strict=True)) for row in rows}


@pytest.fixture(scope="session")
def reference_scorer(student_model_dir):
    """The authors' straightforward computation as a LossScorer: batch of one, context labels -100,
    ``outputs.loss`` in float32. Every engine is checked against it."""
    from transformers import AutoModelForCausalLM

    from srt_assets.models.student_hf import batch_of_one_losses

    model = AutoModelForCausalLM.from_pretrained(student_model_dir, dtype="float32").eval()

    class Reference:
        def mean_losses(self, sequences, starts):
            return batch_of_one_losses(model, sequences, starts)

    return Reference()


def in_fresh_interpreter(module: str, function: str, *args: object) -> object:
    """``module.function(*args)`` run in a new Python process (as ``srt materialize`` runs a stage,
    so a peak-memory probe measures the stage alone); its JSON result. ``args`` go as their repr."""
    import subprocess
    import sys

    call = ", ".join(repr(arg) for arg in args)
    probe = (
        f"import sys, json; from pathlib import PosixPath; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
        f"from {module} import {function}; print(json.dumps({function}({call})))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])
