"""Every input format and source kind, rendered and masked as the model will see it (unit, no ranks)."""
from __future__ import annotations

import json
import re

import pytest

from trainer.config import DataConfig, ModelConfig
from trainer.data import build_datasets, load_files
from trainer.data.collate import collate
from trainer.data.render import IGNORE
from trainer.model import build_tokenizer

FIX = "tests/fixtures/data/"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


def load(tok, tmp_path, files, **settings):
    cfg = DataConfig(train_files=files, cache_dir=str(tmp_path / "cache"), **settings)
    return load_files(cfg.train_files, tok, cfg)


def trained_text(tok, row) -> str:
    return tok.decode([t for t in row["labels"] if t != IGNORE])


def test_multi_turn_trains_every_assistant_turn_only(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "messages.jsonl"])
    row = ds[1]  # system + 3 user/assistant turns
    assert trained_text(tok, row) == "Blue.<|im_end|>\nGreen.<|im_end|>\nRed.<|im_end|>\n"
    assert tok.decode(row["input_ids"]).startswith("<|im_start|>system\nYou answer briefly.")
    assert ds.label_tokens(1) == sum(1 for t in row["labels"][1:] if t != IGNORE)


def test_loss_on_last_turn_and_all(tok, tmp_path):
    last = load(tok, tmp_path, [FIX + "messages.jsonl"], loss_on="last_turn")[1]
    assert trained_text(tok, last) == "Red.<|im_end|>\n"
    everything = load(tok, tmp_path, [FIX + "messages.jsonl"], loss_on="all")[1]
    assert everything["labels"][1:] == everything["input_ids"][1:]


# Qwen3's way, reduced: turns after the last user message show their thinking, earlier turns only
# their answer, so turn 1 renders one way alone and another inside the whole conversation.
REASONING_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) -%}"
    "{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set answer = m.content.split('</think>')[-1].strip() -%}"
    "{%- if loop.index0 > ns.last_user -%}"
    "{%- set thinking = m.content.split('</think>')[0].split('<think>')[-1].strip() if '</think>' in m.content else '' -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thinking + '\\n</think>\\n\\n' + answer + '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + answer + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}")


def test_reasoning_template_that_drops_earlier_thinking_trains_every_turn():
    """Before: 'the chat template does not render conversations prefix by prefix' for any
    multi-turn chat with such a template (Qwen3), unless loss_on=last_turn."""
    from trainer.data.render import chat_spans

    tokenizer = build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))
    tokenizer.chat_template = REASONING_TEMPLATE
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "<think>two and two</think>\n\nFour."},
                {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "<think>three and three</think>Six."}]
    rendered = chat_spans(tokenizer, messages, "assistant", "chat.jsonl:1")
    assert "two and two" not in rendered.text and "three and three" in rendered.text
    assert [rendered.text[a:b] for a, b in rendered.spans] == [
        "Four.<|im_end|>\n", "<think>\nthree and three\n</think>\n\nSix.<|im_end|>\n"]
    last = chat_spans(tokenizer, messages, "last_turn", "chat.jsonl:1")
    assert last.spans == rendered.spans[1:]


def test_unicode_and_tool_messages_are_kept(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "messages.jsonl"])
    assert trained_text(tok, ds[2]) == "« Bonjour » se dit こんにちは (konnichiwa). 😊<|im_end|>\n"
    text = tok.decode(ds[3]["input_ids"])
    assert '<|im_start|>tool\n{"temp_c": 18, "sky": "cloudy"}<|im_end|>' in text
    assert "cloudy" not in trained_text(tok, ds[3]).split("It is")[0]  # the tool output is not trained
    assert trained_text(tok, ds[3]).endswith("It is 18 °C and cloudy in Paris.<|im_end|>\n")


@pytest.mark.parametrize("other", ["sharegpt.json", "chat.parquet"])
def test_sharegpt_json_and_parquet_equal_the_messages_jsonl(tok, tmp_path, other):
    reference = load(tok, tmp_path, [FIX + "messages.jsonl"])
    ds = load(tok, tmp_path, [FIX + other])
    assert len(ds) == 3
    assert [ds[i] for i in range(3)] == [reference[i] for i in range(3)]


