"""Open LLM Leaderboard v1 scores through EleutherAI's lm-evaluation-harness, offline by construction.

The four tasks (ARC-Challenge 25-shot acc_norm, HellaSwag 10-shot acc_norm, MMLU 5-shot acc, TruthfulQA MC2
0-shot) are lm-eval's own task definitions, reused by ``include:``; the configs written here only point their
data at local files (``dataset_path: json|parquet`` + ``dataset_kwargs.data_files``), so nothing is downloaded.
TruthfulQA's original ``mc_task.json`` (answer → 0/1 maps) is converted to the lists ``truthfulqa_mc2`` reads;
ARC, HellaSwag and MMLU are read from a folder in the Hub's layout (``<owner>/<name>/<config>/<split>*``).

Every input record is checked before lm-eval sees it, so a bad one is reported by file, line (or row) and
field instead of as a Jinja error deep inside a run. A task without data is a row "data absent" with no
value, never a zero, and the leaderboard average is given only when all four tasks were scored.

A task's row is kept in the call cache under what decides it (lm-eval's version, the model's fingerprint, the
contents of the task's data files, items and run settings), so a rerun loads no model for what it scored before.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import yaml

from srt_assets.core.cache import CallCache, content_key
from srt_assets.core.files import file_sha256
from srt_assets.core.sources import SHARED_DATA_ENV

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "benchmarks"
TRUTHFULQA_SAMPLE = DATA_DIR / "truthfulqa_mc_sample.json"
OWN_ITEMS_DIR = DATA_DIR / "srt_own_items"  # items of our own making in the Hub's layout (tests, not benchmarks)
TRUTHFULQA_FILE = "truthfulqa_mc_task.json"
AVERAGE_TASK = "leaderboard_v1_average"
TAG = "srt_leaderboard_v1"
MMLU_SUBJECT_COUNT = 57
# The leaderboard v1 averaged the 57 MMLU subjects' accuracies unweighted (its harness reported hendrycksTest-*
# tasks only; lm-eval's ``mmlu`` group weights by size since late 2023: EleutherAI/lm-evaluation-harness#1525).
MMLU_WEIGHT_BY_SIZE = False
_SPLIT_FILE = r"^{split}(-\d+-of-\d+)?\.(parquet|jsonl|json)$"

TABLE_SCHEMA: dict[str, pl.DataType] = {
    "checkpoint": pl.String(),
    "task": pl.String(),
    "metric": pl.String(),
    "value": pl.Float64(),
    "stderr": pl.Float64(),
    "n_items": pl.Int64(),
    "tokens": pl.Int64(),  # tokens in the scored requests (context + continuation, one request per choice)
    "num_fewshot": pl.Int64(),
    "limit": pl.Int64(),
    "seconds": pl.Float64(),
    "status": pl.String(),
    "data": pl.String(),
    "from_cache": pl.Boolean(),  # the row was scored by an earlier run with the same model, data and settings
}


class BenchmarkDataError(ValueError):
    """A benchmark input file that lm-eval cannot read as its task expects (the message names file, line, field)."""


@dataclass(frozen=True)
class BenchmarkTask:
    """One leaderboard task: lm-eval's definition, its shots and metric, and where its data live on the Hub."""

    name: str
    base_yaml: str  # relative to lm_eval/tasks
    num_fewshot: int
    metric: str
    hub_dataset: str
    hub_config: str | None
    eval_split: str
    fewshot_split: str

    @property
    def lm_eval_name(self) -> str:
        return f"srt_{self.name}"


