"""Can this student judge at all? Probes whose truth is known, before any teacher call is paid for.

From a seeded sample of raw rows, each true pair is set against a pair known to be worse:

- ``response_swap``: the instruction with another row's response;
- ``instruction_swap``: the response with another row's instruction;
- ``corrupted_response``: the response with its sentences shuffled (or, with one sentence, cut in half).

A student that can select data gives the true pair the lower IFD (its instruction helps predict its
response more) and the lower r-IFD (its response helps guess its instruction more). For each probe
and statistic, the share of rows where it does (ties count half) is the paired AUC: 0.5 is chance.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

PROBES = {
    "response_swap": "the instruction with another row's response",
    "instruction_swap": "the response with another row's instruction",
    "corrupted_response": "the response with its sentences shuffled, or cut in half",
}
STATISTICS = ("ifd", "rifd")
# The probes on which a student that can judge must beat chance: a mismatched pair is the very
# noise that IFD and r-IFD exist to find.
REQUIRED = tuple((probe, statistic) for probe in ("response_swap", "instruction_swap") for statistic in STATISTICS)


@dataclass(frozen=True)
class Pair:
    instruction: str
    input: str
    output: str


@dataclass(frozen=True)
class Probe:
    kind: str
    row: int  # index into the sampled rows
    true: Pair
    fake: Pair


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def corrupt(text: str, rng: random.Random) -> str:
    """The same words made worse: sentences shuffled into another order, or the second half cut."""
    sentences = _sentences(text)
    if len(set(sentences)) >= 2:  # at least two different sentences, so some order differs
        shuffled = sentences[:]
        while shuffled == sentences:
            rng.shuffle(shuffled)
        return " ".join(shuffled)
    words = text.split()
    return " ".join(words[: max(1, len(words) // 2)])


def build_probes(rows: Sequence[Pair], count: int, seed: int) -> tuple[list[int], list[Probe]]:
    """The sampled row indices and the probes built on them. Another row's text comes from a seeded
    cyclic shift of the sample, so no row is paired with itself; a donor text that equals the true
    one (duplicated outputs are common) makes no probe, since it is no worse."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(len(rows)), min(count, len(rows))))
    if len(chosen) < 2:
        return chosen, []
    order = chosen[:]
    rng.shuffle(order)
    partner = dict(zip(order, order[1:] + order[:1], strict=True))
    probes = []
    for position, index in enumerate(chosen):
        true, donor = rows[index], rows[partner[index]]
        if donor.output != true.output:
            probes.append(Probe("response_swap", position, true, Pair(true.instruction, true.input, donor.output)))
        if (donor.instruction, donor.input) != (true.instruction, true.input):
            probes.append(Probe("instruction_swap", position, true, Pair(donor.instruction, donor.input, true.output)))
        broken = corrupt(true.output, rng)
        if broken != true.output:
            probes.append(Probe("corrupted_response", position, true, Pair(true.instruction, true.input, broken)))
    return chosen, probes


def preference(true: float | None, fake: float | None) -> float | None:
    """1 when the true pair scores lower, 0 when the fake one does, 0.5 on a tie; None when unscored."""
    if true is None or fake is None or math.isnan(true) or math.isnan(fake):
        return None
    return 1.0 if true < fake else 0.0 if true > fake else 0.5


@dataclass(frozen=True)
class AUC:
    probe: str
    statistic: str
    auc: float | None
    low: float | None
    high: float | None
    pairs: int

    def clearly_above_chance(self, min_auc: float) -> bool:
        return self.auc is not None and self.auc >= min_auc and self.low is not None and self.low > 0.5


def paired_auc(probe: str, statistic: str, wins: Sequence[float], seed: int, resamples: int = 1000) -> AUC:
    """The mean preference with a 95% percentile-bootstrap interval (seeded, so reproducible)."""
    if not wins:
        return AUC(probe, statistic, None, None, None, 0)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(wins, k=len(wins))) / len(wins) for _ in range(resamples))
    low, high = means[math.floor(0.025 * (resamples - 1))], means[math.ceil(0.975 * (resamples - 1))]
    return AUC(probe, statistic, sum(wins) / len(wins), low, high, len(wins))


def aucs(probes: Sequence[Probe], true_scores: Sequence[dict], fake_scores: Sequence[dict], seed: int) -> list[AUC]:
    """One AUC per (probe kind, statistic); ``*_scores`` hold each probe's pair's ``ifd`` and ``rifd``."""
    results = []
    for kind in PROBES:
        for statistic in STATISTICS:
            wins = [
                win
                for probe, true, fake in zip(probes, true_scores, fake_scores, strict=True)
                if probe.kind == kind and (win := preference(true.get(statistic), fake.get(statistic))) is not None
            ]
            results.append(paired_auc(kind, statistic, wins, seed))
    return results
