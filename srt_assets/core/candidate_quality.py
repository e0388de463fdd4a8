"""Is a teacher's rewrite usable at all? Flags for the ways teachers fail, as pure functions.

A weak teacher fails often and a strong one rarely, but in the same ways: it leaks the prompt's markers
or chat template, talks about the rewrite instead of doing it, writes an answer where an instruction
belongs, repeats the input or itself, runs out of tokens, or switches language. Each candidate gets
the names of the flags it raises; the selection treats a candidate with a flag set to ``reject`` as a
failed reflection, so the authors' rule only ever compares usable rewrites.

The checks are tuned to stay quiet on good data: a marker or role prefix that the source texts
already contain (code with ``array[end]``, a dialogue task) is not a leak, structured answers (lists,
tables, code) are not loops, and an instruction is judged an answer only when it is a statement that
also repeats its own output's words.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

Severity = Literal["reject", "warn", "off"]

FLAGS: dict[str, str] = {
    "leaked_markers": "reflection markers, judge frames or chat-template text in the candidate",
    "talks_about_rewrite": "the candidate talks about the rewrite ('the new instruction…') instead of being one",
    "instruction_in_output": "the output starts with, or mostly is, its own instruction",
    "answer_as_instruction": "the new instruction is a statement that repeats its answer's words, not a task",
    "copy_of_original": "the rewrite is a verbatim copy of the text it should improve",
    "cut_off": "the teacher's reply ran out of tokens before the answer's closing marker",
    "language_switch": "the candidate is in another language or script than the original",
    "repetition": "the candidate repeats itself in a loop",
    "adds_markup": "the candidate adds Markdown images or links, or HTML that loads or links (outside code), "
    "that its sources lack",
}
DEFAULT_SEVERITY: dict[str, Severity] = dict.fromkeys(FLAGS, "reject")

_MARKERS = re.compile(
    r"(?<![\w\])])\[(?:system|new instruction|new answer|new question|better answer|instruction|"
    r"/?inst|the (?:start|end) of (?:the )?(?:answer|input|question|instruction))\]"
    r"|<\|(?:im_start|im_end|endoftext|eot_id|start_header_id|end_header_id|begin_of_text|assistant|user|system)\|>"
    r"|</s>|<(?:start|end)_of_turn>"
    r"|^[ \t]*###[ \t]*(?:instruction|response|input)\b[ \t]*:?[ \t]*$",
    re.IGNORECASE | re.MULTILINE,
)
_ROLE_PREFIX = re.compile(r"^[ \t]*(?:user|assistant|system)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_DIALOGUE_TASK = re.compile(r"dialog|conversation|script|chat|role|interview|transcript", re.IGNORECASE)
_META = re.compile(
    r"\b(?:the|this|my|your) (?:new|original|previous|old|rewritten|improved|better) "
    r"(?:instruction|question|answer|response|prompt|task)s?\b"
    r"|\bhere(?:\s+is|'s|’s) (?:a|an|the|my) (?:better|improved|new|rewritten|revised|more detailed) "
    r"(?:answer|response|instruction|version)\b"
    r"|\b(?:new|better|improved|revised|rewritten) (?:instruction|answer|response)\s*:"
    r"|\b(?:the|this) (?:above |given )?(?:answer|response|instruction) (?:is|was|lacks|fails|does not)\b"
    r"[^.]{0,80}\b(?:weak|vague|detail|accura|helpful|relevan)"
    r"|^\s*\d\.\s*what makes this (?:instruction|answer) weak",
    re.IGNORECASE | re.MULTILINE,
)
# How tasks usually open: an imperative verb, a question word, a request or a framing clause.
_TASK_VERBS = """
act add analy[sz]e answer argue arrange assess assign brainstorm build calculate categori[sz]e change check
choose cite clarify classify code collect combine comment compare compile complete compose compute construct
contrast convert convince correct count create critique debate debug decide define delete derive describe
design detect determine develop devise diagnose discuss display divide draft draw edit educate elaborate
encode enumerate estimate evaluate examine explain express extend extract fill find finish fix format
formulate generate get give group guess have help highlight hypothesi[sz]e identify illustrate implement
improve incorporate indicate infer insert interpret invent investigate judge justify label list locate make
match measure mention merge modify name note offer organi[sz]e outline output paraphrase persuade pick plan
play predict prepare present pretend produce propose prove provide put rank rate read rearrange recall
recommend reflect reformulate refute remember remove reorder rephrase replace report research respond
restate return reverse review revise reword rewrite say score see select separate serve shape share shorten
show simplify solve sort specify speculate spell state suggest summari[sz]e take tell test think transform
translate turn type update use verify visuali[sz]e walk write
"""
_TASK_OPENING = re.compile(
    r"^(?:please\s+|kindly\s+)?(?:\w+ly\s+)?(?:(?:can|could|would|will) you|let's|let me|let us|"
    r"i (?:want|need|would like|'d like)|your (?:task|job|goal|assignment)|in this task|come up|true or false|"
    r"from the (?:given|following)|you (?:are|will|should|must|need|have|may)|the task|here (?:is|are)|"
    r"what|why|how|when|where|who|which|whose|whom|is|are|do|does|did|can|could|may|might|shall|should|if|"
    r"for (?:the|each|this|these|every)|in (?:the|this) (?:following|given|context)|assum\w*|"
    r"imagine|suppose|given|using|based on|consider|in (?:\w+ ){0,4}(?:words|sentences|paragraphs)|"
    + "|".join(_TASK_VERBS.split())
    + r")\b",
    re.IGNORECASE,
)
# The shape of an imperative the verb list misses: a word that is neither a determiner, a pronoun nor a
# plural/third-person form, followed by what a verb takes ("Narrate the", "Sum up", "Spot an").
_IMPERATIVE_SHAPE = re.compile(
    r"^(?:(?:now|then|also|first|next|finally|just|simply|after|before)\s+)?"
    r"(?!(?:the|a|an|this|that|these|those|it|he|she|they|we|i|there|its|his|her|their|our|my|one|some|all|"
    r"each|every|no|many|most|life|time|today)\b)[a-z][a-z-]*(?<![^s]s)\s+"
    r"(?:the|a|an|this|these|that|those|me|us|them|it|him|her|my|your|our|some|all|each|every|any|up|out|"
    r"down|off|over|on|in|into|for|about|to|with|at|between|from|by|how|what|why|which|who|whether|if|"
    r"two|three|four|five|ten|\d+)\b",
    re.IGNORECASE,
)
_LEADING_NOISE = re.compile(r"^[\s\"'(\[*#>\-•\d.)]+")
_STATEMENT = re.compile(
    r"\b(?:is|are|was|were|has|have|had|will|would|can|could|should|must|does|did|argues|means|shows|"
    r"became|becomes|seems|contains|consists|refers|describes|provides|includes|helps)\b",
    re.IGNORECASE,
)
# Frequent words of each language that are not words of the others (so no "a", "y", "o", "e", "as",
# "do" or "die", which turn up across them, English included).
_STOPWORDS = {
    "en": {"the", "and", "is", "of", "to", "in", "that", "it", "for", "with", "this", "are", "be", "on", "was"},
    "fr": {"le", "les", "et", "est", "des", "une", "pour", "dans", "qui", "pas", "du", "sur", "au", "aux", "avec"},
    "de": {"der", "das", "und", "ist", "nicht", "ein", "eine", "mit", "zu", "den", "von", "sie", "auf", "dem"},
    "es": {"el", "los", "las", "es", "del", "una", "para", "con", "por", "como", "pero", "más", "este"},
    "it": {"il", "lo", "gli", "di", "che", "non", "sono", "della", "nel", "anche", "questo"},
    "pt": {"os", "em", "um", "uma", "não", "dos", "das", "mais", "seu", "ao", "pelo", "pela"},
}
_COMMON = set().union(*_STOPWORDS.values())
_WORD = re.compile(r"\w+", re.UNICODE)
_ASCII_LETTER = re.compile(r"[A-Za-z]")
_LANGUAGES_OF: dict[str, tuple[str, ...]] = {
    word: tuple(lang for lang, stops in _STOPWORDS.items() if word in stops) for word in _COMMON
}


@dataclass(frozen=True)
class Candidate:
    """What the checks look at: the rewrite, the texts it came from, and how the call ended."""

    variant: str  # Q (new instruction and answer), A or QA (a better answer)
    instruction: str  # the candidate's instruction (x1 for Q and QA, x0 for A)
    output: str  # the candidate's output (y1, y0' or y1')
    source_instruction: str  # the instruction the teacher was shown (its input merged in)
    source_output: str  # the output the teacher was shown
    finish_reason: str | None = None  # "length": the reply ran out of tokens
    closed: bool = True  # the parsed answer ended at its closing marker
    input: str = ""  # the candidate's input (A and QA keep the row's)


def _normal(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def _sources(c: Candidate) -> str:
    return f"{c.source_instruction}\n{c.source_output}"


def leaked_markers(c: Candidate) -> bool:
    """A marker the source texts do not have themselves; a role prefix near the start of an output,
    unless the task is a dialogue."""
    texts = [c.output] + ([c.instruction] if c.variant == "Q" else [])
    source = _sources(c)
    folded = source.casefold()
    markers = {match.group().strip().casefold() for text in texts for match in _MARKERS.finditer(text)}
    if any(marker not in folded for marker in markers):  # each distinct marker looked up once
        return True
    if _DIALOGUE_TASK.search(c.instruction) or _ROLE_PREFIX.search(source):
        return False
    return bool(_ROLE_PREFIX.search(c.output[:200]))


def talks_about_rewrite(c: Candidate) -> bool:
    texts = [c.output] + ([c.instruction] if c.variant == "Q" else [])
    return any(_META.search(text) for text in texts)


def instruction_in_output(c: Candidate) -> bool:
    """The output opens with its instruction, says it twice, or is mostly it (quoting a question in
    passing is fine)."""
    instruction, output = _normal(c.instruction), _normal(c.output)
    if len(instruction) < 20 or instruction not in output:
        return False
    return output.startswith(instruction) or output.count(instruction) >= 2 or len(instruction) >= len(output) / 2


def _content_words(text: str) -> set[str]:
    return {w for w in (w.casefold() for w in _WORD.findall(text)) if len(w) >= 4 and w not in _COMMON}


def answer_as_instruction(c: Candidate) -> bool:
    """Only new instructions (Q) are judged: a statement (it has a finite verb and no sentence asks
    or instructs) whose content words are mostly its own answer's or the original answer's — the shape
    of a teacher that wrote the answer where the instruction belongs."""
    if c.variant != "Q":
        return False
    text = c.instruction.strip()
    if not text or "?" in text or not _STATEMENT.search(text):
        return False
    parts = re.split(r"[.!:;,\n]+", re.sub(r"\bre-(?=\w)", "re", text, flags=re.IGNORECASE))
    openings = [_LEADING_NOISE.sub("", part) for part in parts if part.strip()]
    if any(_TASK_OPENING.match(opening) or _IMPERATIVE_SHAPE.match(opening) for opening in openings):
        return False
    words = _content_words(text)
    if not words:
        return False
    overlap = max(len(words & _content_words(c.output)), len(words & _content_words(c.source_output)))
    return overlap >= 0.5 * len(words)


def copy_of_original(c: Candidate) -> bool:
    if c.variant == "Q":
        return _normal(c.instruction) == _normal(c.source_instruction)
    return _normal(c.output) == _normal(c.source_output)


def cut_off(c: Candidate) -> bool:
    """Out of tokens before the answer closed; a reply that closed its answer and rambled on is fine."""
    return c.finish_reason == "length" and not c.closed


@lru_cache(maxsize=1 << 16)
def _letter_script(char: str) -> str:
    """The writing system of one letter, from its Unicode name (LATIN, CYRILLIC, CJK, ...)."""
    name = unicodedata.name(char, "")
    script = name.split(" ")[0] if name else ""
    return "CJK" if script in ("CJK", "HIRAGANA", "KATAKANA", "HANGUL") else script


def _script(text: str) -> str | None:
    """The writing system most letters of ``text`` belong to (LATIN, CYRILLIC, CJK, ...). Counted
    per distinct character (a text has few), so a long reply costs one C-speed pass, not a Unicode
    name lookup per letter."""
    if text.isascii():
        return "LATIN" if _ASCII_LETTER.search(text) else None
    counts: dict[str, int] = {}
    for char, n in Counter(text).items():
        if char.isalpha():
            script = _letter_script(char)
            counts[script] = counts.get(script, 0) + n
    if not counts:
        return None
    script, count = max(counts.items(), key=lambda item: item[1])
    return script if count >= 0.6 * sum(counts.values()) else None


def _language(text: str) -> str | None:
    """A language guess from stopwords, only when one language clearly leads by two hits or more (one
    word decides nothing: "y" is Spanish, "die" German, and both turn up in English texts)."""
    words = Counter(w.casefold() for w in _WORD.findall(text))
    hits = dict.fromkeys(_STOPWORDS, 0)
    for word, n in words.items():
        for lang in _LANGUAGES_OF.get(word, ()):
            hits[lang] += n
    best, best_hits = max(hits.items(), key=lambda item: item[1])
    second = sorted(hits.values())[-2]
    enough = min(3, max(2, words.total() // 4))
    return best if best_hits >= enough and best_hits > second and best_hits >= 1.5 * second else None


def language_switch(c: Candidate) -> bool:
    """The rewritten text in another script or language than the text it rewrites: the new instruction
    against the old one (Q), the better answer against the answer it improves (A, QA). A new task may
    ask for an answer in French; a rewrite of an English text should still be English."""
    if c.variant == "Q":
        before, after = c.source_instruction, f"{c.instruction}\n{c.input}"
    else:
        before, after = c.source_output, c.output
    scripts = _script(before), _script(after)
    if None not in scripts and scripts[0] != scripts[1]:
        return True
    languages = _language(before), _language(after)
    return None not in languages and languages[0] != languages[1]


_LETTER_WORD = re.compile(r"\b[^\W\d_]{2,}\b")


def _units(text: str) -> list[str]:
    """Sentences and lines of at least three words (code lines, bullets, table rules and labels are not:
    they repeat in good answers)."""
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [_normal(p) for p in parts if len(_LETTER_WORD.findall(p)) >= 3 and not re.search(r"[=;{}<>]", p)]


def repetition(c: Candidate) -> bool:
    """One sentence or line four times in a row, or a long text that compresses to a tenth (a loop;
    tables, code and schedules, the most repetitive good answers, stay above that)."""
    texts = [c.output] + ([c.instruction] if c.variant == "Q" else [])
    for text in texts:
        units = _units(text)
        if any(len(set(units[i : i + 4])) == 1 for i in range(len(units) - 3)):
            return True
        data = text.encode("utf-8")
        if len(data) >= 400 and len(zlib.compress(data)) < 0.1 * len(data):
            return True
    return False


# Code that renders as text: fenced blocks (a fence opens only at the start of a line, as in Markdown)
# and inline code spans.
_CODE = re.compile(r"^[ \t]*(```|~~~).*?(?:^[ \t]*\1|\Z)|`[^`\n]*`", re.DOTALL | re.MULTILINE)
_LINK_TEXT = r"\[(?:[^\[\]]|\[[^\[\]]*\]){0,1000}\]"  # link text, one level of nested brackets, any lines
_REFERENCE_DEFINITION = re.compile(r"^[ \t]*\[[^\]\n]+\]:[ \t]*\S", re.MULTILINE)
_MARKUP = {
    "image": re.compile(r"!" + _LINK_TEXT + r"[ \t]*[(\[]"),
    "link": re.compile(
        r"(?<!!)" + _LINK_TEXT + r"\([ \t]*\S"  # [text](url), also [text]( url)
        r"|<(?:https?|ftp|mailto):[^<>\s]+>"  # autolinks
        r"|\b(?:https?://|www\.)[^\s<>()]+",  # bare URLs, which most renderers make live
        re.IGNORECASE,
    ),
    # tags that load, run or navigate when rendered (a <p> or <nooutput> does none of that), and any
    # tag with an attribute that does
    "html": re.compile(
        r"<(?:img|image|input|picture|iframe|script|a|link|object|embed|video|audio|source|track|svg|math|style|"
        r"form|meta|base|frame|frameset)\b[^<>]*>"
        r"|<[a-z][^<>]*?\s(?:src|srcset|href|background|poster|data|style|action|formaction|on[a-z]+)\s*=[^<>]*>",
        re.IGNORECASE,
    ),
}


def _markup_kinds(text: str) -> set[str]:
    """Which kinds of renderable markup ``text`` has outside code spans and fences. ``![x]`` with a
    reference definition ``[x]: url`` anywhere is an image too."""
    prose = _CODE.sub(" ", text)
    kinds = {kind for kind, pattern in _MARKUP.items() if pattern.search(prose)}
    if _REFERENCE_DEFINITION.search(prose):
        kinds.add("link")
        if re.search(r"!" + _LINK_TEXT, prose):
            kinds.add("image")
    return kinds


_ASKS_FOR_MARKUP = re.compile(
    r"html|markup|markdown|web ?page|website|hyperlink|\blinks?\b|\burls?\b|\bform\b|image|picture|photo|logo|"
    r"graphic|drawing|draw|sketch|diagram|chart|illustrat|render|design",
    re.IGNORECASE,
)


def adds_markup(c: Candidate) -> bool:
    """A rewrite that brings an image (a beacon that loads when someone views it), a link or HTML into
    texts that had none of that kind: the teacher was not asked to, and a hostile reply would. A new
    task (Q) that asks for a web page, a link or a picture may be answered with one."""
    had = _markup_kinds(_sources(c))
    task = f"{c.instruction}\n{c.input}"
    if c.variant == "Q" and _markup_kinds(task) - had:
        return True
    asked = c.variant == "Q" and _ASKS_FOR_MARKUP.search(task)
    return not asked and bool(_markup_kinds(c.output) - had)


CHECKS = {
    "leaked_markers": leaked_markers,
    "talks_about_rewrite": talks_about_rewrite,
    "instruction_in_output": instruction_in_output,
    "answer_as_instruction": answer_as_instruction,
    "copy_of_original": copy_of_original,
    "cut_off": cut_off,
    "language_switch": language_switch,
    "repetition": repetition,
    "adds_markup": adds_markup,
}


def candidate_flags(candidate: Candidate, severity: Mapping[str, Severity] = DEFAULT_SEVERITY) -> list[str]:
    """The flags ``candidate`` raises, in FLAGS order; flags set to ``off`` are not checked."""
    return [name for name, check in CHECKS.items() if severity.get(name, "reject") != "off" and check(candidate)]


def rejected(flags: list[str], severity: Mapping[str, Severity] = DEFAULT_SEVERITY) -> bool:
    """Whether the flags make the candidate a failed reflection."""
    return any(severity.get(name, "reject") == "reject" for name in flags)
