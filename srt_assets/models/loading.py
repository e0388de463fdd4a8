"""Loading causal LMs with torch: dtypes and devices, and transformers' progress bars kept out of logs."""

from __future__ import annotations

import logging

import torch
from transformers.utils import logging as transformers_logging

log = logging.getLogger(__name__)

# Loading and converting print tqdm bars to stderr, which fill Dagster's compute logs: the steps say
# what they do in the run's log instead.
transformers_logging.disable_progress_bar()

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