LEADERBOARD_V1: tuple[BenchmarkTask, ...] = (
    BenchmarkTask("arc_challenge", "arc/arc_challenge.yaml", 25, "acc_norm", "allenai/ai2_arc", "ARC-Challenge",
                  eval_split="test", fewshot_split="train"),
    BenchmarkTask("hellaswag", "hellaswag/hellaswag.yaml", 10, "acc_norm", "Rowan/hellaswag", "data",
                  eval_split="validation", fewshot_split="train"),
    BenchmarkTask("mmlu", "mmlu/default", 5, "acc", "cais/mmlu", None, eval_split="test", fewshot_split="dev"),
    BenchmarkTask("truthfulqa_mc2", "truthfulqa/truthfulqa_mc2.yaml", 0, "acc", "truthfulqa/truthful_qa", None,
                  eval_split="validation", fewshot_split=""),
)  # fmt: skip
TASKS_BY_NAME = {task.name: task for task in LEADERBOARD_V1}


@dataclass(frozen=True)
class BenchmarkData:
    """Where the task data are: TruthfulQA's ``mc_task.json`` and a folder in the Hub's layout for the rest."""

    truthfulqa_mc: Path | None = None
    hub_dir: Path | None = None

    @classmethod
    def default(cls, hub_dir: Path | None = None) -> BenchmarkData:
        """The full TruthfulQA file from $SRT_SHARED_DATA (else ../shared/data) when there, else the shipped sample."""
        shared = os.environ.get(SHARED_DATA_ENV)
        folder = Path(shared) if shared else Path(__file__).resolve().parents[2].parent / "shared" / "data"
        full = folder / TRUTHFULQA_FILE
        return cls(truthfulqa_mc=full if full.is_file() else TRUTHFULQA_SAMPLE, hub_dir=hub_dir)


@dataclass
class TaskSetup:
    """A task's config as written for one run: its lm-eval name, whether it has data, and which."""

    task: BenchmarkTask
    status: str = "ok"
    data: str = ""
    subjects: list[str] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)  # the data files lm-eval reads: their contents key the cache

    @property
    def runnable(self) -> bool:
        return not self.status.startswith("data absent")


# ------------------------------------------------------------------------------------------ reading records


def _fail(path: Path, where: str, what: str) -> BenchmarkDataError:
    return BenchmarkDataError(f"{path}: {where}: {what}")


def _json_array(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    """(“line N”, record) of a JSON array, decoded one element at a time so each has its line."""
    decoder, pos = json.JSONDecoder(), 0

    def skip(at: int) -> int:
        while at < len(text) and text[at] in " \t\r\n":
            at += 1
        return at

    pos = skip(pos)
    if not text.startswith("[", pos):
        raise _fail(path, "line 1", "expected a JSON array of records")
    pos = skip(pos + 1)
    while pos < len(text) and text[pos] != "]":
        line = text.count("\n", 0, pos) + 1
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as error:
            raise _fail(path, f"line {error.lineno}", f"invalid JSON ({error.msg})") from None
        yield f"line {line}", record
        pos = skip(pos)
        if pos < len(text) and text[pos] == ",":
            pos = skip(pos + 1)
        elif pos >= len(text) or text[pos] != "]":
            raise _fail(path, f"line {text.count(chr(10), 0, pos) + 1}", "expected ',' or ']' after a record")


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, record) of a .jsonl (line N), .json array (line N) or .parquet (row N) file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, record in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"row {number}", record
        return
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix == ".json":
        yield from _json_array(path, text)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"line {number}", json.loads(line)
            except json.JSONDecodeError as error:
                raise _fail(path, f"line {number}", f"invalid JSON ({error.msg})") from None


# ------------------------------------------------------------------------------------------ record checks
# Each check returns (field, problem) for the first thing lm-eval's task could not use, else None.


def _text(record: dict, name: str) -> tuple[str, str] | None:
    value = record.get(name)
    return None if isinstance(value, str) and value.strip() else (name, "missing or not a non-empty string")


def _texts(value: Any, name: str, size: int | None = None) -> tuple[str, str] | None:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        return name, "must be a non-empty list of strings"
    if size is not None and len(value) != size:
        return name, f"must hold {size} choices, has {len(value)}"
    return None


