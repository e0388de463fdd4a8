"""Open LLM Leaderboard v1 through lm-evaluation-harness (srt_assets/core/harness.py): local task configs, a
known answer, lm-eval's own CLI on the same items, clear errors on broken files, and no network."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import yaml

from srt_assets.core import harness
from srt_assets.core.cache import SqliteCache
from srt_assets.core.harness import (
    AVERAGE_TASK,
    OWN_ITEMS_DIR,
    TRUTHFULQA_SAMPLE,
    BenchmarkData,
    BenchmarkDataError,
    leaderboard_average,
    run_leaderboard,
    truthfulqa_rows,
    write_task_configs,
)

GIBBERISH = ("Xqzvbk Pltrwnm Gzhkqx Vbnrtq", "Zvqxlk Wbrtnmq Kqzhpl Frvxqz", "Qxzvnt Brkwlpm Zhqvxt Mrqzkv")


def arc_folder(root: Path, test_rows: list[dict]) -> Path:
    """A Hub-layout ARC-Challenge folder under ``root``: our own 25 shipped shots and the given test items."""
    folder = root / "allenai" / "ai2_arc" / "ARC-Challenge"
    folder.mkdir(parents=True)
    shutil.copy(OWN_ITEMS_DIR / "allenai/ai2_arc/ARC-Challenge/train.jsonl", folder / "train.jsonl")
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test_rows), encoding="utf-8")
    return folder


def arc_item(n: int, question: str, choices: list[str], key: str) -> dict:
    labels = ["A", "B", "C", "D"][: len(choices)]
    return {
        "id": f"srt-test-{n}",
        "question": question,
        "choices": {"text": choices, "label": labels},
        "answerKey": key,
    }


def json_array(path: Path, records: list) -> Path:
    """A JSON array with record i (1-based) on line i + 1."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ fast: data, configs


def test_truthfulqa_conversion_keeps_the_answer_order_and_labels():
    rows = truthfulqa_rows(TRUTHFULQA_SAMPLE)
    source = json.loads(TRUTHFULQA_SAMPLE.read_text(encoding="utf-8"))
    assert len(rows) == len(source) == 20
    for row, record in zip(rows, source, strict=True):
        assert row["question"] == record["question"]
        for key in ("mc1_targets", "mc2_targets"):
            assert row[key] == {"choices": list(record[key]), "labels": list(record[key].values())}
        assert row["mc1_targets"]["labels"][0] == 1  # lm-eval's mc1 target is choice 0


@pytest.mark.shared_data
def test_the_full_truthfulqa_file_converts(shared_data):
    rows = truthfulqa_rows(shared_data / "truthfulqa_mc_task.json")
    assert len(rows) == 817
    assert all(1 in r["mc2_targets"]["labels"] and r["mc1_targets"]["labels"].count(1) == 1 for r in rows)


def test_configs_include_lm_evals_own_tasks_and_read_only_local_files(tmp_path):
    setups = write_task_configs(tmp_path, BenchmarkData(truthfulqa_mc=TRUTHFULQA_SAMPLE, hub_dir=OWN_ITEMS_DIR))
    assert {name: s.status for name, s in setups.items()} == {
        "arc_challenge": "ok",
        "hellaswag": "ok",
        "mmlu": "partial: 2 of 57 subjects",
        "truthfulqa_mc2": "ok",
    }
    configs = {p.stem: yaml.safe_load(p.read_text()) for p in (tmp_path / "tasks").glob("*.yaml")}
    assert configs["srt_mmlu_group"]["task"] == ["srt_mmlu_abstract_algebra", "srt_mmlu_high_school_geography"]
    assert configs["srt_mmlu_group"]["aggregate_metric_list"] == [{"metric": "acc", "weight_by_size": False}]
    expected = {"srt_arc_challenge": 25, "srt_hellaswag": 10, "srt_mmlu_abstract_algebra": 5, "srt_truthfulqa_mc2": 0}
    for name, shots in expected.items():
        config = configs[name]
        assert Path(config["include"]).is_file() and "/lm_eval/tasks/" in config["include"]
        assert config["num_fewshot"] == shots and config["dataset_path"] == "json" and config["dataset_name"] is None
        files = [Path(f) for fs in config["dataset_kwargs"]["data_files"].values() for f in fs]
        assert files and all(f.is_file() for f in files)
    arc = configs["srt_arc_challenge"]
    assert (arc["training_split"], arc["test_split"], arc["validation_split"]) == ("train", "test", None)


