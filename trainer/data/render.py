"""Render one sample into token ids and labels, with the loss only where the model should learn.

Chat samples go through the tokenizer's own chat template. The trained spans are found by
rendering growing prefixes of the conversation: the text that turn i of the assistant adds is
`render(messages[:i+1])` minus `render(messages[:i], add_generation_prompt=True)`. Tokens are
mapped to those character spans with the fast tokenizer's offsets, so BPE merges across a
boundary can never shift a mask by one token.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from trainer.data.errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


def check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(where, "empty conversation: 'messages' must be a non-empty list")
    seen_user = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(where, f"message {i} needs 'role' and 'content' keys, got {message!r:.80}")
        role = message["role"]
        if role not in ROLES:
            raise DataError(where, f"message {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)}")
        if role == "user":
            seen_user = True
        if role == "assistant" and not seen_user:
            raise DataError(where, f"message {i}: assistant turn before any user turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, "no assistant turn: nothing to learn from this conversation")


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, messages: Sequence[Dict], loss_on: str, where: str) -> Tuple[str, List[Tuple[int, int]]]:
    """The full rendered text and the character spans that carry a loss."""
    text = _render(tokenizer, messages)
    if loss_on == "all":
        return text, [(0, len(text))]
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_turn":
        turns = turns[-1:]
    spans = []
    for i in turns:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(where, "the chat template does not render conversations prefix by prefix, so "
                                   "assistant turns cannot be located; use data.loss_on=last_turn or all")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_with_spans(tokenizer, text: str, spans: List[Tuple[int, int]]) -> Tuple[List[int], List[int]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE] * len(ids)
    for t, (start, end) in enumerate(offsets):
        if any(s <= start and end <= e and end > start for s, e in spans):
            labels[t] = ids[t]
    return ids, labels


def render_messages(tokenizer, messages, loss_on: str, where: str) -> Tuple[List[int], List[int]]:
    check_messages(messages, where)
    text, spans = assistant_spans(tokenizer, messages, loss_on, where)
    return tokenize_with_spans(tokenizer, text, spans)