def check_arc(record: dict) -> tuple[str, str] | None:
    choices = record.get("choices")
    if not isinstance(choices, dict):
        return "choices", "must be an object with lists 'text' and 'label'"
    problem = _text(record, "question") or _texts(choices.get("text"), "choices.text")
    problem = problem or _texts(choices.get("label"), "choices.label", len(choices["text"]))
    if problem is None and record.get("answerKey") not in choices["label"]:
        problem = "answerKey", f"{record.get('answerKey')!r} is not one of choices.label {choices['label']}"
    return problem


def check_hellaswag(record: dict) -> tuple[str, str] | None:
    problem = _text(record, "activity_label") or _text(record, "ctx_a")
    if problem is None and not isinstance(record.get("ctx_b"), str):
        problem = "ctx_b", "missing or not a string"
    problem = problem or _texts(record.get("endings"), "endings")
    label = record.get("label")
    if problem is None and not (str(label).isdigit() and int(label) < len(record["endings"])):
        problem = "label", f"{label!r} is not the index of one of the {len(record['endings'])} endings"
    return problem


def check_mmlu(record: dict) -> tuple[str, str] | None:
    problem = _text(record, "question") or _texts(record.get("choices"), "choices", 4)
    answer = record.get("answer")
    if problem is None and (isinstance(answer, bool) or answer not in (0, 1, 2, 3)):
        problem = "answer", f"{answer!r} is not the index 0-3 of a choice"
    return problem


def _answer_map(record: dict, name: str, exactly_one: bool) -> tuple[str, str] | None:
    targets = record.get(name)
    if not isinstance(targets, dict) or not targets:
        return name, "must be a non-empty object of answer → 0/1"
    labels = list(targets.values())
    if any(label not in (0, 1) or isinstance(label, bool) for label in labels):
        return name, "every label must be 0 or 1"
    if (labels.count(1) != 1) if exactly_one else (1 not in labels):
        return name, "must mark exactly one answer 1" if exactly_one else "must mark at least one answer 1"
    return None


def check_truthfulqa(record: dict) -> tuple[str, str] | None:
    return (
        _text(record, "question")
        or _answer_map(record, "mc1_targets", exactly_one=True)
        or _answer_map(record, "mc2_targets", exactly_one=False)
    )


CHECKS: dict[str, Callable[[dict], tuple[str, str] | None]] = {
    "arc_challenge": check_arc,
    "hellaswag": check_hellaswag,
    "mmlu": check_mmlu,
    "truthfulqa_mc2": check_truthfulqa,
}


def checked_records(path: Path, task: str) -> list[dict]:
    """The records of one input file, each checked for what ``task`` reads; the first bad one raises."""
    records = []
    for where, record in read_records(path):
        problem = ("(record)", "not a JSON object") if not isinstance(record, dict) else CHECKS[task](record)
        if problem is not None:
            raise _fail(path, where, f"field {problem[0]!r}: {problem[1]}")
        records.append(record)
    if not records:
        raise _fail(path, "line 1", "no records")
    return records


def truthfulqa_rows(path: Path) -> list[dict]:
    """TruthfulQA's ``mc_task.json`` as the rows lm-eval's truthfulqa tasks read: the answer → label maps
    as ``{"choices": [...], "labels": [...]}`` in file order, as the Hugging Face ``truthful_qa`` loader does."""

    def lists(targets: dict) -> dict:
        return {"choices": list(targets), "labels": list(targets.values())}

    return [
        {"question": r["question"], "mc1_targets": lists(r["mc1_targets"]), "mc2_targets": lists(r["mc2_targets"])}
        for r in checked_records(path, "truthfulqa_mc2")
    ]


# ------------------------------------------------------------------------------------------ task configs


def lm_eval_tasks_dir() -> Path:
    """lm-eval's own task folder, found without importing lm_eval (the configs ``include:`` its files)."""
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lm_eval is not installed: pip install lm_eval==0.4.13")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects, as lm-eval's default MMLU configs name them."""
    return sorted(p.stem.removeprefix("mmlu_") for p in (lm_eval_tasks_dir() / "mmlu" / "default").glob("mmlu_*.yaml"))


