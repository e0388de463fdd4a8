"""Is a teacher's rewrite usable at all? Flags for the ways teachers fail, as pure functions.

A weak teacher fails often and a strong one rarely, but in the same ways: it leaks the prompt's markers
or chat template, talks about the rewrite instead of doing it, writes an answer where an instruction
belongs, repeats the input or itself, runs out of tokens, or switches language. Each candidate gets
the names of the flags it raises; the selection treats a candidate with a flag set to ``reject`` as a
failed reflection, so the authors' rule only ever compares usable rewrites.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Severity = Literal["reject", "warn", "off"]

FLAGS: dict[str, str] = {
    "leaked_markers": "reflection markers, judge frames or chat-template text in the candidate",
    "talks_about_rewrite": "the candidate talks about the rewrite ('the new instruction…') instead of being one",
    "instruction_in_output": "the instruction is identical to, or contained in, its own output",
    "answer_as_instruction": "the new instruction reads as a statement or an answer, not a task",
    "copy_of_original": "the rewrite is a verbatim copy of the text it should improve",
    "cut_off": "the teacher's reply ran out of tokens (finish reason 'length')",
    "language_switch": "the candidate is in another language or script than the original",
    "repetition": "the candidate repeats itself in a loop",
}
DEFAULT_SEVERITY: dict[str, Severity] = dict.fromkeys(FLAGS, "reject")

_MARKERS = re.compile(
    r"\[(?:system|new instruction|new answer|new question|better answer|(?:the )?end|instruction|"
    r"the (?:start|end) of (?:the )?(?:answer|input))\]"
    r"|<\|(?:im_start|im_end|endoftext|eot_id|start_header_id|end_header_id|assistant|user|system)\|>"
    r"|^\s*(?:###\s*(?:instruction|response|input)\s*:?|(?:user|assistant|system|human|gpt)\s*:)",
    re.IGNORECASE | re.MULTILINE,
)
_META = re.compile(
    r"\b(?:the|this|my|your) (?:new|original|previous|old|rewritten|improved|better) "
    r"(?:instruction|question|answer|response|prompt|task)s?\b"
    r"|\bhere (?:is|'s) (?:a|an|the|my) (?:better|improved|new|rewritten|revised) "
    r"(?:answer|response|instruction|version)\b"
    r"|\b(?:new|better) (?:instruction|answer)\s*:",
    re.IGNORECASE,
)
# How tasks usually open: an imperative verb, a question word, or a request.
_TASK_OPENING = re.compile(
    r"^(?:please\s+)?(?:(?:can|could|would|will) you|let's|let me|let us|i (?:want|need|would like|'d like)|"
    r"your (?:task|job|goal|assignment)|you (?:are|will|should|must|need|have|may)|"
    r"what|why|how|when|where|who|which|whose|whom|is|are|do|does|"
    r"did|should|imagine|suppose|given|using|based on|consider|in (?:\w+ ){0,4}(?:words|sentences|paragraphs)|"
    r"add|analy[sz]e|answer|arrange|assess|brainstorm|build|calculate|categori[sz]e|change|check|choose|"
    r"classify|combine|compare|compose|compute|construct|convert|correct|count|create|debug|define|delete|"
    r"derive|describe|design|detect|determine|develop|diagnose|discuss|divide|draft|draw|edit|elaborate|"
    r"estimate|evaluate|explain|express|extract|fill|find|fix|format|formulate|generate|give|group|guess|"
    r"identify|illustrate|implement|improve|infer|insert|interpret|invent|judge|justify|label|list|locate|"
    r"make|match|measure|modify|name|note|offer|organi[sz]e|outline|paraphrase|persuade|pick|plan|predict|"
    r"prepare|present|produce|propose|provide|rank|rate|read|rearrange|recommend|reformulate|remove|reorder|"
    r"rephrase|replace|report|research|respond|restate|reverse|review|revise|rewrite|say|score|select|"
    r"share|shorten|show|simplify|solve|sort|specify|spell|state|suggest|summari[sz]e|tell|test|think|"
    r"transform|translate|turn|use|verify|visuali[sz]e|walk|write)\b",
    re.IGNORECASE,
)
_STATEMENT = re.compile(
    r"\b(?:is|are|was|were|has|have|had|will|would|can|could|should|must|does|did|argues|means|shows|"
    r"became|becomes|seems|contains|consists|refers|describes|provides|includes|helps)\b",
    re.IGNORECASE,
)
_STOPWORDS = {
    "en": {"the", "and", "is", "of", "to", "in", "that", "it", "for", "with", "a", "this", "are", "be", "on"},
    "fr": {"le", "la", "les", "et", "est", "des", "une", "un", "pour", "dans", "que", "qui", "pas", "du", "sur"},
    "de": {"der", "die", "das", "und", "ist", "nicht", "ein", "eine", "mit", "zu", "den", "von", "sie", "es", "auf"},
    "es": {"el", "la", "los", "las", "y", "es", "de", "que", "en", "un", "una", "para", "con", "por", "del"},
    "it": {"il", "lo", "la", "gli", "le", "e", "è", "di", "che", "un", "una", "per", "con", "non", "sono"},
    "pt": {"o", "os", "as", "e", "é", "de", "que", "em", "um", "uma", "para", "com", "não", "do", "da"},
}
_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class Candidate:
    """What the checks look at: the rewrite, the texts it came from, and how the call ended."""

    variant: str  # Q (new instruction and answer), A or QA (a better answer)
    instruction: str  # the candidate's instruction (x1 for Q and QA, x0 for A)
    output: str  # the candidate's output (y1, y0' or y1')
    source_instruction: str  # the instruction the teacher was shown
    source_output: str  # the output the teacher was shown
    finish_reason: str | None = None


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def leaked_markers(c: Candidate) -> bool:
    return bool(_MARKERS.search(c.output) or (c.variant == "Q" and _MARKERS.search(c.instruction)))


def talks_about_rewrite(c: Candidate) -> bool:
    return bool(_META.search(c.output) or (c.variant == "Q" and _META.search(c.instruction)))


def instruction_in_output(c: Candidate) -> bool:
    instruction, output = _normal(c.instruction), _normal(c.output)
    return len(instruction) >= 12 and instruction in output


def answer_as_instruction(c: Candidate) -> bool:
    """Only new instructions (Q) are judged: a statement (it has a finite verb such as "is" or "was")
    in which no sentence asks or instructs. A bare noun phrase ("A haiku about autumn") is a request."""
    if c.variant != "Q":
        return False
    text = c.instruction.strip()
    if not text or "?" in text or not _STATEMENT.search(text):
        return False
    sentences = [part.strip(" \t\"'([") for part in re.split(r"[.!:;\n]+", text) if part.strip()]
    return not any(_TASK_OPENING.match(sentence) for sentence in sentences)


def copy_of_original(c: Candidate) -> bool:
    if c.variant == "Q":
        return _normal(c.instruction) == _normal(c.source_instruction)
    return _normal(c.output) == _normal(c.source_output)


def cut_off(c: Candidate) -> bool:
    return c.finish_reason == "length"


def _script(text: str) -> str | None:
    """The writing system most letters of ``text`` belong to (LATIN, CYRILLIC, CJK, ...)."""
    counts: Counter[str] = Counter()
    for char in text:
        if char.isalpha():
            name = unicodedata.name(char, "")
            script = name.split(" ")[0] if name else ""
            counts["CJK" if script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else script] += 1
    if not counts:
        return None
    script, count = counts.most_common(1)[0]
    return script if count >= 0.6 * sum(counts.values()) else None


def _language(text: str) -> str | None:
    """A language guess from stopwords, only when one language clearly leads (a short text needs fewer
    hits: "Name the primary colors." is English by its one "the")."""
    words = [w.casefold() for w in _WORD.findall(text)]
    hits = {lang: sum(w in stops for w in words) for lang, stops in _STOPWORDS.items()}
    best, best_hits = max(hits.items(), key=lambda item: item[1])
    second = sorted(hits.values())[-2]
    enough = min(3, max(1, len(words) // 4))
    return best if best_hits >= enough and best_hits > second and best_hits >= 1.5 * second else None


def language_switch(c: Candidate) -> bool:
    before, after = f"{c.source_instruction}\n{c.source_output}", f"{c.instruction}\n{c.output}"
    scripts = _script(before), _script(after)
    if None not in scripts and scripts[0] != scripts[1]:
        return True
    languages = _language(before), _language(after)
    return None not in languages and languages[0] != languages[1]


def repetition(c: Candidate) -> bool:
    """A line said three times, or one 4-word phrase making up a third of a long text."""
    for text in (c.output, c.instruction):
        lines = [line.strip() for line in text.splitlines() if len(line.strip()) >= 10]
        if lines and Counter(lines).most_common(1)[0][1] >= 3:
            return True
        words = [w.casefold() for w in _WORD.findall(text)]
        if len(words) >= 24:
            grams = Counter(tuple(words[i : i + 4]) for i in range(len(words) - 3))
            count = grams.most_common(1)[0][1]
            if count >= 3 and count * 4 >= len(words) / 3:
                return True
    return False


CHECKS = {
    "leaked_markers": leaked_markers,
    "talks_about_rewrite": talks_about_rewrite,
    "instruction_in_output": instruction_in_output,
    "answer_as_instruction": answer_as_instruction,
    "copy_of_original": copy_of_original,
    "cut_off": cut_off,
    "language_switch": language_switch,
    "repetition": repetition,
}


def candidate_flags(candidate: Candidate, severity: Mapping[str, Severity] = DEFAULT_SEVERITY) -> list[str]:
    """The flags ``candidate`` raises, in FLAGS order; flags set to ``off`` are not checked."""
    return [name for name, check in CHECKS.items() if severity.get(name, "reject") != "off" and check(candidate)]


def rejected(flags: list[str], severity: Mapping[str, Severity] = DEFAULT_SEVERITY) -> bool:
    """Whether the flags make the candidate a failed reflection."""
    return any(severity.get(name, "reject") == "reject" for name in flags)
