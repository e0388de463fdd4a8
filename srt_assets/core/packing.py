"""Planning packed forward passes for scoring: no padding, shared prefixes computed once.

Scoring many short texts on a CPU is bound by work, not by batching (padding costs more than a batch
gains), so the plan removes work instead:

* sequences are *packed* end to end into rows of about ``token_budget`` tokens, each attending only to
  itself and its context (a varlen attention, see ``models.packed_attention``), so nothing is padding;
* sequences that start with the same tokens (every text built on the same prompt template) share
  those tokens: a prefix tree is built over the sorted sequences, and each shared prefix is computed
  once per pack; a sequence attends to the chain of prefixes above it, then causally to itself;
* only the positions that predict a target token are projected onto the vocabulary (by the backend).

Pure Python: the plan is index lists that a backend turns into tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

MIN_SHARED_PREFIX = 8
MAX_PREFIX_DEPTH = 64


@dataclass(frozen=True)
class Segment:
    """A run of pack positions that attends to its context spans, then causally to itself."""

    start: int
    length: int
    context: tuple[tuple[int, int], ...] = ()  # (start, length) of each prefix above it, outermost first

    @property
    def context_length(self) -> int:
        return sum(length for _, length in self.context)


@dataclass
class Pack:
    token_ids: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    predict_rows: list[int] = field(default_factory=list)  # pack rows whose output predicts a target
    target_ids: list[int] = field(default_factory=list)  # the token each of those rows must predict
    owners: list[int] = field(default_factory=list)  # which request each target belongs to

    def __len__(self) -> int:
        return len(self.token_ids)

    def add_segment(self, ids: Sequence[int], first_position: int, context: tuple[tuple[int, int], ...]) -> int:
        start = len(self.token_ids)
        self.token_ids.extend(ids)
        self.position_ids.extend(range(first_position, first_position + len(ids)))
        self.segments.append(Segment(start, len(ids), context))
        return start


@dataclass
class _Prefix:
    """A node of the prefix tree: tokens [start, end) of ``source``, shared by all below it."""

    source: int
    start: int
    end: int
    children: list[_Prefix | _Leaf]


@dataclass
class _Leaf:
    request: int
    start: int  # tokens before this are covered by the prefixes above


def _common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    limit = min(len(a), len(b))
    i = 0
    while i < limit and a[i] == b[i]:
        i += 1
    return i


def _prefix_tree(
    sequences: Sequence[Sequence[int]], target_starts: Sequence[int], min_shared: int
) -> list[_Prefix | _Leaf]:
    """Sort the sequences and nest runs of neighbours by how many leading tokens they share.

    A run whose members all share ``s`` tokens beyond its parent's ``base`` (``s - base >=
    min_shared``) becomes a prefix node; it splits where the neighbour overlap equals its minimum.
    A prefix always ends before the first position that predicts a target of any member.
    """
    order = sorted(range(len(sequences)), key=lambda i: sequences[i])

    def usable(i: int) -> int:
        return min(len(sequences[i]) - 1, target_starts[i] - 1)

    # overlap[k]: leading tokens order[k - 1] and order[k] may share (overlap[0] is unused).
    overlap = [0] + [
        min(_common_prefix_length(sequences[a], sequences[b]), usable(a), usable(b))
        for a, b in itertools.pairwise(order)
    ]

    def build(lo: int, hi: int, base: int, depth: int) -> list[_Prefix | _Leaf]:
        if hi - lo == 1:
            return [_Leaf(order[lo], base)]
        shared = min(overlap[lo + 1 : hi])
        if depth >= MAX_PREFIX_DEPTH:
            return [_Leaf(order[k], base) for k in range(lo, hi)]
        is_node = shared - base >= min_shared
        child_base = shared if is_node else base
        cuts = [k for k in range(lo + 1, hi) if overlap[k] == shared]
        children: list[_Prefix | _Leaf] = []
        for a, b in zip([lo, *cuts], [*cuts, hi], strict=True):
            children += build(a, b, child_base, depth + 1)
        return [_Prefix(order[lo], base, shared, children)] if is_node else children

    return build(0, len(order), 0, 0) if order else []


def plan_packs(
    sequences: Sequence[Sequence[int]],
    target_starts: Sequence[int],
    token_budget: int = 1024,
    min_shared_prefix: int = MIN_SHARED_PREFIX,
) -> list[Pack]:
    """Pack requests into rows of about ``token_budget`` tokens (a longer sequence gets a row of its
    own). Requests with nothing to score (``not 1 <= target_start < len``) get no targets."""
    if len(sequences) != len(target_starts):
        raise ValueError("one target start per sequence is required")
    scorable = [i for i, (s, t) in enumerate(zip(sequences, target_starts, strict=True)) if 1 <= t < len(s)]
    tree = _prefix_tree([sequences[i] for i in scorable], [target_starts[i] for i in scorable], min_shared_prefix)
    packs: list[Pack] = []
    pack = Pack()
    chain: list[_Prefix] = []  # prefixes above the current node, outermost first
    emitted: list[tuple[int, int]] = []  # their spans in the current pack (a prefix of ``chain``)

    def visit(node: _Prefix | _Leaf) -> None:
        nonlocal pack
        if isinstance(node, _Prefix):
            chain.append(node)
            for child in node.children:
                visit(child)
            chain.pop()
            del emitted[len(chain) :]
            return
        request = scorable[node.request]
        ids = sequences[request]
        missing = sum(p.end - p.start for p in chain[len(emitted) :])
        if len(pack) and len(pack) + missing + len(ids) - node.start > token_budget:
            packs.append(pack)
            pack = Pack()
            emitted.clear()
        for prefix in chain[len(emitted) :]:
            tokens = sequences[scorable[prefix.source]][prefix.start : prefix.end]
            emitted.append((pack.add_segment(tokens, prefix.start, tuple(emitted)), len(tokens)))
        start = pack.add_segment(ids[node.start :], node.start, tuple(emitted))
        # Position p predicts token p + 1; the targets are tokens target_start .. len(ids) - 1.
        for position in range(target_starts[request] - 1, len(ids) - 1):
            pack.predict_rows.append(start + position - node.start)
            pack.target_ids.append(ids[position + 1])
            pack.owners.append(request)

    for node in tree:
        visit(node)
    if pack.token_ids:
        packs.append(pack)
    return packs
