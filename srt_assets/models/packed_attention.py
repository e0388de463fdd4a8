"""A varlen attention for transformers models: many sequences in one row, each attending to itself.

Registered with transformers' ``AttentionInterface`` as ``srt_packed``, so any model that routes its
attention through that interface (Llama, Qwen2, Mistral, SmolLM, ...) can run packed rows built by
``core.packing``. A segment sees the keys of the shared prefixes above it, then its own causally, so
no position ever sees another sequence. Two kernels compute that:

* ``segments``: one ``scaled_dot_product_attention`` per segment, no padding. Few large calls suit a CPU, but on a
  GPU a pack of hundreds of short segments is bound by kernel launches, not arithmetic.
* ``flex``: one FlexAttention call per layer for the whole pack, with a block mask built once per pack
  from the same segments (blocks that no query of theirs may see are skipped, not computed). Packs are
  padded to a few lengths, so the kernel is compiled a few times, not once per pack.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from srt_assets.core.packing import MAX_PREFIX_DEPTH, Segment
from srt_assets.models.compute import PackKernel

logger = logging.getLogger(__name__)
ATTENTION_NAME = "srt_packed"
FLEX_BLOCK = 128  # FlexAttention's block size: padded pack lengths are multiples of it
ANCESTOR_WIDTH = MAX_PREFIX_DEPTH + 1  # fixed table width: the compiled kernel sees one shape per length


class PackAttention(Protocol):
    """The attention of one pack: built once per forward pass, called by every layer."""

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None, gqa: bool
    ) -> torch.Tensor: ...


class PackKernelType(Protocol):
    @staticmethod
    def padded_length(length: int, token_budget: int) -> int: ...

    @classmethod
    def build(cls, segments: Sequence[Segment], length: int, device: torch.device) -> PackAttention: ...


@dataclass(frozen=True)
class SegmentTensors:
    start: int
    length: int
    context: tuple[tuple[int, int], ...]
    mask: torch.Tensor | None  # [length, context + length] boolean, only with a context


def _gather(states: torch.Tensor, spans: Sequence[tuple[int, int]]) -> torch.Tensor:
    parts = [states[:, :, start : start + length] for start, length in spans]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


@dataclass(frozen=True)
class SegmentAttention:
    """One ``scaled_dot_product_attention`` per segment (the CPU kernel)."""

    segments: tuple[SegmentTensors, ...]

    @staticmethod
    def padded_length(length: int, token_budget: int) -> int:
        return length

    @classmethod
    def build(cls, segments: Sequence[Segment], length: int, device: torch.device) -> SegmentAttention:
        """Each context-aware causal mask once per pack (every layer reuses it)."""
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
        return cls(tuple(prepared))

    def attend(self, query, key, value, scaling, gqa):
        output = torch.empty_like(query)
        for seg in self.segments:
            own = (seg.start, seg.length)
            q = query[:, :, seg.start : seg.start + seg.length]
            k, v = _gather(key, (*seg.context, own)), _gather(value, (*seg.context, own))
            if seg.context:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=seg.mask, scale=scaling, enable_gqa=gqa)
            else:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=gqa)
            output[:, :, seg.start : seg.start + seg.length] = out
        return output


def padded_segments(segments: Sequence[Segment], length: int) -> list[Segment]:
    """The segments, and the positions past the last one (up to ``length``) as one more segment
    that sees only itself: the padding of a compiled pack length."""
    end = segments[-1].start + segments[-1].length if segments else 0
    return [*segments, Segment(end, length - end)] if length > end else list(segments)


def segment_tables(segments: Sequence[Segment], length: int) -> tuple[list[int], list[int], list[list[int]]]:
    """The pack's structure as lookup tables: the segment of each position, each segment's depth
    (how many prefixes it attends to) and its ancestors by depth (-1 past its own depth). Positions
    past the last segment, up to ``length``, are padding (``padded_segments``)."""
    segments = padded_segments(segments, length)
    index_at = {seg.start: i for i, seg in enumerate(segments)}
    width = ANCESTOR_WIDTH
    segment_of: list[int] = []
    depth: list[int] = []
    ancestors: list[list[int]] = []
    for i, seg in enumerate(segments):
        segment_of.extend([i] * seg.length)
        depth.append(len(seg.context))
        chain = [index_at[start] for start, _ in seg.context]
        ancestors.append(chain + [-1] * (width - len(chain)))
    unused = length - len(segments)  # at most one segment per position: tables of ``length`` rows
    return segment_of, depth + [0] * unused, ancestors + [[-1] * width] * unused


FLEX_FAILURES: list[str] = []  # why the compiled kernel failed in this process: the rest uses segments


@dataclass(frozen=True)
class FlexAttention:
    """One FlexAttention call per layer for the whole pack (the GPU kernel). Where the compiled kernel
    cannot run (no working Triton or Inductor on the machine), the process warns once and scores the
    same pack per segment: the same masks, so the same numbers, only slower."""

    block_mask: object  # torch.nn.attention.flex_attention.BlockMask
    segments: tuple[Segment, ...]  # padded, for the fallback
    length: int
    device: torch.device

    @staticmethod
    def padded_length(length: int, token_budget: int) -> int:
        """Packs come padded to a few shapes (the budget, else a power of two), each compiled once:
        Inductor's CPU kernel cannot take dynamic shapes, and a shape per pack would recompile."""
        if length <= token_budget:
            return -(-token_budget // FLEX_BLOCK) * FLEX_BLOCK
        return max(FLEX_BLOCK, 1 << (length - 1).bit_length())

    @classmethod
    def build(cls, segments: Sequence[Segment], length: int, device: torch.device) -> FlexAttention:
        from torch.nn.attention.flex_attention import create_block_mask

        segment_of, depth, ancestors = segment_tables(segments, length)
        # int32 and 1-D lookups: the mask is evaluated over length² pairs, and kernels index simply
        segment_of, depth, ancestors = (
            torch.tensor(table, dtype=torch.int32, device=device).flatten() for table in (segment_of, depth, ancestors)
        )

        def visible(batch, head, q, k):
            sq, sk = segment_of[q], segment_of[k]
            own = (sq == sk) & (k <= q)
            return own | (ancestors[sq * ANCESTOR_WIDTH + depth[sk]] == sk)

        block_mask = create_block_mask(visible, None, None, length, length, device=device)
        return cls(block_mask, tuple(padded_segments(segments, length)), length, device)

    def attend(self, query, key, value, scaling, gqa):
        if not FLEX_FAILURES:
            try:
                return _compiled_flex()(query, key, value, block_mask=self.block_mask, scale=scaling, enable_gqa=gqa)
            except Exception as exc:  # a compiler that cannot build the kernel here; not the data's fault
                FLEX_FAILURES.append(f"{type(exc).__name__}: {exc}"[:500])
                logger.warning(
                    "FlexAttention cannot run on %s (%s); packed scoring goes on with the segments kernel "
                    "(gpu.attention_kernel: segments skips this attempt)",
                    query.device,
                    FLEX_FAILURES[0],
                )
        return self.fallback.attend(query, key, value, scaling, gqa)

    @functools.cached_property
    def fallback(self) -> SegmentAttention:
        """The same pack per segment, its masks built once for all layers."""
        return SegmentAttention.build(self.segments, self.length, self.device)


@functools.cache
def _compiled_flex():
    """Uncompiled, FlexAttention materializes every score; compiled, once per padded pack shape."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def resolve_kernel(kernel: PackKernel, device: torch.device) -> Literal["segments", "flex"]:
    """``auto``: FlexAttention on CUDA (one launch per layer), segments elsewhere (measured faster on CPU)."""
    if kernel != "auto":
        return kernel
    return "flex" if device.type == "cuda" else "segments"


KERNELS: dict[str, PackKernelType] = {
    "segments": SegmentAttention,
    "flex": FlexAttention,
}


def packed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    srt_pack: PackAttention | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if srt_pack is None:
        raise RuntimeError(f"attention '{ATTENTION_NAME}' needs srt_pack (use the packed scorer)")
    output = srt_pack.attend(query, key, value, scaling, query.shape[1] != key.shape[1])
    return output.transpose(1, 2).contiguous(), None


def _no_mask(*args, **kwargs) -> None:
    """Segments carry their own masks; the model must not build a dense one."""
    return None


AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)
AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)
