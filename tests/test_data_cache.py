"""The preparation cache: hit on the second run, miss when content changes, one preparer at a time."""
from __future__ import annotations

import json
import multiprocessing
import shutil
import time

import pytest

from trainer.config import DataConfig, ModelConfig
from trainer.data import build_datasets
from trainer.data.cache import get_or_prepare
from trainer.data.errors import DataError
from trainer.model import build_tokenizer


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


def test_second_run_hits_and_a_content_change_misses(tok, tmp_path):
    data = tmp_path / "chat.jsonl"
    shutil.copy("tests/fixtures/data/messages.jsonl", data)
    cfg = DataConfig(train_files=[str(data)], cache_dir=str(tmp_path / "cache"))
    first, _ = build_datasets(cfg, tok)
    second, _ = build_datasets(cfg, tok)
    assert (first.report["cache_misses"], second.report["cache_hits"]) == (1, 1)
    assert [second[i] for i in range(len(second))] == [first[i] for i in range(len(first))]
    data.write_text(data.read_text() + data.read_text().splitlines()[0] + "\n")  # same name, new content
    third, _ = build_datasets(cfg, tok)
    assert third.report["cache_misses"] == 1 and len(third) == len(first) + 1
    other, _ = build_datasets(DataConfig(train_files=[str(data)], cache_dir=cfg.cache_dir, loss_on="all"), tok)
    assert other.report["cache_misses"] == 1  # settings are part of the key


def _slow_prepare(root, key, marker):
    def prepare(folder):
        folder.mkdir(parents=True)
        time.sleep(1.5)
        with open(marker, "a") as handle:
            handle.write("prepared\n")
        (folder / "meta.json").write_text(json.dumps({"ok": True}))
    get_or_prepare(root, key, prepare, poll_s=0.05)


def test_one_process_prepares_the_others_wait(tmp_path):
    marker = tmp_path / "marker"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_slow_prepare, args=(tmp_path / "c", "k", marker)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert marker.read_text() == "prepared\n"  # exactly one preparer
    assert not (tmp_path / "c" / "k.lock").exists()


def test_a_waiter_gets_the_preparers_error_and_a_dead_holder_is_replaced(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    (root / "k.lock").write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 2 ** 22 + 7}))
    folder, hit = get_or_prepare(root, "k", lambda f: (f.mkdir(), (f / "meta.json").write_text("{}")), poll_s=0.01)
    assert folder.name == "k" and not hit  # the lock of a dead pid was taken over

    def failing(folder):
        raise DataError("a.jsonl:3", "malformed JSON", "malformed_json")
    with pytest.raises(DataError, match="a.jsonl:3"):
        get_or_prepare(root, "bad", failing)
    (root / "bad.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))  # a live holder on another node
    with pytest.raises(DataError, match="a.jsonl:3: malformed JSON"):
        get_or_prepare(root, "bad", failing, poll_s=0.01)


def test_a_damaged_cache_entry_is_prepared_again(tok, tmp_path):
    """A cached preparation truncated or half-deleted after it was made (a full disk, a cleanup
    script) is detected by its file sizes and made again, not read as garbage."""
    cfg = DataConfig(train_files=["tests/fixtures/data/messages.jsonl"], cache_dir=str(tmp_path / "cache"))
    first, _ = build_datasets(cfg, tok)
    expected = [first[i] for i in range(len(first))]
    del first  # it memory-maps the file damaged below
    ids = next((tmp_path / "cache").rglob("ids.bin"))
    ids.write_bytes(ids.read_bytes()[:-8])  # two tokens short
    messages = []
    again, _ = build_datasets(cfg, tok, log=messages.append)
    assert again.report["cache_misses"] == 1
    assert any("data cache entry damaged" in m and "ids.bin has" in m for m in messages), messages
    assert [again[i] for i in range(len(again))] == expected


def test_a_preparation_that_loses_the_race_to_another_uses_the_winners_entry(tmp_path):
    """Two waiters that judged a dead holder's lock stale at once both prepare; the second to finish
    found the folder taken (before: OSError 'Directory not empty' from the rename)."""
    root = tmp_path / "c"

    def prepare_while_another_finishes(folder):
        winner = root / "k"
        winner.mkdir()
        (winner / "meta.json").write_text(json.dumps({"by": "the other"}))
        folder.mkdir()
        (folder / "meta.json").write_text(json.dumps({"by": "us"}))
        (folder / "rows.bin").write_bytes(b"x")

    folder, hit = get_or_prepare(root, "k", prepare_while_another_finishes)
    assert hit and json.loads((folder / "meta.json").read_text()) == {"by": "the other"}
    assert sorted(p.name for p in root.iterdir()) == ["k"]  # our copy and the lock are gone


# ---------------------------------------------------------------- a preparer on another node (a lease)
def _as_node(name: str, target, *args):
    """Run `target` as if on host `name` (the lock names its holder's host)."""
    from trainer.data import cache

    cache.socket.gethostname = lambda: name
    target(*args)


def _prepare_forever(root, started):
    def prepare(folder):
        started.set()
        time.sleep(600)  # killed while holding the lock, renewing its lease
    get_or_prepare(root, "k", prepare, poll_s=0.05, lease_s=(0.1, 1.0))


def _prepare_quickly(root, marker):
    def prepare(folder):
        folder.mkdir()
        (folder / "meta.json").write_text("{}")
        marker.write_text("taken over\n")
    get_or_prepare(root, "k", prepare, poll_s=0.05, lease_s=(0.1, 1.0))


def test_a_preparer_killed_on_another_node_is_taken_over_once_its_lease_expires(tmp_path):
    """Node A dies (kill -9) while preparing; node B, waiting on the shared cache, cannot see A's pid:
    it takes over once A's lock has not been renewed for the lease (1 s here, 120 s by default)."""
    import os
    import signal

    ctx = multiprocessing.get_context("fork")
    started, marker = ctx.Event(), tmp_path / "marker"
    node_a = ctx.Process(target=_as_node, args=("node-a", _prepare_forever, tmp_path / "c", started))
    node_a.start()
    assert started.wait(30)
    node_b = ctx.Process(target=_as_node, args=("node-b", _prepare_quickly, tmp_path / "c", marker))
    node_b.start()
    time.sleep(1.5)  # A renews its lease meanwhile: B must still be waiting
    assert not marker.exists(), "node B took over a lock whose holder was alive"
    killed_at = time.monotonic()
    os.kill(node_a.pid, signal.SIGKILL)
    node_b.join(30)
    taken_after = time.monotonic() - killed_at
    print(f"node B took over {taken_after:.2f}s after node A was killed (lease 1 s)")
    assert node_b.exitcode == 0 and marker.read_text() == "taken over\n"
    assert 1.0 <= taken_after < 10 and (tmp_path / "c" / "k" / "meta.json").is_file()
    assert not (tmp_path / "c" / "k.lock").exists()