def split_files(folder: Path, split: str) -> list[Path]:
    """A split's files in a Hub-layout folder: ``<split>-00000-of-00001.parquet`` or ``<split>.jsonl``/``.json``."""
    pattern = re.compile(_SPLIT_FILE.format(split=re.escape(split)))
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob(f"{split}*") if p.is_file() and pattern.match(p.name))


def _task_yaml(task: BenchmarkTask, name: str, include: Path, files: dict[str, list[Path]], cache: Path) -> dict:
    """lm-eval's own definition (``include``) with only the data source, splits and shots set by us."""
    suffixes = {p.suffix for paths in files.values() for p in paths}
    builder = "parquet" if suffixes == {".parquet"} else "json"
    if len(suffixes) > 1:
        raise BenchmarkDataError(f"{task.name}: mixed file formats {sorted(suffixes)}; use one per task")
    config = {
        "include": str(include),
        "task": name,
        "tag": TAG if task.name != "mmlu" else f"{TAG}_mmlu_subjects",
        "dataset_path": builder,
        "dataset_name": None,
        "dataset_kwargs": {"data_files": {s: [str(p) for p in ps] for s, ps in files.items()}, "cache_dir": str(cache)},
        "num_fewshot": task.num_fewshot,
    }
    for key in ("training_split", "validation_split", "test_split", "fewshot_split"):
        config[key] = None
    split_key = {"test": "test_split", "validation": "validation_split"}[task.eval_split]
    config[split_key] = task.eval_split
    if task.fewshot_split:
        config["fewshot_split"] = task.fewshot_split
        if task.fewshot_split == "train":
            config["training_split"] = "train"
    return config


def _hub_files(task: BenchmarkTask, folder: Path) -> tuple[dict[str, list[Path]] | None, str]:
    """A task's split files in ``folder`` (checked), or None and why they cannot be used."""
    files = {split: split_files(folder, split) for split in (task.eval_split, task.fewshot_split)}
    missing = [split for split, paths in files.items() if not paths]
    if missing:
        return None, f"data absent: no {'/'.join(missing)} split files in {folder}"
    counts = {split: sum(len(checked_records(p, task.name)) for p in paths) for split, paths in files.items()}
    if counts[task.fewshot_split] < task.num_fewshot:
        raise BenchmarkDataError(f"{folder}: {task.fewshot_split} split has {counts[task.fewshot_split]} records, "
                                 f"{task.name} needs {task.num_fewshot} few-shot examples")  # fmt: skip
    return files, ""


def _write(path: Path, config: dict) -> None:
    path.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _setup_hub_task(task: BenchmarkTask, hub_dir: Path | None, tasks_dir: Path) -> TaskSetup:
    """ARC or HellaSwag from ``<hub_dir>/<owner>/<name>/<config>`` (HellaSwag: also without ``data/``)."""
    if hub_dir is None:
        return TaskSetup(task, f"data absent: no Hub-layout folder given for {task.hub_dataset}")
    folder = hub_dir / task.hub_dataset / (task.hub_config or "")
    if not folder.is_dir() and task.name == "hellaswag":
        folder = hub_dir / task.hub_dataset
    files, why = _hub_files(task, folder)
    if files is None:
        return TaskSetup(task, why)
    config = _task_yaml(
        task, task.lm_eval_name, lm_eval_tasks_dir() / task.base_yaml, files, tasks_dir.parent / "cache"
    )
    _write(tasks_dir / f"{task.lm_eval_name}.yaml", config)
    return TaskSetup(task, data=str(folder), inputs=[p for paths in files.values() for p in paths])


