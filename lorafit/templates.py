"""Prompt templates and loss masking.

Every row becomes a list of chat messages; the chosen template is set as the tokenizer's chat template
(and so saved with the adapter, so inference renders prompts identically). Which tokens are trained is
found from character spans: the text each assistant turn adds to the rendered conversation, end-of-turn
token included, so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorafit.errors import LorafitError
from lorafit.recipe import TemplateSection

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

Messages = list[dict[str, str]]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Stanford Alpaca's prompt; the response ends with eos so the model learns to stop.
ALPACA = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}"
    "{% else %}{{ 'Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '### Response:\n' + message['content'] + eos_token + '\n\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Encoded:
    """One tokenized example: ids, labels (-100 = not trained) and the rendered text."""

    input_ids: list[int]
    labels: list[int]
    text: str


def apply_template(section: TemplateSection, tokenizer: PreTrainedTokenizerBase) -> str:
    """Set the recipe's template as the tokenizer's chat template; returns the template's resolved name."""
    name = section.name
    if name == "auto":
        name = "model" if tokenizer.chat_template else "chatml"
    if name == "model":
        if not tokenizer.chat_template:
            raise LorafitError("the tokenizer has no chat template", where="template.name: model",
                               hint="use template.name: chatml, alpaca or custom")
        return name
    if name == "custom":
        text = section.custom or ""
        if "\n" not in text and text.endswith(".jinja"):
            path = Path(text)
            if not path.is_file():
                raise LorafitError("template file not found", where=f"template.custom: {text}")
            text = path.read_text(encoding="utf-8")
        tokenizer.chat_template = text
    else:
        tokenizer.chat_template = CHATML if name == "chatml" else ALPACA
    if name == "chatml" and "<|im_end|>" in tokenizer.get_vocab():
        # ChatML turns end with <|im_end|>; generation must stop there, so it is the eos token.
        tokenizer.eos_token = "<|im_end|>"
    return name


def render(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, add_generation_prompt: bool = False) -> str:
    """The conversation as text, exactly as the saved chat template renders it."""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja errors come in many types; all mean the template cannot render this row
        raise LorafitError(f"the chat template failed to render a row: {exc}", where="template") from None


def assistant_spans(tokenizer: PreTrainedTokenizerBase, messages: Messages) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the character spans each assistant turn adds (content + end-of-turn marker).

    Found by rendering growing prefixes of the conversation. Templates that rewrite earlier turns (some
    reasoning templates drop old thoughts) are not prefix-stable; then only the last turn is trained.
    """
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
        if not (upto.startswith(before) and full.startswith(upto)):
            spans = []
            break
        spans.append((len(before), len(upto)))
    if not spans and messages[-1]["role"] == "assistant":
        before = render(tokenizer, messages[:-1], add_generation_prompt=True)
        if not full.startswith(before):
            raise LorafitError("the chat template renders the prompt differently from the conversation, so the "
                               "completion cannot be located", where="template", hint="use template.name: chatml")
        spans = [(len(before), len(full))]
    return full, spans


def encode_messages(tokenizer: PreTrainedTokenizerBase, messages: Messages, *, train_on: str) -> Encoded:
    """Tokenize a conversation; labels keep only assistant tokens unless train_on is 'all'."""
    text, spans = assistant_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    if train_on == "all":
        return Encoded(ids, list(ids), text)
    labels = [
        token if any(start < end_span and end > start_span for start_span, end_span in spans) else -100
        for token, (start, end) in zip(ids, encoding["offset_mapping"], strict=True)
    ]
    return Encoded(ids, labels, text)


def encode_text(tokenizer: PreTrainedTokenizerBase, text: str) -> Encoded:
    """Plain-text rows (format: text): every token trained, eos appended so documents end."""
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
        ids.append(tokenizer.eos_token_id)
    return Encoded(ids, list(ids), text)
