"""Recognise a record's format and bring it to one of three canonical shapes:

    ("chat", messages)                        messages, sharegpt, alpaca, conversational prompt/completion
    ("completion", prompt, completion)        plain-text prompt/completion pairs
    ("text", text)                            raw text for continued pre-training

`data.fields` renames source fields to the canonical names (e.g. {messages: dialog, content: text});
`data.format` forces a format, otherwise it is detected once per source from its first record.
"""
from __future__ import annotations

import json
from typing import Dict, List, Mapping, Optional, Tuple

from trainer.data.errors import DataError

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
# The fields that identify each format, in detection order.
SIGNATURES = (("messages", ("messages",)), ("sharegpt", ("conversations",)),
              ("alpaca", ("instruction", "output")), ("prompt_completion", ("prompt", "completion")),
              ("text", ("text",)))
# ShareGPT speakers (and common variants) -> chat roles.
SPEAKERS = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
            "model": "assistant", "system": "system", "tool": "tool", "function": "tool", "observation": "tool",
            "function_call": "assistant"}
Canonical = Tuple


class FieldNames:
    """Canonical field name -> the name in the source, from data.fields."""

    def __init__(self, mapping: Mapping[str, str]):
        self.mapping = dict(mapping or {})

    def __call__(self, name: str) -> str:
        return self.mapping.get(name, name)


def detect(record: Mapping, names: FieldNames, where: str) -> str:
    for fmt, keys in SIGNATURES:
        if all(names(k) in record for k in keys):
            return fmt
    wanted = "; ".join(f"{fmt}: {', '.join(names(k) for k in keys)}" for fmt, keys in SIGNATURES)
    raise DataError(where, f"missing field: cannot tell the format from keys {sorted(record)}; expected one of "
                           f"({wanted}); rename fields with data.fields or set data.format", "missing_field")


def _field(record: Mapping, name: str, names: FieldNames, fmt: str, where: str):
    key = names(name)
    if key not in record or record[key] is None:
        raise DataError(where, f"missing field {key!r} (format {fmt}); found keys {sorted(record)}", "missing_field")
    value = record[key]
    if isinstance(value, str) and name in ("messages", "conversations") and value.lstrip().startswith("["):
        value = json.loads(value)  # CSV cells hold conversations as JSON text
    return value


def _chat_messages(raw, names: FieldNames, where: str) -> List[Dict]:
    """OpenAI-style or ShareGPT-style messages -> [{role, content, ...}], keeping tool fields."""
    if not isinstance(raw, list) or not raw:
        raise DataError(where, "empty conversation: the message list is empty or not a list", "empty_conversation")
    messages = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise DataError(where, f"message {i} is not an object: {message!r:.60}", "bad_message")
        if names("role") in message:
            role = message[names("role")]
        elif names("from") in message:
            speaker = message[names("from")]
            role = SPEAKERS.get(str(speaker).lower(), speaker)
        else:
            raise DataError(where, f"message {i} has neither {names('role')!r} nor {names('from')!r}: "
                                   f"{message!r:.80}", "bad_message")
        content = message.get(names("content"), message.get(names("value")))
        if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": ...}, ...]
            content = _text_of_parts(content, i, where)
        if content is None and not message.get("tool_calls"):
            raise DataError(where, f"message {i} ({role}) has no {names('content')!r}", "bad_message")
        extra = {k: v for k, v in message.items()
                 if k not in (names("role"), names("from"), names("content"), names("value"))}
        messages.append({**extra, "role": role, "content": content if content is not None else ""})
    return messages


def _text_of_parts(parts: list, index: int, where: str) -> str:
    """The text of a message given as content parts; a non-text part (an image, audio) is an error:
    the models trained here read text only."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise DataError(where, f"message {index} has a content part of type {kind!r}; only text parts "
                                   "({'type': 'text', 'text': ...}) can be trained on: drop the others", "bad_message")
    return "".join(texts)


def normalize(record, fmt: str, names: FieldNames, where: str) -> Canonical:
    """One record of a known format -> its canonical shape (raises DataError)."""
    if not isinstance(record, dict):
        raise DataError(where, f"expected a JSON object, got {type(record).__name__}", "not_an_object")
    if fmt == "messages":
        return ("chat", _chat_messages(_field(record, "messages", names, fmt, where), names, where))
    if fmt == "sharegpt":
        messages = _chat_messages(_field(record, "conversations", names, fmt, where), names, where)
        system = record.get(names("system"))
        if system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": system})
        return ("chat", messages)
    if fmt == "alpaca":
        instruction = _field(record, "instruction", names, fmt, where)
        extra_input = record.get(names("input")) or ""
        prompt = f"{instruction}\n\n{extra_input}" if extra_input else instruction
        messages = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": _field(record, "output", names, fmt, where)}]
        if record.get(names("system")):
            messages.insert(0, {"role": "system", "content": record[names("system")]})
        return ("chat", messages)
    if fmt == "prompt_completion":
        prompt = _field(record, "prompt", names, fmt, where)
        completion = _field(record, "completion", names, fmt, where)
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational (TRL style)
            return ("chat", _chat_messages(prompt + completion, names, where))
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise DataError(where, "prompt and completion must both be strings or both message lists", "missing_field")
        return ("completion", prompt, completion)
    text = _field(record, "text", names, fmt, where)
    if not isinstance(text, str):
        raise DataError(where, f"field {names('text')!r} must be a string, got {type(text).__name__}", "missing_field")
    return ("text", text)


def source_format(first_record, configured: str, names: FieldNames, where: str) -> Optional[str]:
    """The format of a whole source: data.format, or detected from its first readable record."""
    if configured != "auto":
        return configured
    if not isinstance(first_record, dict):
        return None
    return detect(first_record, names, where)
