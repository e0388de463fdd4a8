"""The packing plan: every target scored exactly once, each sequence seeing exactly its own tokens."""

import random

import pytest

from srt_assets.core.packing import plan_packs


def random_requests(seed: int, n: int = 60):
    rng = random.Random(seed)
    headers = [[rng.randrange(50) for _ in range(rng.randrange(5, 30))] for _ in range(4)]
    sequences, starts = [], []
    for _ in range(n):
        header = rng.choice(headers)[: rng.randrange(0, 30)]
        body = [rng.randrange(50) for _ in range(rng.randrange(1, 40))]
        ids = header + body
        sequences.append(ids)
        starts.append(rng.randrange(0, len(ids) + 2))  # includes unscorable starts (0, len, len + 1)
    return sequences, starts


def visible_tokens(pack, segment_index: int) -> list[tuple[int, int]]:
    """(position id, token) of everything a segment attends to: its context chain, then itself."""
    segment = pack.segments[segment_index]
    rows = [r for start, length in segment.context for r in range(start, start + length)]
    rows += list(range(segment.start, segment.start + segment.length))
    return [(pack.position_ids[r], pack.token_ids[r]) for r in rows]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("budget", [16, 64, 1024])
def test_every_target_once_and_each_sequence_sees_only_itself(seed: int, budget: int):
    sequences, starts = random_requests(seed)
    packs = plan_packs(sequences, starts, token_budget=budget, min_shared_prefix=3)
    expected = {
        (i, p)
        for i, (ids, t) in enumerate(zip(sequences, starts, strict=True))
        if 1 <= t < len(ids)
        for p in range(t, len(ids))
    }
    seen = set()
    for pack in packs:
        assert len(pack.position_ids) == len(pack.token_ids)
        for row, target, owner in zip(pack.predict_rows, pack.target_ids, pack.owners, strict=True):
            segment_index = next(k for k, s in enumerate(pack.segments) if s.start <= row < s.start + s.length)
            view = visible_tokens(pack, segment_index)
            own_offset = row - pack.segments[segment_index].start
            context_len = pack.segments[segment_index].context_length
            history = view[: context_len + own_offset + 1]
            ids = sequences[owner]
            # The row sees exactly tokens 0..p of its own sequence, at the right positions.
            assert history == list(enumerate(ids[: len(history)]))
            position = len(history)
            assert target == ids[position]
            seen.add((owner, position))
    assert seen == expected and len(seen) == sum(len(p.predict_rows) for p in packs)


def test_shared_prefixes_save_tokens():
    header = list(range(100, 140))
    sequences = [[*header, i, i + 1, i + 2] for i in range(20)]
    starts = [len(header)] * 20
    packs = plan_packs(sequences, starts, token_budget=4096)
    assert len(packs) == 1
    # The header is computed once, except its last token: that row predicts each first target.
    assert len(packs[0]) == (len(header) - 1) + 20 * 4
    unshared = plan_packs(sequences, starts, token_budget=4096, min_shared_prefix=10_000)
    assert len(unshared[0]) == 20 * 43


def expected_visibility(pack, length: int) -> list[list[bool]]:
    """Who sees whom, straight from the segments: each row its context chain and itself causally;
    padding rows past the pack only the padding before them."""
    allowed = [[False] * length for _ in range(length)]
    for segment in pack.segments:
        context = [r for start, span in segment.context for r in range(start, start + span)]
        for offset in range(segment.length):
            row = segment.start + offset
            for key in [*context, *range(segment.start, row + 1)]:
                allowed[row][key] = True
    for row in range(len(pack), length):
        for key in range(len(pack), row + 1):
            allowed[row][key] = True
    return allowed


@pytest.mark.parametrize("seed", range(4))
def test_the_flex_block_mask_lets_each_row_see_exactly_what_its_segment_sees(seed: int):
    """One FlexAttention call per pack must mask like one attention call per segment does, with
    prefixes nested and the pack padded to its compiled length."""
    import torch
    from torch.nn.attention.flex_attention import create_mask

    from srt_assets.models.packed_attention import FlexAttention

    sequences, starts = random_requests(seed)
    packs = plan_packs(sequences, starts, token_budget=200, min_shared_prefix=3)
    assert any(len(s.context) >= 2 for p in packs for s in p.segments)  # nested prefixes are covered
    for pack in packs:
        length = FlexAttention.padded_length(len(pack), 200)
        assert length % 128 == 0 and length >= len(pack)
        mask_mod = FlexAttention.build(pack.segments, length, torch.device("cpu")).block_mask.mask_mod
        dense = create_mask(mask_mod, 1, 1, length, length, device="cpu")[0, 0]
        assert dense.tolist() == expected_visibility(pack, length)


def test_a_flex_kernel_that_cannot_compile_falls_back_to_segments_with_the_same_numbers(monkeypatch, caplog):
    """A GPU without a working Triton must not stop the scoring: the first failed call warns once,
    and that pack and every later one are computed per segment, equal to the segments kernel."""
    import torch

    import srt_assets.models.packed_attention as attention

    def broken():
        def call(*args, **kwargs):
            raise RuntimeError("triton: no working compiler")

        return call

    monkeypatch.setattr(attention, "_compiled_flex", broken)
    monkeypatch.setattr(attention, "FLEX_FAILURES", [])
    sequences, starts = random_requests(0)
    pack = plan_packs(sequences, starts, token_budget=200, min_shared_prefix=3)[0]
    length = attention.FlexAttention.padded_length(len(pack), 200)
    torch.manual_seed(0)
    query, key, value = (torch.randn(1, 2, length, 8) for _ in range(3))
    flex = attention.FlexAttention.build(pack.segments, length, torch.device("cpu"))
    with caplog.at_level("WARNING"):
        first = flex.attend(query, key, value, None, False)
        again = flex.attend(query, key, value, None, False)
    segments = attention.SegmentAttention.build(pack.segments, length, torch.device("cpu"))
    reference = segments.attend(query, key, value, None, False)
    assert torch.equal(first[:, :, : len(pack)], reference[:, :, : len(pack)]) and torch.equal(first, again)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "triton: no working compiler" in caplog.records[0].getMessage()


def test_packs_are_padded_to_a_few_compiled_lengths():
    from srt_assets.models.packed_attention import FlexAttention

    lengths = {FlexAttention.padded_length(n, 1000) for n in range(1, 5000)}
    assert lengths == {1024, 2048, 4096, 8192}