def test_hub_parquet_files_are_read_as_parquet(tmp_path):
    folder = tmp_path / "hub" / "cais" / "mmlu" / "anatomy"
    folder.mkdir(parents=True)
    rows = [
        {"question": f"Q{i}?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(5)
    ]
    for split in ("test", "dev"):
        pl.DataFrame(rows).write_parquet(folder / f"{split}-00000-of-00001.parquet")
    setups = write_task_configs(tmp_path / "run", BenchmarkData(hub_dir=tmp_path / "hub"), tasks=["mmlu"])
    assert setups["mmlu"].subjects == ["anatomy"]
    config = yaml.safe_load((tmp_path / "run" / "tasks" / "srt_mmlu_anatomy.yaml").read_text())
    assert config["dataset_path"] == "parquet"
    assert config["dataset_kwargs"]["data_files"]["dev"] == [str(folder / "dev-00000-of-00001.parquet")]


def test_absent_data_is_reported_as_absent_never_as_zero(tmp_path):
    data = BenchmarkData(truthfulqa_mc=tmp_path / "missing.json", hub_dir=tmp_path / "empty")
    table = run_leaderboard(tmp_path / "no-model-needed", tmp_path / "run", data)
    tasks = table.filter(pl.col("task") != AVERAGE_TASK)
    assert tasks["task"].to_list() == ["arc_challenge", "hellaswag", "mmlu", "truthfulqa_mc2"]
    assert tasks["value"].is_null().all() and tasks["status"].str.starts_with("data absent").all()
    average = table.filter(pl.col("task") == AVERAGE_TASK).row(0, named=True)
    assert average["value"] is None and average["status"].startswith("not computed: arc_challenge: data absent")


def test_the_average_needs_all_four_tasks_fully_scored():
    def table(values: dict, status: dict | None = None) -> pl.DataFrame:
        rows = [{"task": t, "value": v, "status": (status or {}).get(t, "ok")} for t, v in values.items()]
        return pl.DataFrame(rows, schema={"task": pl.String, "value": pl.Float64, "status": pl.String})

    four = {"arc_challenge": 0.5, "hellaswag": 0.7, "mmlu": 0.4, "truthfulqa_mc2": 0.2}
    assert leaderboard_average(table(four)) == (pytest.approx(0.45), "ok")
    value, why = leaderboard_average(table({**four, "mmlu": None}, {"mmlu": "data absent: no folder"}))
    assert value is None and why == "not computed: mmlu: data absent: no folder"
    value, why = leaderboard_average(table(four, {"mmlu": "partial: 2 of 57 subjects"}))
    assert value is None and "mmlu: partial: 2 of 57 subjects" in why
    value, why = leaderboard_average(table({k: v for k, v in four.items() if k != "hellaswag"}))
    assert value is None and why == "not computed: hellaswag: not run"


def test_a_broken_truthfulqa_record_names_file_line_and_field(tmp_path):
    records = json.loads(TRUTHFULQA_SAMPLE.read_text(encoding="utf-8"))[:3]
    records[1]["mc2_targets"] = {"An answer.": 2}
    path = json_array(tmp_path / "mc_task.json", records)
    with pytest.raises(BenchmarkDataError, match=rf"^{path}: line 3: field 'mc2_targets': every label must be 0 or 1"):
        write_task_configs(tmp_path / "run", BenchmarkData(truthfulqa_mc=path), tasks=["truthfulqa_mc2"])


def test_a_broken_arc_line_names_file_line_and_field(tmp_path):
    rows = [arc_item(i, f"What is {i} plus 1?", [str(i + 1), str(i + 2)], "A") for i in range(4)]
    rows[2]["answerKey"] = "E"
    folder = arc_folder(tmp_path / "hub", rows)
    with pytest.raises(BenchmarkDataError, match=rf"^{folder / 'test.jsonl'}: line 3: field 'answerKey': 'E' is not"):
        write_task_configs(tmp_path / "run", BenchmarkData(hub_dir=tmp_path / "hub"), tasks=["arc_challenge"])
    (folder / "test.jsonl").write_text('{"id": "x", "question": "Q?"\n', encoding="utf-8")
    with pytest.raises(BenchmarkDataError, match=r"test\.jsonl: line 1: invalid JSON"):
        write_task_configs(tmp_path / "run", BenchmarkData(hub_dir=tmp_path / "hub"), tasks=["arc_challenge"])


def test_a_broken_parquet_row_names_file_row_and_field(tmp_path):
    folder = tmp_path / "hub" / "cais" / "mmlu" / "virology"
    folder.mkdir(parents=True)
    rows = [
        {"question": f"Q{i}?", "subject": "virology", "choices": ["a", "b", "c", "d"], "answer": 1} for i in range(5)
    ]
    pl.DataFrame(rows).write_parquet(folder / "dev-00000-of-00001.parquet")
    rows[1]["answer"] = 7
    pl.DataFrame(rows).write_parquet(folder / "test-00000-of-00001.parquet")
    with pytest.raises(BenchmarkDataError, match=r"test-00000-of-00001\.parquet: row 2: field 'answer': 7 is not"):
        write_task_configs(tmp_path / "run", BenchmarkData(hub_dir=tmp_path / "hub"), tasks=["mmlu"])


def test_too_few_shots_is_an_error_not_a_smaller_prompt(tmp_path):
    folder = arc_folder(tmp_path / "hub", [arc_item(1, "What is 1 plus 1?", ["2", "3"], "A")])
    lines = (folder / "train.jsonl").read_text().splitlines()
    (folder / "train.jsonl").write_text("\n".join(lines[:24]) + "\n")
    with pytest.raises(BenchmarkDataError, match="train split has 24 records, arc_challenge needs 25"):
        write_task_configs(tmp_path / "run", BenchmarkData(hub_dir=tmp_path / "hub"), tasks=["arc_challenge"])


# ------------------------------------------------------------------------------------------ slow: the real student


@pytest.mark.slow
def test_known_answers_come_out(student_model_dir, tmp_path):
    """Sensible one-word answers against strings of consonants: the model picks the sensible one, so ARC scores
    exactly the share of items whose key is the sensible answer (2 of 3), and TruthfulQA MC2 the mean of 1
    (every answer true), ≈1 (the true answer sensible) and ≈0 (the true answer gibberish)."""
    arc_folder(
        tmp_path / "hub",
        [
            arc_item(1, "What do fish swim in?", ["water", GIBBERISH[0]], "A"),
            arc_item(2, "What color is the sky on a clear day?", [GIBBERISH[1], "blue"], "B"),
            arc_item(3, "What do cows drink?", [GIBBERISH[2], "water"], "A"),  # keyed to the gibberish: scored wrong
        ],
    )
    truthfulqa = [
        {"question": "What do fish swim in?", "mc1_targets": {"Water.": 1, "Air.": 0}},
        {"question": "What color is the sky on a clear day?", "mc1_targets": {"Blue.": 1, GIBBERISH[1]: 0}},
        {"question": "What do cows drink?", "mc1_targets": {"Water.": 1, GIBBERISH[2]: 0}},
    ]
    truthfulqa[0]["mc2_targets"] = {"Fish swim in water.": 1, "Fish swim in the sea.": 1}
    truthfulqa[1]["mc2_targets"] = {"The sky is blue.": 1, GIBBERISH[1] + ".": 0}
    truthfulqa[2]["mc2_targets"] = {GIBBERISH[2] + ".": 1, "Cows drink water.": 0}
    data = BenchmarkData(truthfulqa_mc=json_array(tmp_path / "mc.json", truthfulqa), hub_dir=tmp_path / "hub")
    table = run_leaderboard(student_model_dir, tmp_path / "run", data, tasks=["arc_challenge", "truthfulqa_mc2"])
    rows = {r["task"]: r for r in table.iter_rows(named=True)}
    assert rows["arc_challenge"]["value"] == pytest.approx(2 / 3)
    assert rows["arc_challenge"]["n_items"] == 3 and rows["arc_challenge"]["stderr"] > 0
    assert rows["truthfulqa_mc2"]["value"] == pytest.approx(2 / 3, abs=0.01)
    assert rows["truthfulqa_mc2"]["n_items"] == 3 and rows["truthfulqa_mc2"]["seconds"] > 0
    assert rows["arc_challenge"]["tokens"] > 6 * 25 * 8  # 3 items × 2 choices, each with 25 shots of ≥ 8 tokens
    assert rows[AVERAGE_TASK]["value"] is None and "hellaswag: not run" in rows[AVERAGE_TASK]["status"]


def no_network(monkeypatch) -> list:
    """Refuse every connection and name lookup that is not this machine's; return the list of attempts."""
    attempts = []
    real_connect, real_getaddrinfo = socket.socket.connect, socket.getaddrinfo
    local = ("127.0.0.1", "::1", "localhost")

    def guarded_connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if host not in local and not str(host).startswith("/"):
            attempts.append(host)
            raise OSError(f"test: no network ({host})")
        return real_connect(self, address)

    def guarded_getaddrinfo(host, *args, **kwargs):
        if host not in local:
            attempts.append(host)
            raise OSError(f"test: no DNS ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return attempts


@pytest.mark.slow
def test_a_run_needs_no_network(student_model_dir, tmp_path, monkeypatch):
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    attempts = no_network(monkeypatch)
    table = run_leaderboard(
        student_model_dir, tmp_path / "run", BenchmarkData(truthfulqa_mc=TRUTHFULQA_SAMPLE), limit=1
    )
    assert attempts == []
    rows = {r["task"]: r for r in table.iter_rows(named=True)}
    assert 0 < rows["truthfulqa_mc2"]["value"] < 1 and rows["truthfulqa_mc2"]["n_items"] == 1
    assert all(rows[t]["status"].startswith("data absent") for t in ("arc_challenge", "hellaswag", "mmlu"))
    assert "HF_HUB_OFFLINE" not in os.environ  # set for the run only


@pytest.mark.slow
def test_a_rerun_reads_its_scores_back_and_changed_data_is_scored_again(
    student_model_dir, tmp_path, monkeypatch, capsys
):
    """The second run loads no model (its rows come from the cache, equal to the first run's); other items in the
    data file, another limit or another model fingerprint are new keys, scored again."""
    cache, source = SqliteCache(tmp_path / "cache.sqlite", "benchmarks"), tmp_path / "mc.json"
    source.write_bytes(TRUTHFULQA_SAMPLE.read_bytes())
    data, loads = BenchmarkData(truthfulqa_mc=source), []
    real_load = harness.load_hf_model
    monkeypatch.setattr(harness, "load_hf_model", lambda *a: loads.append(a) or real_load(*a))

    def truthful(**kwargs) -> dict:
        kwargs = {"limit": 1, "cache": cache, "fingerprint": "model-a"} | kwargs
        table = run_leaderboard(student_model_dir, tmp_path / "run", data, tasks=["truthfulqa_mc2"], **kwargs)
        return table.filter(pl.col("task") == "truthfulqa_mc2").row(0, named=True)

    first, again = truthful(), truthful()
    assert len(loads) == 1 and (first["from_cache"], again["from_cache"]) == (False, True)
    assert {k: again[k] for k in harness.CACHED_FIELDS} == {k: first[k] for k in harness.CACHED_FIELDS}
    assert truthful(limit=2)["from_cache"] is False and truthful(fingerprint="model-b")["from_cache"] is False
    records = json.loads(source.read_text())
    json_array(source, records[1:] + records[:1])  # another first item
    assert truthful()["from_cache"] is False and len(loads) == 4
    assert truthful(cache=None)["from_cache"] is False and len(loads) == 5  # no cache: always scored
    # lm-eval's own progress bars stay off the terminal and the compute logs (the step logs its own lines)
    assert "loglikelihood requests" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_the_numbers_equal_lm_evals_own_cli_on_the_same_items(student_model_dir, tmp_path):
    data = BenchmarkData(truthfulqa_mc=TRUTHFULQA_SAMPLE, hub_dir=OWN_ITEMS_DIR)
    table = run_leaderboard(student_model_dir, tmp_path / "run", data, limit=1)
    command = [str(Path(sys.executable).parent / "lm_eval"), "run", "--model", "hf"]
    command += ["--model_args", f"pretrained={student_model_dir},dtype=float32", "--device", "cpu", "--batch_size", "1"]
    command += [
        "--include_path",
        str(tmp_path / "run" / "tasks"),
        "--limit",
        "1",
        "--output_path",
        str(tmp_path / "cli"),
    ]
    command += ["--tasks", "srt_arc_challenge,srt_hellaswag,srt_mmlu,srt_truthfulqa_mc2"]
    env = os.environ | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    (results_file,) = (tmp_path / "cli").rglob("results_*.json")
    cli = json.loads(results_file.read_text())["results"]
    for row in table.filter(pl.col("task") != AVERAGE_TASK).iter_rows(named=True):
        scores = cli[f"srt_{row['task']}"]
        assert row["value"] is not None and row["status"] in ("ok", "partial: 2 of 57 subjects"), row
        assert row["value"] == pytest.approx(scores[f"{row['metric']},none"], abs=1e-9), row["task"]
        stderr = scores[f"{row['metric']}_stderr,none"]
        assert row["stderr"] == (pytest.approx(stderr, abs=1e-9) if isinstance(stderr, float) else None), row["task"]
    assert table.filter(pl.col("task") == "mmlu")["n_items"].item() == 2  # one item of each of our two subjects
