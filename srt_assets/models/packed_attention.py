"""A varlen attention for transformers models: many sequences in one row, each attending to itself.

Registered with transformers' ``AttentionInterface`` as ``srt_packed``, so any model that routes its
attention through that interface (Llama, Qwen2, Mistral, SmolLM, ...) can run packed rows built by
``core.packing``. Each segment runs one ``scaled_dot_product_attention``: it sees the keys of the
shared prefixes above it, then its own causally, so no position ever sees another sequence and no
padding is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from srt_assets.core.packing import Segment

ATTENTION_NAME = "srt_packed"


@dataclass(frozen=True)
class SegmentTensors:
    start: int
    length: int
    context: tuple[tuple[int, int], ...]
    mask: torch.Tensor | None  # [length, context + length] boolean, only with a context


def prepare_segments(segments: Sequence[Segment], device: torch.device) -> list[SegmentTensors]:
    """Build each context-aware causal mask once per pack (every layer reuses it)."""
    masks: dict[tuple[int, int], torch.Tensor] = {}
    prepared = []
    for seg in segments:
        mask = None
        if seg.context:
            key = (seg.length, seg.context_length)
            if key not in masks:
                full = torch.ones(seg.length, seg.context_length + seg.length, dtype=torch.bool, device=device)
                masks[key] = torch.tril(full, diagonal=seg.context_length)
            mask = masks[key]
        prepared.append(SegmentTensors(seg.start, seg.length, seg.context, mask))
    return prepared


def _gather(states: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    parts = [states[:, :, start : start + length] for start, length in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    srt_segments: Sequence[SegmentTensors] | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if srt_segments is None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' needs srt_segments (use the packed scorer)")
    gqa = query.shape[1] != key.shape[1]
    output = torch.empty_like(query)
    for seg in srt_segments:
        own = (seg.start, seg.length)
        q = query[:, :, seg.start : seg.start + seg.length]
        if seg.context:
            spans = (*seg.context, own)
            k, v = _gather(key, spans), _gather(value, spans)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scaling, enable_gqa=gqa)
        else:
            k, v = _gather(key, (own,)), _gather(value, (own,))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
        output[:, :, seg.start : seg.start + seg.length] = out
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Segments carry their own masks; the model must not build a dense one."""
    return None


AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
