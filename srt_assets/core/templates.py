"""Training prompt templates and the reverse-IFD prompt (docs/method.md, "Templates").

The template texts are formats (facts) shared by the Alpaca, WizardLM and Vicuna projects; the
reverse prompt is the one sentence that defines r-IFD. ``chat`` defers to the student tokenizer's
own chat template, passed in as a function so this module stays free of model code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

_ALPACA_HEAD = "Below is an instruction that describes a task"
_TEMPLATE_TEXTS: dict[str, tuple[str, str]] = {
    "alpaca": (
        f"{_ALPACA_HEAD}. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:",
        f"{_ALPACA_HEAD}, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    ),
    "wiz": ("{instruction}\n\n### Response:", "{instruction}\n{input}\n\n### Response:"),
    "vicuna": (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:",
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
        "helpful, detailed, and polite answers to the user's questions. USER: {instruction}\nInput:\n{input} "
        "ASSISTANT:",
    ),
}
TEMPLATE_NAMES = (*_TEMPLATE_TEXTS, "chat")

REVERSE_PROMPT_HEAD = (
    "Below is the response to an instruction, please guess the corresponding instruction for the given response.\n"
)
REVERSE_PROMPT_TAIL = "\nGenerate the instruction for the above response."


def reverse_instruction(response: str) -> str:
    """R(y): the instruction that asks the student to guess the instruction behind ``response``."""
    return f"{REVERSE_PROMPT_HEAD}{response}{REVERSE_PROMPT_TAIL}"


ChatFormatter = Callable[[str], str]
"""Turns a user message into the prompt text that precedes the assistant's answer."""


def merged_instruction(instruction: str, input_text: str) -> str:
    """The deterministic merge of instruction and input (docs/method.md, "Records"): the text that
    stands for the instruction where there is no separate input field."""
    return f"{instruction}\n{input_text}" if input_text else instruction


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    no_input: str = ""
    with_input: str = ""
    chat: ChatFormatter | None = None

    def render(self, instruction: str, input_text: str = "") -> str:
        """T(x): the prompt the student is trained with, up to where the response starts."""
        if self.chat is not None:
            return self.chat(merged_instruction(instruction, input_text))
        if input_text:
            return self.with_input.format_map({"instruction": instruction, "input": input_text})
        return self.no_input.format_map({"instruction": instruction})


def get_template(name: str, chat: ChatFormatter | None = None) -> PromptTemplate:
    if name == "chat":
        if chat is None:
            raise ValueError("template 'chat' needs the student tokenizer's chat formatter")
        return PromptTemplate(name="chat", chat=chat)
    try:
        no_input, with_input = _TEMPLATE_TEXTS[name]
    except KeyError:
        raise ValueError(f"unknown template '{name}'; choose one of {', '.join(TEMPLATE_NAMES)}") from None
    return PromptTemplate(name=name, no_input=no_input, with_input=with_input)


def render_conversation(render: ChatFormatter, messages: list[dict[str, str]]) -> str:
    """A conversation in a single-turn training template: each user turn rendered by the template,
    each earlier answer right after its prompt and closed by a blank line (MT-Bench's second turn).
    System messages are dropped: the student was trained without them. One user turn renders
    exactly as ``render`` does."""
    parts = []
    for message in messages:
        if message["role"] == "user":
            parts.append(render(message["content"]))
        elif message["role"] == "assistant":
            parts.append(f" {message['content']}\n\n")
    return "".join(parts)
