"""Untrusted folders and killed runs (issue 24): outputs are written atomically and never through a
planted symlink, killed writes' temporaries are cleaned up, the model fingerprint covers every
tokenizer and template file, and unreadable Parquet or cache files are named in the error."""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from conftest import write_catalog
from dagster import AssetKey, build_input_context, build_output_context
from upath import UPath

from srt_assets.core import files
from srt_assets.core.cache import SqliteCache
from srt_assets.core.files import UnreadableFileError, atomic_path, atomic_write_text
from srt_assets.io_managers import _ParquetTableIOManager
from srt_assets.models.identity import model_fingerprint

DEAD_PID = 4_194_305  # above Linux's largest pid_max (2**22): no process has it
VICTIM_TEXT = "the victim's own content\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere" / "victim.txt"
    path.parent.mkdir()
    path.write_text(VICTIM_TEXT)
    return path


def plant_link(at: Path, victim: Path) -> Path:
    at.parent.mkdir(parents=True, exist_ok=True)
    at.symlink_to(victim)
    return at


def assert_replaced_not_followed(link: Path, victim: Path) -> None:
    assert victim.read_text() == VICTIM_TEXT
    assert link.is_file() and not link.is_symlink()


def temps_beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_replaces_a_symlink_and_leaves_no_temp(tmp_path, victim):
    target = plant_link(tmp_path / "out" / "report.md", victim)
    atomic_write_text(target, "new")
    assert_replaced_not_followed(target, victim)
    assert target.read_text() == "new" and temps_beside(target) == []
    umask = os.umask(0o022)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask  # as a plain write makes it, not 0600


def test_a_failed_write_removes_its_temp_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "table.parquet"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old" and temps_beside(target) == []


def test_the_fingerprint_memo_is_not_written_through_a_symlink(tmp_path, victim):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    memo = plant_link(model / ".srt_fingerprint", victim)
    fingerprint = model_fingerprint(model)
    assert_replaced_not_followed(memo, victim)
    assert json.loads(memo.read_text())["sha256"] == fingerprint


def test_the_report_is_not_written_through_symlinks(tmp_path, victim):
    from srt_assets.defs.evaluation.pairwise import pairwise_sections
    from srt_assets.defs.evaluation.reference_losses import training_sections
    from srt_assets.report import write_report

    out = tmp_path / "out"
    links = [plant_link(out / name, victim) for name in ("report.md", "report.html")]
    judgements = pl.DataFrame({"model": ["selected"], "opponent": ["full"], "prompt_set": ["vicuna"],
                               "verdict": ["unjudged"]})  # fmt: skip
    losses = pl.DataFrame({"dataset": ["selected"], "prompt_set": ["alpaca_eval"], "prompt_id": ["0"],
                           "loss": [1.0], "base_loss": [1.0], "tokens": [1]})  # fmt: skip
    write_report("demo", [*pairwise_sections(judgements), *training_sections(losses, {"selected": None})], out)
    for link in links:
        assert_replaced_not_followed(link, victim)


def test_model_outputs_are_not_written_through_a_symlink(tmp_path, victim):
    from srt_assets.defs.evaluation.leaderboards import export_model_outputs

    link = plant_link(tmp_path / "selected" / "model_outputs.json", victim)
    table = pl.DataFrame({"checkpoint": ["selected"], "instruction": ["hi"], "output": ["hello"],
                          "generator": ["g"], "dataset": ["alpaca_eval"]})  # fmt: skip
    export_model_outputs(table, tmp_path)
    assert_replaced_not_followed(link, victim)
    assert json.loads(link.read_text())[0]["output"] == "hello"


def test_the_io_manager_removes_only_dead_writers_temps(tmp_path):
    folder = tmp_path / "t"
    folder.mkdir()
    old = time.time() - 2 * files.STALE_AFTER_S
    planted = {
        f".p.parquet.{DEAD_PID}.tmp": False,  # a kill -9'd write (the old name: PID only)
        f".p.parquet.{DEAD_PID}-{files._HOST}.0a1b2c3d.tmp": False,  # a kill -9'd write on this host
        f".p.parquet.{os.getpid()}-{files._HOST}.0a1b2c3d.tmp": True,  # a live writer
        f".p.parquet.{DEAD_PID}-otherhost.0a1b2c3d.tmp": True,  # another machine's: its PID is not ours to check
        f".p.parquet.{os.getpid()}-otherhost.99.tmp": False,  # made old below: a leftover whatever the PID
        f".q.parquet.{DEAD_PID}.tmp": True,  # another file's: not this write's business
    }
    for name in planted:
        (folder / name).write_bytes(b"partial")
    os.utime(folder / f".p.parquet.{os.getpid()}-otherhost.99.tmp", (old, old))
    manager = _ParquetTableIOManager(base_path=UPath(tmp_path))
    frame = pl.DataFrame({"a": [1, 2]})
    manager.dump_to_path(build_output_context(asset_key=AssetKey("t")), frame, UPath(folder / "p.parquet"))
    assert pl.read_parquet(folder / "p.parquet").equals(frame)
    assert temps_beside(folder / "p.parquet") == sorted(name for name, kept in planted.items() if kept)


