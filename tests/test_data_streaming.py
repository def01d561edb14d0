"""data.streaming=true (trainer/data/streamed.py): an index instead of a prepared cache, each row
tokenised from its source when it is read; the same rows in the same order as the map-style path.
A streamed run stopped mid-epoch and resumed continues the map-style run's loss curve exactly:
tests/test_foundation.py (RESUMED["zero3_streamed"])."""
from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from trainer.config import DataConfig, ModelConfig, RootConfig
from trainer.data import build_datasets
from trainer.data.errors import DataError
from trainer.model import build_tokenizer
from trainer.validate import validate

FIX = "tests/fixtures/data/"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


def both(tok, tmp_path, **settings):
    """(map-style train, eval), (streamed train, eval) of the same settings, separate caches."""
    prepared = build_datasets(DataConfig(cache_dir=str(tmp_path / "prepared"), **settings), tok)
    streamed = build_datasets(DataConfig(cache_dir=str(tmp_path / "streamed"), streaming=True, **settings), tok)
    return prepared, streamed


def assert_same_rows(a, b):
    assert len(a) == len(b) > 0
    for i in range(len(a)):
        assert a[i] == b[i], f"row {i} differs"
        assert a.label_tokens(i) == b.label_tokens(i)
    cached = ("cache_hits", "cache_misses")
    assert {k: v for k, v in a.stats().items() if k not in cached} == \
           {k: v for k, v in b.stats().items() if k not in cached}


SETTINGS = {
    "one file": dict(train_files=["samples/chat/train.jsonl"], max_seq_len=128),
    "packed, mixed, held out": dict(train_files=["samples/chat/train.jsonl", "samples/text/train.jsonl"],
                                    weights=[1.0, 2.0], packing=True, max_seq_len=256, eval_fraction=0.1),
    "skipped lines, dropped and truncated": dict(
        train_files=[FIX + "bad/mixed.jsonl", FIX + "messages.jsonl", "samples/chat/train.jsonl"],
        on_error="skip", max_seq_len=48, eval_files=["samples/chat/eval.jsonl"]),
    "dropped": dict(train_files=["samples/chat/train.jsonl"], max_seq_len=64, length_policy="drop", packing=True),
}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_streaming_reads_the_same_rows_as_the_prepared_cache(tok, tmp_path, name):
    (train, held_out), (s_train, s_held_out) = both(tok, tmp_path, **SETTINGS[name])
    assert_same_rows(train, s_train)
    assert (held_out is None) == (s_held_out is None)
    if held_out is not None:
        assert_same_rows(held_out, s_held_out)


def test_rows_read_ahead_in_the_background_are_the_rows_read_in_place(tok, tmp_path):
    """The loop asks for the next step's rows ahead (TokenizedDataset.prefetch): a streamed row's read
    and tokenisation then overlap the step before it."""
    (train, _), (s_train, _) = both(tok, tmp_path, train_files=["samples/chat/train.jsonl"], packing=True,
                                    max_seq_len=256)
    s_train.prefetch(range(12))
    assert len(s_train._ahead) == 12
    assert [s_train[i] for i in range(12)] == [train[i] for i in range(12)] and not s_train._ahead
    train.prefetch(range(12))  # prepared rows are memory-mapped: nothing to read ahead
    assert not train._ahead and not train.streamed and s_train.streamed


def test_a_save_to_disk_folder_streams_by_row(tok, tmp_path):
    import datasets

    rows = [json.loads(line) for line in open("samples/chat/train.jsonl")][:40]
    folder = tmp_path / "saved"
    datasets.Dataset.from_list(rows).save_to_disk(str(folder))
    (train, _), (s_train, _) = both(tok, tmp_path, train_files=[str(folder)], packing=True, max_seq_len=256)
    assert_same_rows(train, s_train)


def test_the_index_is_32_bytes_a_document_and_keeps_no_token(tok, tmp_path):
    (train, _), (s_train, _) = both(tok, tmp_path, train_files=["samples/chat/train.jsonl"])
    store, index = train.corpus.stores[0], s_train.corpus.stores[0]
    index_bytes = sum(f.stat().st_size for f in index.folder.iterdir())
    store_bytes = sum(f.stat().st_size for f in store.folder.iterdir())
    per_doc = (index.folder / "index.bin").stat().st_size / len(index)
    print(f"streamed index {index_bytes} bytes vs prepared store {store_bytes} bytes "
          f"({len(index)} documents, {int(store.lengths.sum())} tokens)")
    assert per_doc == 32 and not (index.folder / "ids.bin").exists()
    assert index_bytes < store_bytes / 5


def test_a_second_build_reuses_the_index(tok, tmp_path):
    cfg = DataConfig(train_files=["samples/chat/train.jsonl"], streaming=True, cache_dir=str(tmp_path / "c"))
    build_datasets(cfg, tok)
    again, _ = build_datasets(cfg, tok)
    assert (again.report["cache_hits"], again.report["cache_misses"]) == (1, 0)


def test_a_record_changed_after_indexing_stops_the_read_naming_its_line(tok, tmp_path):
    source = tmp_path / "train.jsonl"
    shutil.copy("samples/chat/train.jsonl", source)
    cfg = DataConfig(train_files=[str(source)], streaming=True, cache_dir=str(tmp_path / "c"), shuffle=False)
    train, _ = build_datasets(cfg, tok)
    lines = source.read_text().splitlines(keepends=True)
    record = json.loads(lines[2])
    record["messages"][-1]["content"] += " And a few more words than before."
    lines[2] = json.dumps(record) + "\n"
    source.write_text("".join(lines))
    train[0]  # an unchanged line still reads
    with pytest.raises(DataError, match=rf"{source}:3: changed since data.streaming indexed it"):
        train[2]
    again, _ = build_datasets(cfg, tok)  # a new start indexes the changed file again
    assert again.report["cache_misses"] == 1 and "few more words" in tok.decode(again[2]["input_ids"])


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".csv", ".parquet", ".json"])
def test_a_source_that_cannot_be_entered_mid_file_is_refused_naming_it(tok, tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    if suffix == ".jsonl.gz":
        path.write_bytes(gzip.compress(Path("samples/chat/train.jsonl").read_bytes()))
    else:
        shutil.copy({".csv": FIX + "prompt_completion.csv", ".parquet": FIX + "chat.parquet",
                     ".json": FIX + "sharegpt.json"}[suffix], path)
    cfg = DataConfig(train_files=[str(path)], streaming=True, cache_dir=str(tmp_path / "c"))
    with pytest.raises(DataError, match=rf"{path}: data.streaming=true reads each record.*\.jsonl"):
        build_datasets(cfg, tok)
    root = RootConfig()
    root.data = cfg
    with pytest.raises(ValueError, match=rf"data.train_files: {path}: data.streaming=true"):
        validate(root, has_cuda=False)


def test_preference_data_is_not_streamed(tmp_path):
    root = RootConfig()
    root.objective.name, root.data.format = "dpo", "preference"
    root.data.train_files, root.data.streaming = ["samples/preference/train.jsonl"], True
    with pytest.raises(ValueError, match="data.streaming=true with objective=dpo"):
        validate(root, has_cuda=False)
