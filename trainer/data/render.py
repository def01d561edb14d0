"""Render one sample into text plus the character spans that carry a loss, then into token ids
and a trained-token mask.

Chat samples go through the tokenizer's own chat template. The trained spans are found by
rendering growing prefixes of the conversation: the text that assistant turn i adds is
`render(messages[:i+1])` minus `render(messages[:i], add_generation_prompt=True)`. Tokens are
mapped to those character spans with the fast tokenizer's offsets, so a BPE merge across a
boundary can never shift a mask by one token (a token that straddles a boundary is not trained).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from trainer.data.errors import DataError

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Rendered:
    text: str
    spans: List[Tuple[int, int]]  # character spans that are trained
    special: bool  # let the tokenizer add its special tokens (BOS): plain text; templates add their own
    eos: bool  # append a trained EOS: plain text and completions must learn to stop


def check_messages(messages: Sequence[Dict], where: str) -> None:
    if not messages:
        raise DataError(where, "empty conversation: the message list is empty", "empty_conversation")
    seen_user = False
    for i, message in enumerate(messages):
        role = message["role"]
        if role not in ROLES:
            raise DataError(where, f"message {i} has unknown role {role!r}; valid roles: {', '.join(ROLES)} "
                                   "(ShareGPT: human, gpt, system, tool)", "unknown_role")
        if not isinstance(message["content"], str):
            raise DataError(where, f"message {i} content must be a string, got {type(message['content']).__name__}",
                            "bad_message")
        if "weight" in message and message["weight"] not in (0, 1):
            raise DataError(where, f"message {i} has weight {message['weight']!r}; valid: 0 (not trained) or 1",
                            "bad_message")
        seen_user |= role == "user"
        if role == "assistant" and not seen_user:
            raise DataError(where, f"message {i}: assistant turn before any user turn", "assistant_first")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(where, "no assistant turn: nothing to learn from this conversation", "no_assistant_turn")


def _render(tokenizer, messages, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_spans(tokenizer, messages: Sequence[Dict], loss_on: str, where: str) -> Rendered:
    text = _render(tokenizer, messages)
    if loss_on == "all":
        return Rendered(text, [(0, len(text))], False, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if loss_on == "last_turn":
        turns = turns[-1:]
    # An assistant message with "weight": 0 (OpenAI's fine-tuning format) is context, not a target.
    turns = [i for i in turns if messages[i].get("weight", 1) != 0]
    spans = []
    for i in turns:
        before = _render(tokenizer, messages[:i], add_generation_prompt=True)
        through = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            raise DataError(where, "the chat template does not render conversations prefix by prefix, so "
                                   "assistant turns cannot be located; use data.loss_on=last_turn or all", "template")
        spans.append((len(before), len(through)))
    return Rendered(text, spans, False, False)


def render(canonical: Tuple, tokenizer, loss_on: str, where: str) -> Rendered:
    kind = canonical[0]
    if kind == "chat":
        check_messages(canonical[1], where)
        return chat_spans(tokenizer, canonical[1], loss_on, where)
    if kind == "completion":
        prompt, completion = canonical[1], canonical[2]
        start = 0 if loss_on == "all" else len(prompt)
        return Rendered(prompt + completion, [(start, len(prompt) + len(completion))], True, True)
    return Rendered(canonical[1], [(0, len(canonical[1]))], True, True)


def tokenize(tokenizer, items: List[Rendered]) -> List[Tuple[np.ndarray, np.ndarray]]:
    """Rendered samples -> (ids int32, trained uint8) per sample, with one batched tokenizer call
    per kind (the fast tokenizer parallelises a batch in Rust)."""
    out: List = [None] * len(items)
    for special in (False, True):
        chosen = [i for i, item in enumerate(items) if item.special == special]
        if not chosen:
            continue
        # verbose=False: a long sample is not an error here (the length policy handles it)
        enc = tokenizer([items[i].text for i in chosen], add_special_tokens=special, return_offsets_mapping=True,
                        verbose=False)
        for i, ids, offsets in zip(chosen, enc["input_ids"], enc["offset_mapping"]):
            out[i] = _mask(items[i], ids, offsets, tokenizer.eos_token_id)
    return out


def _mask(item: Rendered, ids: List[int], offsets, eos_id) -> Tuple[np.ndarray, np.ndarray]:
    ids_arr = np.asarray(ids, dtype=np.int32)
    offs = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = offs[:, 0], offs[:, 1]
    trained = np.zeros(len(ids_arr), dtype=bool)
    for lo, hi in item.spans:
        trained |= (starts >= lo) & (ends <= hi) & (ends > starts)
    if item.eos and eos_id is not None:
        ids_arr = np.append(ids_arr, np.int32(eos_id))
        trained = np.append(trained, True)
    return ids_arr, trained.astype(np.uint8)


def labels_of(ids: np.ndarray, trained: np.ndarray) -> List[int]:
    return np.where(trained.astype(bool), ids, IGNORE).tolist()
