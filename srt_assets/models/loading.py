"""Loading causal LMs with torch: the bundled GGUF's one-time conversion, dtypes and devices."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers.utils import logging as transformers_logging

from srt_assets.models.identity import BUNDLED_MODEL, bundled_gguf_path, file_sha256

log = logging.getLogger(__name__)

# Loading and converting print tqdm bars to stderr, which fill Dagster's compute logs: the steps say
# what they do in the run's log instead.
transformers_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    with torch.device("meta"):  # no random initialisation of weights that are replaced at once
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
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


def computes_bfloat16(device: str) -> bool:
    """Whether bfloat16 is native (fast) on ``device``: on CPUs without AMX or AVX512-BF16 it is
    emulated and slower than float32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # private in torch: absent means unknown
    return device == "cpu" and any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


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
