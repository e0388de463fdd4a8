"""The source catalog: which instruction datasets exist, where they live and how their fields map.

Sources are declared in one YAML file (``sources.yaml`` at the repository root by default) so that a
user adds a dataset by editing configuration, not code. Each source becomes one Dagster partition.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from srt_assets.core.formats import FORMATS, format_of_suffix

DEFAULT_MAX_REJECT_RATIO = 0.05
# The longest text field a row may have: Alpaca's longest output has 4k characters, WizardLM's about 30k;
# a longer one is more likely a broken export or an attack (it would go to the teacher and the student
# whole) than an instruction pair. A source may raise it.
DEFAULT_MAX_FIELD_CHARS = 100_000


class SourceConfigError(ValueError):
    """The sources file itself is wrong (unknown key, bad value): names the file and the source."""


class SourceFileMissing(FileNotFoundError):
    """A declared source points at a file that is not there; the message says how to fix it."""


@dataclass(frozen=True)
class FieldMapping:
    """Which keys of a source record hold the instruction, the optional input and the response.

    ``conversations`` switches to ShareGPT-style records: the first human turn is the instruction and
    the first assistant turn after it is the response.
    """

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    conversations: str | None = None

    def as_dict(self) -> dict[str, str]:
        if self.conversations:
            return {"conversations": self.conversations}
        return {"instruction": self.instruction, "input": self.input or "", "output": self.output}


@dataclass(frozen=True)
class VariantFile:
    """A file that holds one variant's rows, row-aligned with the source file (row i of one is row i
    of the other): the teacher's candidates, or a student's statistics, made elsewhere."""

    variant: str
    path: Path
    format: str
    fields: dict[str, str]  # role (instruction, input, output; or data) -> record key
    # Empty: row-aligned. Else the roles whose texts pair a record with its source row (instruction,
    # input), so a file may hold a subset of the source in any order.
    match_on: tuple[str, ...] = ()

    def where(self, row: int) -> str:
        """How a row is named in provenance and errors: the file and its row number (0-based)."""
        return f"{self.path}#row={row}"


STATISTICS_USES = ("instead", "compare")


@dataclass(frozen=True)
class StatisticsFiles:
    """A student's precomputed statistics per variant (the authors' layout: a ``data`` record with
    ``loss`` and ``ppl`` lists in the order Q_direct, A_direct, Q_condition, A_condition)."""

    use: str  # instead: student_scores reads them, no model; compare: score_agreement sets ours against them
    files: dict[str, VariantFile]
    label: str = ""  # who made them, e.g. "Llama-2-7B (authors)"


@dataclass(frozen=True)
class SourceSpec:
    name: str
    path: Path
    format: str
    fields: FieldMapping = field(default_factory=FieldMapping)
    limit: int | None = None
    max_reject_ratio: float = DEFAULT_MAX_REJECT_RATIO
    max_field_chars: int = DEFAULT_MAX_FIELD_CHARS
    description: str = ""
    license: str = ""
    hub_id: str = ""  # the data set's Hugging Face id, named as source_datasets in exported cards
    path_env: str | None = None
    missing_hint: str = ""
    reflections: dict[str, VariantFile] = field(default_factory=dict)  # variant -> file, instead of the teacher
    statistics: StatisticsFiles | None = None
    only_matched: bool = False  # read only the source rows a matched reflection file holds

    @property
    def matched_files(self) -> list[VariantFile]:
        return [file for file in self.reflections.values() if file.match_on]

    def missing_message(self) -> str:
        """What to do when the data file is not there: the path, the hint, the variable to set."""
        what = "is a directory, not a data file" if self.path.is_dir() else "not found"
        how = []
        if self.path_env:
            how.append(f"set the environment variable {self.path_env}=/path/to/file")
        how.append(f"or edit 'sources.{self.name}.path' in the sources file")
        hint = f" {self.missing_hint.strip()}" if self.missing_hint else ""
        return (
            f"source '{self.name}': data file {what}: {self.path}.{hint} To use another copy, " + ", ".join(how) + "."
        )

    def require_file(self) -> Path:
        """Return the data file, or fail with a message that names the path and how to set it."""
        if self.path.is_file():
            return self.path
        raise SourceFileMissing(self.missing_message())


def infer_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes if s.lower() != ".gz"]
    found = format_of_suffix(suffixes[-1]) if suffixes else None
    if found is None:
        raise SourceConfigError(f"cannot infer the format of {path}: set 'format' to one of {', '.join(FORMATS)}")
    return found


_SOURCE_KEYS = {
    "path",
    "format",
    "fields",
    "limit",
    "max_reject_ratio",
    "max_field_chars",
    "description",
    "license",
    "hub_id",
    "path_env",
    "missing_hint",
    "reflections",
    "statistics",
    "only_matched",
}
_FIELD_KEYS = {"instruction", "input", "output", "conversations"}
REFLECTED_VARIANTS = ("Q", "A", "QA")
SCORED_VARIANTS = ("ori", "Q", "A", "QA")
_REFLECTION_ROLES = {"instruction": "instruction", "input": "input", "output": "output"}
_STATISTICS_ROLES = {"data": "data"}


# A path may start with $SRT_SHARED_DATA: the folder of the full data sets, the one variable the tests
# read too; unset, it is ../shared/data beside the catalog (where CI has it).
SHARED_DATA_ENV = "SRT_SHARED_DATA"
SHARED_DATA_DEFAULT = "../shared/data"
_SHARED_DATA = re.compile(r"\$(\{SRT_SHARED_DATA\}|SRT_SHARED_DATA\b)")
MATCH_ROLES = ("instruction", "input")


def match_key(instruction: str, input_text: str | None) -> tuple[str, str]:
    """What pairs a matched file's record with a source row: instruction and input, whitespace runs
    made one space (exports differ in trailing newlines, not in words)."""
    return " ".join(instruction.split()), " ".join((input_text or "").split())


def expand_shared_data(text: str, base_dir: Path) -> str:
    """``text`` with a leading $SRT_SHARED_DATA (or ${SRT_SHARED_DATA}) replaced by that folder."""
    shared = os.environ.get(SHARED_DATA_ENV) or str((base_dir / SHARED_DATA_DEFAULT).resolve())
    return _SHARED_DATA.sub(lambda _: shared, text)


def _path(text: str, base_dir: Path) -> Path:
    path = Path(os.path.expanduser(expand_shared_data(text, base_dir)))
    return path if path.is_absolute() else (base_dir / path).resolve()


def _match_on(raw: Any, what: str, fail) -> tuple[str, ...]:
    if raw is None:
        return ()
    if (
        not isinstance(raw, list)
        or "instruction" not in raw
        or set(raw) - set(MATCH_ROLES)
        or len(set(raw)) != len(raw)
    ):
        raise fail(f"{what}: 'match_on' must list 'instruction' and optionally 'input', got {raw!r}")
    return tuple(role for role in MATCH_ROLES if role in raw)


def _variant_file(variant: str, raw: Any, roles: dict[str, str], base_dir: Path, fail) -> VariantFile:
    """One entry of ``reflections`` or ``statistics``: a path, or {path, format, fields} (and, for
    reflections, ``match_on``)."""
    what = f"'{variant}'"
    if isinstance(raw, str) and raw:
        raw = {"path": raw}
    if not isinstance(raw, dict) or not isinstance(raw.get("path"), str) or not raw["path"]:
        raise fail(f"{what} must be a file path or a mapping with 'path' (and optional 'format', 'fields')")
    allowed = {"path", "format", "fields"} | ({"match_on"} if roles is _REFLECTION_ROLES else set())
    unknown = set(raw) - allowed
    if unknown:
        raise fail(f"{what}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(sorted(allowed))}")
    path = _path(raw["path"], base_dir)
    fmt = raw.get("format") or infer_format(path)
    if fmt not in FORMATS:
        raise fail(f"{what}: format '{fmt}' is not one of {', '.join(FORMATS)}")
    fields = raw.get("fields") or {}
    if not isinstance(fields, dict) or set(fields) - set(roles):
        raise fail(f"{what}: 'fields' must map some of {sorted(roles)} to record keys")
    for key, value in fields.items():
        if not (isinstance(value, str) and value):
            raise fail(f"{what}: 'fields.{key}' must name one record key (a string), got {value!r}")
    return VariantFile(variant, path, fmt, {**roles, **fields}, _match_on(raw.get("match_on"), what, fail))


def _variant_files(block: dict[str, Any], allowed: tuple[str, ...], roles: dict[str, str], base_dir: Path, fail):
    unknown = set(block) - set(allowed)
    if unknown:
        raise fail(f"unknown variant(s) {sorted(unknown)}; allowed: {', '.join(allowed)}")
    return {
        variant: _variant_file(variant, block[variant], roles, base_dir, fail)
        for variant in allowed
        if variant in block
    }


def _reflections(raw: Any, base_dir: Path, fail) -> dict[str, VariantFile]:
    if not isinstance(raw, dict) or not raw:
        raise fail("'reflections' must map variants (Q, A, QA) to files")
    files = _variant_files(raw, REFLECTED_VARIANTS, _REFLECTION_ROLES, base_dir, lambda m: fail(f"reflections: {m}"))
    if "QA" in files and "Q" not in files:
        raise fail("reflections: 'QA' answers the new instruction of 'Q': give the Q file too")
    if any(files[v].match_on for v in ("Q", "QA") if v in files):
        raise fail("reflections: 'match_on' pairs answers with the source's own instruction: only 'A' takes it")
    return files


def _statistics(raw: Any, base_dir: Path, fail) -> StatisticsFiles:
    if not isinstance(raw, dict):
        raise fail("'statistics' must be a mapping: use, label and the files of ori, Q, A, QA")
    use = raw.get("use", "compare")
    if use not in STATISTICS_USES:
        raise fail(f"statistics: 'use' must be one of {', '.join(STATISTICS_USES)}, got {use!r}")
    label = raw.get("label", "")
    if not isinstance(label, str):
        raise fail(f"statistics: 'label' must be a string, got {label!r}")
    block = {k: v for k, v in raw.items() if k not in ("use", "label")}
    files = _variant_files(block, SCORED_VARIANTS, _STATISTICS_ROLES, base_dir, lambda m: fail(f"statistics: {m}"))
    if "ori" not in files:
        raise fail("statistics: the 'ori' file is required (every decision compares against the original)")
    return StatisticsFiles(use=use, files=files, label=label)


def _parse_source(name: str, raw: dict[str, Any], base_dir: Path, defaults: dict[str, Any], where: str):
    def fail(msg: str) -> SourceConfigError:
        return SourceConfigError(f"{where}: source '{name}': {msg}")

    if not isinstance(raw, dict):
        raise fail("expected a mapping of settings")
    unknown = set(raw) - _SOURCE_KEYS
    if unknown:
        raise fail(f"unknown key(s) {sorted(unknown)}; allowed: {sorted(_SOURCE_KEYS)}")
    if "path" not in raw:
        raise fail("'path' is required")
    path_env = raw.get("path_env")
    path_text = os.environ.get(path_env) if path_env and os.environ.get(path_env) else str(raw["path"])
    path = _path(path_text, base_dir)
    fmt = raw.get("format") or infer_format(path)
    if fmt not in FORMATS:
        raise fail(f"format '{fmt}' is not one of {', '.join(FORMATS)}")
    fields_raw = raw.get("fields") or {}
    if not isinstance(fields_raw, dict) or set(fields_raw) - _FIELD_KEYS:
        raise fail(f"'fields' must map some of {sorted(_FIELD_KEYS)} to record keys")
    for key, value in fields_raw.items():
        if not (isinstance(value, str) and value) and not (key == "input" and value is None):
            raise fail(f"'fields.{key}' must name one record key (a string), got {value!r}")
    if "conversations" in fields_raw:
        mapping = FieldMapping(conversations=fields_raw["conversations"])
    else:
        mapping = FieldMapping(**{k: v for k, v in fields_raw.items() if k != "conversations"})
    limit = raw.get("limit")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit <= 0):
        raise fail(f"'limit' must be a positive integer, got {limit!r}")
    ratio = raw.get("max_reject_ratio", defaults.get("max_reject_ratio", DEFAULT_MAX_REJECT_RATIO))
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 <= ratio <= 1:
        raise fail("'max_reject_ratio' must be a number between 0 and 1")
    max_chars = raw.get("max_field_chars", defaults.get("max_field_chars", DEFAULT_MAX_FIELD_CHARS))
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars <= 0:
        raise fail(f"'max_field_chars' must be a positive integer, got {max_chars!r}")
    return SourceSpec(
        name=name,
        path=path,
        format=fmt,
        fields=mapping,
        limit=limit,
        max_reject_ratio=float(ratio),
        max_field_chars=max_chars,
        description=str(raw.get("description", "")),
        license=str(raw.get("license", "")),
        hub_id=str(raw.get("hub_id", "")),
        path_env=path_env,
        missing_hint=str(raw.get("missing_hint", "")),
        reflections=_reflections(raw["reflections"], base_dir, fail) if "reflections" in raw else {},
        statistics=_statistics(raw["statistics"], base_dir, fail) if "statistics" in raw else None,
        only_matched=_only_matched(raw, fail),
    )


def _only_matched(raw: dict[str, Any], fail) -> bool:
    value = raw.get("only_matched", False)
    if not isinstance(value, bool):
        raise fail(f"'only_matched' must be true or false, got {value!r}")
    reflections = raw.get("reflections") or {}
    matched = any(isinstance(entry, dict) and entry.get("match_on") for entry in reflections.values())
    if value and not matched:
        raise fail("'only_matched' keeps the rows a reflection file with 'match_on' holds: give such a file")
    return value


@dataclass(frozen=True)
class SourceCatalog:
    file: Path
    sources: dict[str, SourceSpec]
    # >1 splits the row-wise model stages (reflection, scoring) of every source into this many
    # shards, each its own Dagster partition (source x shard), so they can run in parallel.
    shards: int = 1

    @property
    def names(self) -> list[str]:
        return sorted(self.sources)

    def get(self, name: str) -> SourceSpec:
        try:
            return self.sources[name]
        except KeyError:
            raise KeyError(f"unknown source '{name}' (declared in {self.file}: {', '.join(self.names)})") from None


MAX_NAME_LENGTH = 64


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (plain YAML keeps the last silently, which
    would drop a source without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"the key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_catalog(path: str | os.PathLike[str]) -> SourceCatalog:
    """Read and validate a sources YAML file; relative data paths resolve against its folder."""
    file = Path(path).resolve()
    try:
        doc = yaml.load(file.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except FileNotFoundError:
        raise SourceConfigError(f"sources file not found: {file}") from None
    except yaml.YAMLError as exc:
        raise SourceConfigError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("sources"), dict) or not doc["sources"]:
        raise SourceConfigError(f"{file}: expected a top-level 'sources:' mapping with at least one source")
    defaults = doc.get("defaults") or {}
    shards = doc.get("shards", 1)
    if isinstance(shards, bool) or not isinstance(shards, int) or not 1 <= shards <= 1024:
        raise SourceConfigError(f"{file}: 'shards' must be an integer from 1 to 1024, got {shards!r}")
    sources = {}
    for name, raw in doc["sources"].items():
        if not isinstance(name, str) or not name.replace("_", "").replace("-", "").isalnum() or not name.isascii():
            raise SourceConfigError(f"{file}: source name {name!r} must be ASCII letters, digits, '_' or '-'")
        if len(name) > MAX_NAME_LENGTH:
            raise SourceConfigError(
                f"{file}: source name '{name[:40]}…' is {len(name)} characters long; the limit is {MAX_NAME_LENGTH} "
                "(it names partitions and files)"
            )
        sources[name] = _parse_source(name, raw, file.parent, defaults, str(file))
    return SourceCatalog(file=file, sources=sources, shards=shards)