def truncated_parquet(path: Path) -> Path:
    pl.DataFrame({"a": list(range(1000)), "b": ["text"] * 1000}).write_parquet(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_a_truncated_table_names_its_file_and_what_to_do(tmp_path):
    path = truncated_parquet(tmp_path / "p.parquet")
    manager = _ParquetTableIOManager(base_path=UPath(tmp_path))
    context = build_input_context(asset_key=AssetKey("t"))
    with pytest.raises(UnreadableFileError, match=r"(?s)p\.parquet.*truncated.*materialize"):
        manager.load_from_path(context, UPath(path))


def test_a_truncated_stored_table_names_its_file_in_explain(tmp_path):
    from srt_assets.core.provenance import load_partition_tables

    (tmp_path / "raw_samples").mkdir()
    truncated_parquet(tmp_path / "raw_samples" / "demo.parquet")
    with pytest.raises(UnreadableFileError, match=r"raw_samples/demo\.parquet.*truncated"):
        load_partition_tables(tmp_path, "demo")


@pytest.mark.integration
def test_srt_explain_over_a_truncated_table_says_so_in_one_line(tmp_path):
    """It printed a traceback; now one line naming the file and exit status 1."""
    (tmp_path / "raw_samples").mkdir()
    truncated_parquet(tmp_path / "raw_samples" / "demo.parquet")
    catalog = write_catalog(tmp_path, {"demo": {"path": "demo.jsonl"}})
    command = [sys.executable, "-m", "srt_assets.cli", "explain", "demo-0123456789abcdef", "--storage", str(tmp_path)]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "SRT_SOURCES_FILE": str(catalog)}
    )
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert re.match(r"srt explain: .*raw_samples/demo\.parquet.*truncated", done.stderr)


def test_a_truncated_source_parquet_names_its_file(tmp_path):
    from srt_assets.core.formats import FORMATS, RawDataError

    path = truncated_parquet(tmp_path / "source.parquet")
    with pytest.raises(RawDataError, match=r"source\.parquet.*truncated"):
        list(FORMATS["parquet"].rows(path))


def test_a_cache_file_that_is_not_a_database_names_itself(tmp_path):
    path = tmp_path / "calls.sqlite"
    path.write_bytes(b"this is not a database, just some bytes " * 100)
    with pytest.raises(sqlite3.DatabaseError, match=r"(?s)calls\.sqlite.*delete"):
        SqliteCache(path, "teacher_calls")
    assert path.read_bytes().startswith(b"this is not a database")  # the user's file is left alone


