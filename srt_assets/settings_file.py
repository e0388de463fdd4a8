"""The model settings file (``models.yaml``; see ``models.example.yaml``) as resources: which teacher
and judge backend with which settings, the student, the compute and the training, without editing
code. Every error names the file, the section and the field; keys never live in the file."""

from __future__ import annotations

from pathlib import Path

import yaml
from dagster import ConfigurableResource
from pydantic import ValidationError

from srt_assets.resources import CHAT_BACKENDS, ComputeResource, StudentModelResource, TrainingResource


class ModelSettingsError(ValueError):
    """The model settings file is wrong: names the file, the section and the field."""


SETTINGS_SECTIONS: dict[str, type[ConfigurableResource]] = {
    "student": StudentModelResource,
    "gpu": ComputeResource,
    "training": TrainingResource,
}


def resources_from_file(path: str | Path) -> dict[str, ConfigurableResource]:
    """Resources from a YAML settings file (``models.yaml``; see ``models.example.yaml``), so a user
    picks the teacher and judge backends and their settings without editing code. Sections:
    ``teacher`` and ``judge`` (``backend:`` one of CHAT_BACKENDS, then that backend's fields),
    ``student``, ``gpu``, ``training``. API keys never live in the file: name the variable that
    holds one in ``api_key_env``."""

    file = Path(path)
    try:
        doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ModelSettingsError(f"{file}: cannot read the model settings: {exc}") from None
    if not isinstance(doc, dict):
        raise ModelSettingsError(f"{file}: expected a mapping of sections (teacher, judge, student, gpu, training)")
    unknown = set(doc) - {"teacher", "judge", *SETTINGS_SECTIONS}
    if unknown:
        raise ModelSettingsError(f"{file}: unknown section(s) {sorted(unknown)}")
    resources: dict[str, ConfigurableResource] = {}
    for section, fields in doc.items():
        if not isinstance(fields, dict):
            raise ModelSettingsError(f"{file}: section '{section}' must be a mapping of settings")
        fields = dict(fields)
        if "api_key" in fields:
            raise ModelSettingsError(
                f"{file}: section '{section}' holds an api_key; keys never go in files: put the key in an "
                "environment variable and name it with api_key_env"
            )
        if section in ("teacher", "judge"):
            backend = fields.pop("backend", "transformers")
            if backend not in CHAT_BACKENDS:
                raise ModelSettingsError(
                    f"{file}: {section}.backend '{backend}' is not one of {', '.join(CHAT_BACKENDS)}"
                )
            cls: type[ConfigurableResource] = CHAT_BACKENDS[backend]
            if section == "judge" and "api_key_env" in cls.model_fields:
                # a judge is often another provider: never send it the teacher's key by default
                fields.setdefault("api_key_env", "SRT_JUDGE_API_KEY")
        else:
            cls = SETTINGS_SECTIONS[section]
        allowed = set(cls.model_fields)
        if set(fields) - allowed:
            raise ModelSettingsError(
                f"{file}: {section}: unknown setting(s) {sorted(set(fields) - allowed)}; allowed: {sorted(allowed)}"
            )
        try:
            resources[section] = cls(**fields)
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ModelSettingsError(f"{file}: {section}: {problems}") from None
    return resources
