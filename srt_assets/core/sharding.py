"""Stable assignment of samples to shards, so several GPUs or machines can reflect and score one
large source in parallel and the union of the shards is exactly the unsharded work.

A sample's shard depends only on its ``sample_id`` (a content hash, see ``core/raw.py``), never on
its row position: appending rows to a source file does not move earlier samples to other shards, so
their cached teacher calls and student losses stay where they are.
"""

from __future__ import annotations

import hashlib

import polars as pl


def shard_of(sample_id: str, shards: int) -> int:
    """The shard (0 .. shards-1) of one sample; sha256, so it is the same on every machine and
    every Python or polars version."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    digest = hashlib.sha256(sample_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % shards


def shard_names(shards: int) -> list[str]:
    """Partition keys of the shard dimension: '0', '1', ..."""
    return [str(index) for index in range(shards)]


def take_shard(frame: pl.DataFrame | pl.LazyFrame, shard: int, shards: int) -> pl.DataFrame | pl.LazyFrame:
    """The rows of ``frame`` (which has a ``sample_id`` column) that belong to ``shard``, in order; a
    LazyFrame stays lazy (the filter runs batch by batch when it is collected)."""
    if not 0 <= shard < shards:
        raise ValueError(f"shard {shard} is not one of 0..{shards - 1}")
    if shards == 1:
        return frame

    def owned(ids: pl.Series) -> pl.Series:
        return pl.Series([shard_of(sample_id, shards) == shard for sample_id in ids], dtype=pl.Boolean)

    return frame.filter(pl.col("sample_id").map_batches(owned, return_dtype=pl.Boolean, is_elementwise=True))