def test_a_fingerprint_memo_shipped_with_a_model_vouches_for_nothing(tmp_path):
    """A memo was trusted when names, sizes and mtimes matched, and an archive keeps mtimes: a model
    shipped with a forged memo took any fingerprint it claimed (and another model's cached replies)."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "config.json").write_text('{"n": 1}')
    (shipped / "model.safetensors").write_bytes(b"weights")
    real = model_fingerprint(shipped)
    memo = json.loads((shipped / ".srt_fingerprint").read_text())
    (shipped / ".srt_fingerprint").write_text(json.dumps(memo | {"sha256": "f" * 64}))  # the forgery
    unpacked = tmp_path / "unpacked"
    shutil.copytree(shipped, unpacked, copy_function=shutil.copy2)  # keeps mtimes, as tar does
    assert model_fingerprint(unpacked) == real


def test_the_fingerprint_follows_the_chat_template_and_ignores_hidden_files(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in {"config.json": "{}", "chat_template.jinja": "{{ messages }}", "merges.txt": "a b",
                       "tokenizer.model": "spm", "vocab.txt": "a"}.items():  # fmt: skip
        (model / name).write_text(text)
    first = model_fingerprint(model)
    (model / ".hidden").write_text("editor state")
    assert model_fingerprint(model) == first
    (model / "chat_template.jinja").write_text("{{ messages | reverse }}")
    changed = model_fingerprint(model)
    assert changed != first
    for name in ("merges.txt", "tokenizer.model", "vocab.txt"):
        (model / name).write_text("changed " + name)
        assert model_fingerprint(model) != changed, name
        changed = model_fingerprint(model)


@pytest.mark.parametrize("optional", [False, True])
def test_a_missing_partition_fails_by_name_unless_the_input_is_optional(tmp_path, optional):
    """The report reads its parts' tables as optional inputs: a partition not materialized loads as
    None there, while every other reader still gets an error naming the partition and its path."""
    from dagster import StaticPartitionsDefinition

    from srt_assets.io_managers import OPTIONAL_INPUT

    (tmp_path / "t").mkdir()
    pl.DataFrame({"a": [1]}).write_parquet(tmp_path / "t" / "x.parquet")
    manager = _ParquetTableIOManager(base_path=UPath(tmp_path))
    context = build_input_context(
        asset_key=AssetKey("t"),
        asset_partitions_def=StaticPartitionsDefinition(["x", "y"]),
        partition_key="y",
        definition_metadata={OPTIONAL_INPUT: True} if optional else None,
    )
    if optional:
        assert manager.load_input(context) is None
    else:
        with pytest.raises(FileNotFoundError, match=r"'t' has no materialization for partition\(s\) y .*y\.parquet"):
            manager.load_input(context)


def test_a_staged_table_is_moved_into_place_and_scanned_lazily(tmp_path):
    """A table written block by block (a row group each) is renamed into the partition's path, not
    loaded; the partition's count goes under dagster/partition_row_count; an input annotated
    LazyFrame scans the file instead of reading it."""
    from dagster import DagsterType, StaticPartitionsDefinition

    from srt_assets.core.files import ParquetBlockWriter

    writer = ParquetBlockWriter(tmp_path / ".staging" / "t" / "p.parquet", {"a": pl.Int64(), "b": pl.String()})
    for start in range(0, 10, 4):
        writer.write(pl.DataFrame({"a": range(start, min(start + 4, 10))}).with_columns(b=pl.col("a").cast(str)))
    staged = writer.finish()
    assert staged.rows == 10 and pq.ParquetFile(staged.path).metadata.num_row_groups == 3
    manager = _ParquetTableIOManager(base_path=UPath(tmp_path))
    partitions = StaticPartitionsDefinition(["p"])
    output = build_output_context(asset_key=AssetKey("t"), partition_key="p", asset_partitions_def=partitions)
    target = tmp_path / "t" / "p.parquet"
    manager.dump_to_path(output, staged, UPath(target))
    assert target.is_file() and not staged.path.exists()
    metadata = output.get_logged_metadata()
    assert metadata["dagster/partition_row_count"].value == 10 and "dagster/row_count" not in metadata
    lazy_type = DagsterType(lambda _, value: isinstance(value, pl.LazyFrame), "LazyFrame", typing_type=pl.LazyFrame)
    loaded = manager.load_from_path(build_input_context(asset_key=AssetKey("t"), dagster_type=lazy_type), UPath(target))
    assert isinstance(loaded, pl.LazyFrame) and loaded.collect()["a"].to_list() == list(range(10))


def test_a_failed_block_write_leaves_no_staged_file(tmp_path):
    from srt_assets.core.files import ParquetBlockWriter

    with pytest.raises(RuntimeError), ParquetBlockWriter(tmp_path / "s" / "x.parquet", {"a": pl.Int64()}) as writer:
        writer.write(pl.DataFrame({"a": [1, 2]}))
        raise RuntimeError("the teacher failed half-way")
    assert list((tmp_path / "s").iterdir()) == []


def test_a_teacher_step_whose_report_fails_leaves_no_staged_file(tmp_path):
    """The candidates were written and staged; reading them back for the metadata fails (here: the rows they
    rewrote lack their texts), so no output moves the file into place: it is discarded, not left behind."""
    from dagster import StaticPartitionsDefinition, build_asset_context

    from srt_assets.defs.teacher.assets import CandidateStep, CandidateTally, ReflectionConfig
    from srt_assets.partitions import Partitioning
    from srt_assets.resources import StorageResource

    storage, layout = StorageResource(base_dir=str(tmp_path)), Partitioning(StaticPartitionsDefinition(["s"]))
    step = CandidateStep(build_asset_context(partition_key="s"), ReflectionConfig(), "new_instructions",
                         "instruction", layout, storage)  # fmt: skip
    with step.writer() as writer:
        staged = writer.finish()
    assert staged.path.is_file()
    with pytest.raises(pl.exceptions.ColumnNotFoundError):
        list(step.report(staged, pl.DataFrame({"sample_id": ["s-1"]}), CandidateTally(), {}))
    assert not staged.path.exists() and list(staged.path.parent.iterdir()) == []
