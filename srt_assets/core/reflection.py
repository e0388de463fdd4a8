"""Teacher prompts and parsing for instruction and response reflection (docs/method.md).

The default prompts are the project's own words; they ask for the analysis criteria of the paper and
for its output markers (``[New Instruction] … [End]``, ``[New Answer] … [End]``,
``[Better Answer] … [End]``), so the authors' parsing rules apply unchanged. Any other wording (the
paper's Figures 5–6, for instance) loads from a YAML file with the same keys.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, fields
from difflib import get_close_matches
from pathlib import Path

import yaml

from srt_assets.core.generation import Messages

# The authors' placeholders, and the ones our own prompts show the format with: a reply that only
# copies one is no rewrite.
PLACEHOLDERS = (
    "your instruction",
    "your answer",
    "n/a",
    "the new instruction",
    "the answer",
    "the better answer",
    "the answer to the new instruction",
)

MAX_PROMPTS_FILE_BYTES = 1_000_000


@dataclass(frozen=True)
class ReflectionPrompts:
    instruction_system: str = (
        "You review training data for instruction-following models. You are exact and demanding, "
        "and you judge how good an instruction is."
    )
    instruction_criteria: str = (
        "Answer the following about the instruction above.\n"
        "1. What makes this instruction weak? Consider how complex its topic is, how much detail it "
        "asks for, the knowledge it needs, how ambiguous it is, and how much reasoning or problem "
        "solving it involves. Then say what makes the answer weak for this instruction, judging "
        "helpfulness, relevance, accuracy and level of detail, and how the weak instruction led to "
        "the weak answer.\n"
        "2. Using your analysis, write a new, complete instruction that is harder and cannot be "
        "answered in a line. It should stay on a related topic but stand on its own, answerable "
        "without seeing the original. Write it as: [New Instruction] the new instruction [End]\n"
        "3. Answer your new instruction as fully as you can, written as: [New Answer] the answer [End]\n"
    )
    response_system: str = (
        "You review training data for instruction-following models. You are exact and demanding, "
        "and you judge how well an answer serves its instruction."
    )
    response_criteria: str = (
        "Answer the following about the answer above.\n"
        "1. What makes this answer weak for the instruction? Judge its helpfulness, relevance, "
        "accuracy and level of detail.\n"
        "2. Using your analysis, write a better answer: new, complete and as detailed as the "
        "instruction deserves, written as: [Better Answer] the answer [End]\n"
    )
    input_note: str = " The instruction comes with an input; judge them together."
    # Optional start of the teacher's reply (e.g. "[Better Answer]"): the backend continues it, which
    # keeps small teachers on the output format. Empty (the default) sends no assistant turn.
    instruction_prefill: str = ""
    response_prefill: str = ""

    @classmethod
    def from_file(cls, path: str | Path) -> ReflectionPrompts:
        """Load prompt texts from YAML; keys not given keep the defaults. The path is a setting anyone
        with launch rights can edit, so no error repeats what the file holds: not its text, nor a
        key unless it is a near miss of a prompt key."""
        path = Path(path)
        if path.suffix.lower() not in (".yaml", ".yml"):
            raise ValueError(f"prompts_file {str(path)!r}: must be a .yaml or .yml file")
        raw = _read_regular_file(path, MAX_PROMPTS_FILE_BYTES + 1)
        if len(raw) > MAX_PROMPTS_FILE_BYTES:
            raise ValueError(f"prompts_file {str(path)!r}: larger than {MAX_PROMPTS_FILE_BYTES:,} bytes")
        try:
            data = yaml.safe_load(raw.decode("utf-8")) or {}
        except RecursionError:
            raise ValueError(f"prompts_file {str(path)!r}: nested too deeply to be a prompts file") from None
        except (UnicodeDecodeError, yaml.YAMLError) as error:
            line = getattr(getattr(error, "problem_mark", None), "line", None)
            where = f" (line {line + 1})" if line is not None else ""
            raise ValueError(f"prompts_file {str(path)!r}: not UTF-8 YAML{where}") from None
        known = sorted(f.name for f in fields(cls))
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            raise ValueError(f"prompts_file {str(path)!r}: not a mapping of prompt keys to texts; keys: {known}")
        unknown = [str(k) for k in data if k not in known]
        if unknown:
            near = sorted({f"{k!r} (did you mean {m[0]!r}?)" for k in unknown if (m := get_close_matches(k, known, 1))})
            raise ValueError(
                f"prompts_file {str(path)!r}: {len(unknown)} unknown key(s){': ' + ', '.join(near) if near else ''}; "
                f"allowed: {known}"
            )
        return cls(**data)


def _read_regular_file(path: Path, limit: int) -> bytes:
    """Up to ``limit`` bytes of a regular file. Opened without blocking and checked once open, so a
    FIFO or a device named in a setting fails at once instead of hanging the run."""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise ValueError(f"prompts_file {str(path)!r}: cannot be read ({error.strerror})") from None
    with os.fdopen(descriptor, "rb") as handle:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            raise ValueError(f"prompts_file {str(path)!r}: not a regular file")
        return handle.read(limit)


def _frame(instruction: str, input_text: str, output: str, criteria: str) -> str:
    parts = [f"[Instruction]\n{instruction}\n\n"]
    if input_text:
        parts.append(f"[The Start of Input]\n{input_text}\n\n[The End of Input]\n\n")
    parts.append(f"[The Start of Answer]\n{output}\n\n[The End of Answer]\n\n[System]\n{criteria}\n\n")
    return "".join(parts)


def _conversation(system: str, user: str, prefill: str) -> Messages:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    return messages


def instruction_messages(prompts: ReflectionPrompts, instruction: str, input_text: str, output: str) -> Messages:
    system = prompts.instruction_system + (prompts.input_note if input_text else "")
    user = _frame(instruction, input_text, output, prompts.instruction_criteria)
    return _conversation(system, user, prompts.instruction_prefill)


def response_messages(prompts: ReflectionPrompts, instruction: str, input_text: str, output: str) -> Messages:
    system = prompts.response_system + (prompts.input_note if input_text else "")
    user = _frame(instruction, input_text, output, prompts.response_criteria)
    return _conversation(system, user, prompts.response_prefill)


@dataclass(frozen=True)
class Parsed:
    instruction: str | None = None
    answer: str | None = None
    error: str | None = None
    closed: bool = False  # the answer ended at a closing marker (or a whole JSON object): not cut off

    @property
    def ok(self) -> bool:
        return self.error is None


def _between(text: str, starts: tuple[str, ...], ends: tuple[str, ...]) -> str | None:
    """The text after the first start marker found (in order of preference) up to the earliest end
    marker after it, or to the end of the text; None when no start marker occurs."""
    segment, _ = _segment(text, starts, ends)
    return segment


def _segment(text: str, starts: tuple[str, ...], ends: tuple[str, ...]) -> tuple[str | None, bool]:
    """``_between``, and whether an end marker closed the segment."""
    for marker in starts:
        begin = text.find(marker)
        if begin < 0:
            continue
        begin += len(marker)
        stops = [i for i in (text.find(end, begin) for end in ends) if i >= 0]
        return text[begin : min(stops) if stops else len(text)].strip(), bool(stops)
    return None, False


def _usable(segment: str | None) -> bool:
    if not segment:
        return False
    lowered = segment.strip().strip(".").lower()
    return lowered not in PLACEHOLDERS and lowered != ""


def parse_instruction_reflection(text: str) -> Parsed:
    """x1 between ``[New Instruction]`` (fallback ``New Instruction:``) and the first of ``[End]``,
    ``[New Answer]``, ``New Answer:``; y1 after ``[New Answer]`` (fallback ``New Answer:``) up to
    ``[End]`` or the end of the text."""
    instruction = _between(text, ("[New Instruction]", "New Instruction:"), ("[End]", "[New Answer]", "New Answer:"))
    answer, closed = _segment(text, ("[New Answer]", "New Answer:"), ("[End]",))
    if not _usable(instruction):
        return Parsed(error="no new instruction" if instruction is None else "empty or placeholder instruction")
    if not _usable(answer):
        return Parsed(
            instruction=instruction, error="no new answer" if answer is None else "empty or placeholder answer"
        )
    return Parsed(instruction=instruction, answer=answer, closed=closed)


def parse_response_reflection(text: str) -> Parsed:
    """y' after ``[Better Answer]`` (fallback ``Better Answer:``) up to ``[End]`` or the end."""
    answer, closed = _segment(text, ("[Better Answer]", "Better Answer:"), ("[End]",))
    if not _usable(answer):
        return Parsed(error="no better answer" if answer is None else "empty or placeholder answer")
    return Parsed(answer=answer, closed=closed)