def test_alpaca_trains_on_the_output(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "alpaca.json"])
    assert trained_text(tok, ds[0]) == "Cold.<|im_end|>\n"
    assert "Summarise the text.\n\nThe cat sat on the mat" in tok.decode(ds[1]["input_ids"])
    assert tok.decode(ds[2]["input_ids"]).startswith("<|im_start|>system\nYou are a translator.")


def test_prompt_completion_csv_trains_on_completion_plus_eos(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "prompt_completion.csv"])
    assert trained_text(tok, ds[0]) == " Paris.<|im_end|>"
    assert tok.decode(ds[1]["input_ids"]) == 'He said, "hello, world" — twice.<|im_end|>'


def test_a_python_tokenizer_without_offsets_masks_by_pieces(tmp_path):
    """Custom-code tokenizers are Python ones: they ignore return_offsets_mapping (before: KeyError
    'offset_mapping' while preparing data). ByT5's is one, and it adds its own EOS."""
    from transformers import ByT5Tokenizer

    byt5 = ByT5Tokenizer()
    assert not byt5.is_fast
    ds = load(byt5, tmp_path, [FIX + "prompt_completion.csv"])
    assert trained_text(byt5, ds[0]) == " Paris.</s>"  # its own EOS, trained, not a second one
    assert byt5.decode(ds[0]["input_ids"]) == "The capital of France is Paris.</s>"
    text = load(byt5, tmp_path, [FIX + "text.jsonl"], format="text")[0]
    assert text["labels"][0] == IGNORE and text["labels"][1:] == text["input_ids"][1:]  # every token
    assert text["input_ids"][-1] == byt5.eos_token_id and text["input_ids"][-2] != byt5.eos_token_id


def test_text_trains_on_every_token(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "text.jsonl"])
    row = ds[1]
    assert row["labels"][0] == IGNORE and row["labels"][1:] == row["input_ids"][1:]
    assert row["input_ids"][-1] == tok.eos_token_id


def test_content_parts_and_per_message_weights(tok, tmp_path):
    """OpenAI's fine-tuning format: content as a list of text parts; "weight": 0 on an assistant
    message makes it context, not a target."""
    from trainer.data.errors import DataError

    conversation = [{"role": "user", "content": [{"type": "text", "text": "Name a "}, {"type": "text", "text": "colour."}]},
                    {"role": "assistant", "content": "Blue.", "weight": 0},
                    {"role": "user", "content": "Another?"},
                    {"role": "assistant", "content": [{"type": "text", "text": "Green."}], "weight": 1}]
    good = tmp_path / "openai.jsonl"
    good.write_text(json.dumps({"messages": conversation}) + "\n")
    row = load(tok, tmp_path, [str(good)])[0]
    assert trained_text(tok, row) == "Green.<|im_end|>\n"
    assert "Name a colour.<|im_end|>" in tok.decode(row["input_ids"]) and "Blue." in tok.decode(row["input_ids"])
    for bad_message, words in [({"role": "assistant", "content": "x", "weight": 0.5}, "message 1 has weight 0.5"),
                               ({"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a"}}]},
                                "message 1 has a content part of type 'image_url'")]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"messages": [conversation[0], bad_message]}) + "\n")
        with pytest.raises(DataError, match=rf"bad\.jsonl:1: {re.escape(words)}"):
            load(tok, tmp_path, [str(bad)])


def test_fields_remapping(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "remapped.jsonl"],
              fields={"messages": "dialog", "role": "speaker", "content": "utterance"})
    assert trained_text(tok, ds[0]) == "Hello, how can I help?<|im_end|>\n"


def test_format_override_and_a_leading_bom(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "bom_start.jsonl"], format="messages")
    assert trained_text(tok, ds[0]) == "2 + 3 = 5.<|im_end|>\n"


@pytest.mark.parametrize("source,suffix", [("messages.jsonl", ".gz"), ("sharegpt.json", ".bz2"),
                                           ("prompt_completion.csv", ".xz")])