def _setup_mmlu(task: BenchmarkTask, hub_dir: Path | None, tasks_dir: Path) -> TaskSetup:
    """One config per subject folder present, and an unweighted group over them (as the leaderboard v1)."""
    if hub_dir is None:
        return TaskSetup(task, f"data absent: no Hub-layout folder given for {task.hub_dataset}")
    root, present, inputs = hub_dir / task.hub_dataset, [], []
    for subject in mmlu_subjects():
        files, _ = _hub_files(task, root / subject) if (root / subject).is_dir() else (None, "")
        if files is not None:
            include = lm_eval_tasks_dir() / task.base_yaml / f"mmlu_{subject}.yaml"
            config = _task_yaml(task, f"{task.lm_eval_name}_{subject}", include, files, tasks_dir.parent / "cache")
            _write(tasks_dir / f"{task.lm_eval_name}_{subject}.yaml", config)
            present.append(subject)
            inputs += [p for paths in files.values() for p in paths]
    if not present:
        return TaskSetup(task, f"data absent: no MMLU subject folder with test and dev splits in {root}")
    group = {
        "group": task.lm_eval_name,
        "task": [f"{task.lm_eval_name}_{s}" for s in present],
        "aggregate_metric_list": [{"metric": "acc", "weight_by_size": MMLU_WEIGHT_BY_SIZE}],
        "metadata": {"version": 2},
    }
    _write(tasks_dir / f"{task.lm_eval_name}_group.yaml", group)
    status = "ok" if len(present) == MMLU_SUBJECT_COUNT else f"partial: {len(present)} of {MMLU_SUBJECT_COUNT} subjects"
    return TaskSetup(task, status, str(root), present, inputs)


def _setup_truthfulqa(task: BenchmarkTask, source: Path | None, tasks_dir: Path) -> TaskSetup:
    """TruthfulQA MC converted to lm-eval's rows in the run folder, read by lm-eval's truthfulqa_mc2."""
    if source is None or not source.is_file():
        return TaskSetup(task, f"data absent: TruthfulQA MC file not found ({source})")
    rows = truthfulqa_rows(source)
    converted = tasks_dir.parent / "data" / "truthfulqa_mc2_validation.jsonl"
    converted.parent.mkdir(parents=True, exist_ok=True)
    converted.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    include = lm_eval_tasks_dir() / task.base_yaml
    config = _task_yaml(task, task.lm_eval_name, include, {"validation": [converted]}, tasks_dir.parent / "cache")
    _write(tasks_dir / f"{task.lm_eval_name}.yaml", config)
    return TaskSetup(task, data=f"{source} ({len(rows)} items)", inputs=[converted])


def write_task_configs(run_dir: Path, data: BenchmarkData, tasks: Sequence[str] | None = None) -> dict[str, TaskSetup]:
    """Write the lm-eval configs of one run into ``run_dir/tasks`` (its ``--include_path``), every input checked.

    Returns each leaderboard task's setup by name; a task without data is set up as "data absent".
    """
    tasks_dir = run_dir / "tasks"
    tasks_dir.mkdir(parents=True, exist_ok=True)
    for stale in tasks_dir.glob("*.yaml"):
        stale.unlink()
    unknown = sorted(set(tasks or ()) - set(TASKS_BY_NAME))
    if unknown:
        raise ValueError(f"unknown leaderboard tasks {unknown}; known: {list(TASKS_BY_NAME)}")
    setups = {}
    for name in tasks or TASKS_BY_NAME:
        task = TASKS_BY_NAME[name]
        if name == "truthfulqa_mc2":
            setups[name] = _setup_truthfulqa(task, data.truthfulqa_mc, tasks_dir)
        elif name == "mmlu":
            setups[name] = _setup_mmlu(task, data.hub_dir, tasks_dir)
        else:
            setups[name] = _setup_hub_task(task, data.hub_dir, tasks_dir)
    return setups


# ------------------------------------------------------------------------------------------ running


