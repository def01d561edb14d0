"""Bad input: strict mode names file:line and the problem; skip mode counts exactly, by reason."""
from __future__ import annotations

import pytest

from trainer.config import DataConfig, ModelConfig
from trainer.data import build_datasets, load_files
from trainer.data.errors import DataError
from trainer.model import build_tokenizer

BAD = "tests/fixtures/data/bad/"
CASES = [  # file, line, reason, words of the message
    ("malformed_json.jsonl", 2, "malformed_json", "malformed JSON: Expecting ',' delimiter at column 54 (the line ends early)"),
    ("missing_field.jsonl", 2, "missing_field", "missing field 'messages' (format messages)"),
    ("unknown_role.jsonl", 3, "unknown_role", "message 1 has unknown role 'narrator'; valid roles: system, user"),
    ("empty_conversation.jsonl", 2, "empty_conversation", "empty conversation"),
    ("assistant_first.jsonl", 2, "assistant_first", "message 0: assistant turn before any user turn"),
    ("bom_inside.jsonl", 3, "bom", "a byte-order mark (U+FEFF) starts this line, not the file"),
    ("invalid_utf8.jsonl", 2, "invalid_utf8", "invalid UTF-8 at byte 46 of the line"),
    ("zero_trainable.jsonl", 2, "zero_trainable", "zero trainable tokens after masking"),
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


@pytest.mark.parametrize("name,line,reason,words", CASES)
def test_strict_mode_stops_at_file_and_line(tok, tmp_path, name, line, reason, words):
    cfg = DataConfig(train_files=[BAD + name], cache_dir=str(tmp_path))
    with pytest.raises(DataError) as caught:
        load_files(cfg.train_files, tok, cfg)
    assert caught.value.where == f"{BAD}{name}:{line}"
    assert caught.value.reason == reason
    assert words in str(caught.value), str(caught.value)


@pytest.mark.parametrize("name,line,reason,words", CASES)
def test_skip_mode_skips_exactly_that_record(tok, tmp_path, name, line, reason, words):
    cfg = DataConfig(train_files=[BAD + name], cache_dir=str(tmp_path), on_error="skip")
    ds = load_files(cfg.train_files, tok, cfg)
    assert dict(ds.skipped) == {reason: 1}
    assert len(ds) >= 1 and all(ds.label_tokens(i) > 0 for i in range(len(ds)))


def test_skip_counts_by_reason_in_a_mixed_file(tok, tmp_path):
    cfg = DataConfig(train_files=[BAD + "mixed.jsonl"], cache_dir=str(tmp_path), on_error="skip")
    train, _ = build_datasets(cfg, tok)
    assert len(train) == 4
    assert dict(train.skipped) == {"malformed_json": 1, "unknown_role": 1, "assistant_first": 2,
                                   "empty_conversation": 1, "invalid_utf8": 1, "no_assistant_turn": 1}


def test_tokenizer_without_chat_template(tmp_path):
    bare = build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))
    bare.chat_template = None
    cfg = DataConfig(train_files=["tests/fixtures/data/messages.jsonl"], cache_dir=str(tmp_path))
    with pytest.raises(DataError, match="tokenizer has none; set model.chat_template=chatml"):
        load_files(cfg.train_files, bare, cfg)


def test_a_failed_preparation_is_not_cached(tok, tmp_path):
    cfg = DataConfig(train_files=[BAD + "malformed_json.jsonl"], cache_dir=str(tmp_path))
    for _ in range(2):
        with pytest.raises(DataError, match="malformed_json.jsonl:2"):
            load_files(cfg.train_files, tok, cfg)
    assert not [p for p in tmp_path.iterdir() if not p.name.endswith(".error")]