def test_compressed_files_read_as_their_plain_text(tok, tmp_path, source, suffix):
    import bz2
    import gzip
    import lzma

    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}[suffix]
    packed = tmp_path / (source + suffix)
    with opener(packed, "wb") as out:
        out.write(open(FIX + source, "rb").read())
    plain, compressed = load(tok, tmp_path, [FIX + source]), load(tok, tmp_path, [str(packed)])
    assert len(compressed) == len(plain) > 0
    assert [compressed[i] for i in range(len(plain))] == [plain[i] for i in range(len(plain))]


def test_a_truncated_archive_names_the_file_and_line(tok, tmp_path):
    import gzip

    from trainer.data.errors import DataError

    whole = gzip.compress(b"".join(open(FIX + "text.jsonl", "rb").readlines() * 200))
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    for mode in ("strict", "skip"):  # skipping would hide the loss of the rest of the file
        with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: .*cut\.jsonl\.gz is truncated or corrupt"):
            load(tok, tmp_path, [str(cut)], on_error=mode)
    (tmp_path / "x.parquet.gz").write_bytes(b"")
    with pytest.raises(DataError, match=r"unknown file type '\.parquet\.gz'.*\.gz, \.bz2, \.xz"):
        load(tok, tmp_path, [str(tmp_path / "x.parquet.gz")])


def test_glob_save_to_disk_and_eval_fraction(tok, tmp_path):
    import datasets

    rows = [json.loads(line) for line in open(FIX + "messages.jsonl")]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows[:3]).save_to_disk(str(folder))
    ds = load(tok, tmp_path, [str(folder)])
    assert len(ds) == 3 and trained_text(tok, ds[0]) == "2 + 3 = 5.<|im_end|>\n"
    both = load(tok, tmp_path, [FIX + "[bm]*.jsonl"])  # bom_start.jsonl and messages.jsonl
    assert len(both) == 5
    cfg = DataConfig(train_files=[FIX + "messages.jsonl", FIX + "sharegpt.json"], eval_fraction=0.3,
                     cache_dir=str(tmp_path / "cache"))
    train, held_out = build_datasets(cfg, tok)
    assert (len(train), len(held_out)) == (5, 2)


def test_mixing_weights_upsample(tok, tmp_path):
    cfg = DataConfig(train_files=[FIX + "text.jsonl", FIX + "messages.jsonl"], weights=[2.0, 1.0],
                     cache_dir=str(tmp_path / "cache"))
    train, _ = build_datasets(cfg, tok)
    texts = [tok.decode(train[i]["input_ids"]) for i in range(len(train))]
    assert len(train) == 6  # 2 + 4 documents; 2/3 of them text (its 2 documents twice), 1/3 chat (2 of 4)
    assert sum(t.startswith("<|im_start|>") for t in texts) == 2


def test_length_policy_counts(tok, tmp_path):
    cut = load(tok, tmp_path, [FIX + "messages.jsonl"], max_seq_len=40)
    assert all(len(cut[i]["input_ids"]) <= 40 for i in range(len(cut)))
    # lengths 24, 73, 86, 70: two keep a trained token within 40, one had its whole answer past it
    assert (len(cut), cut.truncated) == (3, 2)
    assert cut.stats()["dropped"] == {"dropped_no_trained_token_left": 1}
    dropped = load(tok, tmp_path, [FIX + "messages.jsonl"], max_seq_len=40, length_policy="drop")
    assert len(dropped) == 1 and dropped.stats()["dropped"] == {"dropped_too_long": 3}


def test_collate_packed_rows_have_positions_and_no_mask(tok, tmp_path):
    ds = load(tok, tmp_path, [FIX + "messages.jsonl", FIX + "alpaca.json"], packing=True, max_seq_len=128)
    batch = collate([ds[0], ds[1]], tok.pad_token_id)
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    assert sum(ds.label_tokens(i) for i in range(len(ds))) == ds.stats()["trained_tokens"]
    plain = load(tok, tmp_path, [FIX + "messages.jsonl"])
    assert "attention_mask" in collate([plain[0], plain[1]], tok.pad_token_id)