@contextmanager
def hub_offline() -> Iterator[None]:
    """HF_DATASETS_OFFLINE=1 / HF_HUB_OFFLINE=1 for the run, also in the modules that read them at import."""
    import datasets.config
    import huggingface_hub.constants as hub_constants

    names = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved_env = {name: os.environ.get(name) for name in names}
    modules = [(datasets.config, "HF_HUB_OFFLINE"), (datasets.config, "HF_DATASETS_OFFLINE")]
    modules.append((hub_constants, "HF_HUB_OFFLINE"))
    saved = [getattr(module, name) for module, name in modules]
    os.environ.update(dict.fromkeys(names, "1"))
    for module, name in modules:
        setattr(module, name, True)
    try:
        yield
    finally:
        for (module, name), value in zip(modules, saved, strict=True):
            setattr(module, name, value)
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _row(setup: TaskSetup, checkpoint: str, limit: int | None, **values: Any) -> dict:
    task = setup.task
    base = dict.fromkeys(TABLE_SCHEMA) | {"checkpoint": checkpoint, "task": task.name, "metric": task.metric}
    base |= {"num_fewshot": task.num_fewshot, "limit": limit, "from_cache": False}
    return base | {"status": setup.status, "data": setup.data} | values


def request_tokens(lm: Any, samples: dict[str, list[dict]]) -> int:
    """The tokens a task cost: context and continuation of every loglikelihood request, as the model tokenizes them."""
    pieces = (text for docs in samples.values() for doc in docs for args in doc["arguments"] for text in args[:2])
    return sum(len(lm.tok_encode(text)) for text in pieces)


def _result_row(setup: TaskSetup, results: dict, checkpoint: str, limit: int | None, seconds: float) -> dict:
    """A task's row from lm-eval's results: its metric, standard error and the items it was scored on."""
    name, metric = setup.task.lm_eval_name, setup.task.metric
    scores = results["results"][name]
    subtasks = results.get("group_subtasks", {}).get(name) or [name]
    n_items = sum(int(results["n-samples"][s]["effective"]) for s in subtasks)
    value, stderr = _float(scores.get(f"{metric},none")), _float(scores.get(f"{metric}_stderr,none"))
    return _row(setup, checkpoint, limit, value=value, stderr=stderr, n_items=n_items, seconds=round(seconds, 3))


def load_hf_model(checkpoint: Path, device: str, dtype: str, batch_size: int | str) -> Any:
    """lm-eval's ``hf`` model on a checkpoint directory, loaded once for all four tasks."""
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """lm-eval's hf model without its two progress bars per task ("Tokenizing inputs", "Running loglikelihood
        requests"): it passes ``disable=False`` to tqdm, so TQDM_DISABLE cannot reach them, and they would fill
        the terminal and every compute log; the step logs a line per checkpoint instead."""

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
            return super().loglikelihood(requests, disable_tqdm=True)

    return QuietHFLM(pretrained=str(checkpoint), device=device, dtype=dtype, batch_size=batch_size)


def task_cache_key(setup: TaskSetup, fingerprint: str, settings: dict[str, Any]) -> str:
    """What decides a task's row: lm-eval's version, the model, the task, its data files' contents and the settings."""
    digests = [[p.name, file_sha256(p)] for p in setup.inputs]
    version = importlib.metadata.version("lm_eval")
    return content_key(
        "lm_eval", version, fingerprint, setup.task.name, setup.status, setup.subjects, digests, settings
    )


