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
    return Rendered(text, [_turn_span(tokenizer, messages, i, text, where) for i in turns], False, False)


def _turn_span(tokenizer, messages: Sequence[Dict], i: int, text: str, where: str) -> Tuple[int, int]:
    """The characters of `text` (the whole conversation rendered) that assistant turn i adds:
    its content and the template's end-of-turn text after it."""
    before = _render(tokenizer, messages[:i], add_generation_prompt=True)
    through = text if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
    if text.startswith(before) and through.startswith(before):
        if text.startswith(through):
            return len(before), len(through)
        # The turn renders otherwise once later turns follow it: reasoning templates (Qwen3, DeepSeek-R1)
        # drop an earlier turn's thinking block. Find the turn's content in the whole text instead.
        span = _find_turn(messages[i]["content"] or "", text, through, len(before))
        if span:
            return span
    raise DataError(where, f"the chat template renders assistant turn {i} differently inside the whole "
                           "conversation than on its own, and its text could not be located; use "
                           "data.loss_on=last_turn (trains the final turn) or all", "template")


def _find_turn(content: str, text: str, through: str, start: int):
    """(start, end) of a turn whose text begins at `start` of `text`: its content (or what a reasoning
    template keeps of it, the answer after the thinking) followed by the end-of-turn text that
    `through`, the turn rendered last, has after its content. None when not found."""
    for shown in dict.fromkeys((content, content.split("</think>")[-1].strip(), content.strip())):
        cut = through.rfind(shown)
        if not shown or cut < 0:
            continue
        end_of_turn = through[cut + len(shown):]
        at = text.find(shown, start)
        while at >= 0:
            end = at + len(shown)
            if text.startswith(end_of_turn, end):
                return start, end + len(end_of_turn)
            at = text.find(shown, at + 1)
    return None


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
    if not getattr(tokenizer, "is_fast", True):
        return [_encode_in_pieces(tokenizer, item) for item in items]
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
    return _learn_to_stop(item, ids_arr, trained, eos_id)


def _learn_to_stop(item: Rendered, ids: np.ndarray, trained: np.ndarray, eos_id) -> Tuple[np.ndarray, np.ndarray]:
    """Plain text and completions end on a trained EOS: the tokenizer's own if it adds one (T5-like
    tokenizers do), else one appended."""
    if item.eos and eos_id is not None:
        if len(ids) and ids[-1] == eos_id and not trained[-1]:
            trained = trained.copy()
            trained[-1] = True
        else:
            ids, trained = np.append(ids, np.int32(eos_id)), np.append(trained, True)
    return ids, trained.astype(np.uint8)


def _encode_in_pieces(tokenizer, item: Rendered) -> Tuple[np.ndarray, np.ndarray]:
    """Python tokenizers (custom-code ones) give no character offsets: encode the text piece by
    piece, cut at the trained spans' edges, so a mask edge is always a token edge. (A tokenizer
    that marks each call's first word, as SentencePiece does, may split a piece's first word
    otherwise than inside the whole text; the fast tokenizer's offsets avoid that.)"""
    cuts = sorted({0, len(item.text), *(edge for span in item.spans for edge in span)})
    ids: List[int] = []
    trained: List[bool] = []
    for lo, hi in zip(cuts, cuts[1:]):
        piece = tokenizer.encode(item.text[lo:hi], add_special_tokens=False)
        ids += piece
        trained += [any(a <= lo and hi <= b for a, b in item.spans)] * len(piece)
    if item.special:  # the tokenizer's BOS (and the like) around the whole, never trained
        added = tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=False)
        ordinary = iter(trained)
        trained = [False if flag else next(ordinary) for flag in added]
        ids = tokenizer.build_inputs_with_special_tokens(ids)
    return _learn_to_stop(item, np.asarray(ids, dtype=np.int32), np.asarray(trained, dtype=bool), tokenizer.eos_token_id)


def labels_of(ids: np.ndarray, trained: np.ndarray) -> List[int]:
    return np.where(trained.astype(bool), ids, IGNORE).tolist()