# Strict-mode compatible (every property required, no others allowed), so hosted APIs accept them as
# they are; the parser still rejects an empty text.
INSTRUCTION_JSON_SCHEMA = {
    "title": "instruction_reflection",
    "type": "object",
    "properties": {
        "analysis": {"type": "string"},
        "new_instruction": {"type": "string"},
        "new_answer": {"type": "string"},
    },
    "required": ["analysis", "new_instruction", "new_answer"],
    "additionalProperties": False,
}
RESPONSE_JSON_SCHEMA = {
    "title": "response_reflection",
    "type": "object",
    "properties": {"analysis": {"type": "string"}, "better_answer": {"type": "string"}},
    "required": ["analysis", "better_answer"],
    "additionalProperties": False,
}
JSON_FORMAT_NOTE = (
    "\nReply with one JSON object only, with the keys described by the schema you are given, instead of "
    "the bracketed markers."
)


def parse_structured(text: str, kind: str) -> Parsed:
    """Parse a JSON reply produced under guided decoding (structured output mode)."""

    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return Parsed(error=f"reply is not JSON: {exc.msg}")
    if not isinstance(data, dict):
        return Parsed(error="reply is not a JSON object")
    if kind == "instruction":
        instruction, answer = data.get("new_instruction"), data.get("new_answer")
        if not (isinstance(instruction, str) and _usable(instruction)):
            return Parsed(error="empty or placeholder instruction")
        if not (isinstance(answer, str) and _usable(answer)):
            return Parsed(instruction=instruction, error="empty or placeholder answer")
        return Parsed(instruction=instruction.strip(), answer=answer.strip(), closed=True)
    answer = data.get("better_answer")
    if not (isinstance(answer, str) and _usable(answer)):
        return Parsed(error="empty or placeholder answer")
    return Parsed(answer=answer.strip(), closed=True)