def run_leaderboard(
    checkpoint: Path,
    run_dir: Path,
    data: BenchmarkData | None = None,
    *,
    label: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    batch_size: int | str = 1,
    limit: int | None = None,
    tasks: Sequence[str] | None = None,
    cache: CallCache | None = None,
    fingerprint: str | None = None,
) -> pl.DataFrame:
    """The leaderboard v1 tasks on one checkpoint through ``lm_eval.simple_evaluate`` (model ``hf``), offline.

    One row per task (checkpoint, task, metric, value, stderr, n_items, seconds, status, ...) plus the average
    row; ``limit`` caps the items per task (a smoke run, said in every row), None scores them all. Given a
    ``cache`` and the model's ``fingerprint``, a task scored before is read back (``from_cache``) and the model
    is loaded only for the others; each newly scored row is stored as soon as it is computed.
    """
    setups = write_task_configs(run_dir, data or BenchmarkData.default(), tasks)
    name = label or checkpoint.name
    settings = {"device": device, "dtype": dtype, "batch_size": batch_size, "limit": limit}
    keyed = cache is not None and fingerprint is not None  # not ``cache and ...``: an empty cache is falsy
    keys = {t: task_cache_key(s, fingerprint, settings) for t, s in setups.items() if s.runnable and keyed}
    found = cache.get_many(keys.values()) if keys else {}
    rows, to_score = {}, []
    for task, setup in setups.items():
        if not setup.runnable:
            rows[task] = _row(setup, name, limit)
        elif keys.get(task) in found:
            rows[task] = _row(setup, name, limit, **found[keys[task]], from_cache=True)
        else:
            to_score.append(setup)
    for setup, row in score_tasks(checkpoint, run_dir, to_score, name, limit, device, dtype, batch_size):
        rows[setup.task.name] = row
        if setup.task.name in keys:
            cache.put_many({keys[setup.task.name]: {k: row[k] for k in CACHED_FIELDS}})
    table = pl.DataFrame([rows[t] for t in setups], schema=TABLE_SCHEMA)
    return pl.concat([table, average_row(table, name, limit)])


CACHED_FIELDS = ("value", "stderr", "n_items", "tokens", "seconds")


def score_tasks(
    checkpoint: Path,
    run_dir: Path,
    setups: list[TaskSetup],
    name: str,
    limit: int | None,
    device: str,
    dtype: str,
    batch_size: int | str,
) -> Iterator[tuple[TaskSetup, dict]]:
    """Each setup's row as lm-eval scores it, the model loaded once (and not at all when there is nothing to score)."""
    if not setups:
        return
    import lm_eval
    from lm_eval.tasks import TaskManager

    with hub_offline():
        lm = load_hf_model(checkpoint, device, dtype, batch_size)
        manager = TaskManager(include_path=str(run_dir / "tasks"), include_defaults=False)
        for setup in setups:
            started = time.perf_counter()
            results = lm_eval.simple_evaluate(
                model=lm, tasks=[setup.task.lm_eval_name], task_manager=manager, limit=limit, log_samples=True
            )
            row = _result_row(setup, results, name, limit, time.perf_counter() - started)
            yield setup, row | {"tokens": request_tokens(lm, results.get("samples", {}))}


def leaderboard_average(table: pl.DataFrame) -> tuple[float | None, str]:
    """The mean of the four tasks' values when all four were fully scored, else None and the reason."""
    by_task = {row["task"]: row for row in table.iter_rows(named=True) if row["task"] in TASKS_BY_NAME}
    missing = [t for t in TASKS_BY_NAME if t not in by_task or by_task[t]["value"] is None]
    if missing:
        why = "; ".join(f"{t}: {by_task[t]['status'] if t in by_task else 'not run'}" for t in missing)
        return None, f"not computed: {why}"
    partial = [t for t in TASKS_BY_NAME if by_task[t]["status"] != "ok"]
    if partial:
        return None, "not computed: " + "; ".join(f"{t}: {by_task[t]['status']}" for t in partial)
    return sum(by_task[t]["value"] for t in TASKS_BY_NAME) / len(TASKS_BY_NAME), "ok"


def average_row(table: pl.DataFrame, checkpoint: str, limit: int | None) -> pl.DataFrame:
    """The leaderboard average as a table row (value null with the reason in ``status`` when not computable)."""
    value, status = leaderboard_average(table)
    if value is not None and limit is not None:
        status = f"smoke run: at most {limit} items per task"
    row = dict.fromkeys(TABLE_SCHEMA) | {"checkpoint": checkpoint, "task": AVERAGE_TASK, "metric": "mean"}
    row |= {"value": value, "limit": limit, "status": status, "data": ""}
    return pl.DataFrame([row], schema=TABLE_SCHEMA)
