"""One-process checks of the checkpoint protocol: manifest, verification, fallback, rotation,
crash offsets (T3/T4), corruption (T6), the safe loader (T10), world-size planning (T5 refusal).

Checkpoints here are folders laid out like DeepSpeed's (real torch.save files), committed with the
real `write_manifest`; the distributed tests in test_reliability.py cover the same code on real runs.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from trainer import checkpoint
from trainer.checkpoint import CheckpointError

SHARDS = ("zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
          "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt",
          "rng_rank0.pt", "rng_rank1.pt")


def write_checkpoint(root: Path, step: int, commit: bool = True, value: float = 1.0) -> Path:
    """A checkpoint folder as `checkpoint.save` leaves it: shards, rng, state, manifest, latest."""
    folder = root / checkpoint.tag_for(step)
    folder.mkdir(parents=True)
    for i, name in enumerate(SHARDS):
        torch.save({"weights": torch.full((64,), value + i), "step": step}, folder / name)
    (folder / checkpoint.STATE).write_text(json.dumps({"step": step, "world_size": 2, "zero_stage": 3,
                                                       "global_batch": 8}))
    if commit:
        checkpoint.write_manifest(folder)
        (root / checkpoint.LATEST).write_text(folder.name)
    return folder


def resume_choice(root: Path) -> tuple[str | None, list[str]]:
    messages = []
    found = checkpoint.find_resume_checkpoint(root, log=messages.append)
    return (found.name if found else None), messages


# ---------------------------------------------------------------- manifest and fallback (T6)
def test_committed_checkpoint_verifies_and_is_chosen(tmp_path):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    assert checkpoint.verify(tmp_path / "step-00000004") is None
    assert resume_choice(tmp_path) == ("step-00000004", [])


def flip_one_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, expected", [
    ("truncate", "size"), ("missing", "missing"), ("manifest", "unreadable manifest"),
])
def test_damaged_newest_checkpoint_is_named_and_skipped(tmp_path, damage, expected):
    """What the launcher judges from the manifest alone (no file content read): a cut file, a missing
    one, a broken manifest. Content is the ranks' to check as they load (the next tests)."""
    write_checkpoint(tmp_path, 2)
    folder = write_checkpoint(tmp_path, 4)
    shard = folder / SHARDS[1]
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:-10])
    elif damage == "missing":
        shard.unlink()
    else:
        (folder / checkpoint.MANIFEST).write_text("{not json")
    chosen, messages = resume_choice(tmp_path)
    assert chosen == "step-00000002"
    assert any(expected in m and "step-00000004" in m for m in messages), messages
    if damage != "manifest":
        assert any(SHARDS[1] in m for m in messages), messages  # the error names the file


def test_a_flipped_bit_is_found_by_the_rank_that_checks_that_file(tmp_path):
    """Each rank checks its own stripe of the files against the manifest as it loads: the file is named
    by the rank whose stripe holds it, and by no other."""
    folder = write_checkpoint(tmp_path, 4)
    flip_one_bit(folder / SHARDS[1])
    files = sorted(p.name for p in folder.iterdir() if p.name != checkpoint.MANIFEST)
    owner = files.index(SHARDS[1]) % 2
    with pytest.raises(CheckpointError, match=f"{SHARDS[1]}: checksum mismatch"):
        checkpoint.preverify_loadable(folder, rank=owner, world_size=2)
    checkpoint.preverify_loadable(folder, rank=1 - owner, world_size=2)  # the other half is intact


def test_shardtune_verify_names_the_damaged_checkpoint_and_the_intact_one(tmp_path, capsys):
    from launcher.verify_cmd import main

    run_dir = tmp_path / "run"
    write_checkpoint(run_dir / "checkpoints", 2)
    assert main([str(run_dir)]) == 0
    flip_one_bit(write_checkpoint(run_dir / "checkpoints", 4) / SHARDS[1])
    assert main([str(run_dir)]) == 1
    out = capsys.readouterr().out
    assert f"step-00000004: BAD: {run_dir}/checkpoints/step-00000004/{SHARDS[1]}: checksum mismatch" in out, out
    assert "step-00000002: ok" in out and "resume=" in out and out.rstrip().endswith("step-00000002"), out


def test_files_hashed_while_written_match_their_content(tmp_path):
    """The save hashes each file as torch.save writes it (no read back); the manifest takes those."""
    import hashlib

    records = {}
    for zipfile in (True, False):  # DeepSpeed's checkpoint.use_zipfile_serialization (legacy: False)
        path = tmp_path / f"shard-{zipfile}.pt"
        weights = torch.randn(300, 7)
        checkpoint.save_recorded({"w": weights, "step": 3}, path, records, tmp_path, zipfile=zipfile)
        assert records[path.name] == {"size": path.stat().st_size,
                                      "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
        assert torch.equal(checkpoint.safe_load(path)["w"], weights)
    checkpoint.write_manifest(tmp_path, known=records)
    assert checkpoint.verify(tmp_path, deep=True) is None
    records[next(iter(records))]["size"] += 1  # a record the disk contradicts is refused, not written
    with pytest.raises(CheckpointError, match="bytes on disk"):
        checkpoint.write_manifest(tmp_path, known=records)


@pytest.mark.parametrize("latest", ["", "step-00000099", "dangling-link"])
def test_empty_or_dangling_latest_is_reported_and_ignored(tmp_path, latest):
    write_checkpoint(tmp_path, 2)
    pointer = tmp_path / checkpoint.LATEST
    pointer.unlink()
    if latest == "dangling-link":
        pointer.symlink_to(tmp_path / "nowhere")
    else:
        pointer.write_text(latest)
    chosen, messages = resume_choice(tmp_path)
    assert chosen == "step-00000002" and len(messages) == 1 and str(pointer) in messages[0]


def test_no_good_checkpoint_means_a_fresh_start(tmp_path):
    folder = write_checkpoint(tmp_path, 2)
    (folder / SHARDS[0]).write_bytes(b"")
    assert resume_choice(tmp_path)[0] is None


# ---------------------------------------------------------------- crash at any byte of a save (T3, T4)
def save_stream(folder: Path, root: Path) -> list[tuple[Path, bytes]]:
    """The writes `checkpoint.save` makes, in its order: shards and rng (ranks), state, manifest, latest."""
    order = [*SHARDS, checkpoint.STATE, checkpoint.MANIFEST]
    writes = [(folder / name, (folder / name).read_bytes()) for name in order]
    return writes + [(root / checkpoint.LATEST, folder.name.encode())]


def test_a_crash_at_any_offset_of_a_save_never_loses_the_previous_checkpoint(tmp_path):
    """Replay a real save byte by byte and cut it at 40 offsets (in every file, between files)."""
    template = write_checkpoint(tmp_path / "template", 4, value=7.0)
    stream = save_stream(template, tmp_path / "template")
    total = sum(len(data) for _, data in stream)
    offsets = sorted({int(total * i / 40) for i in range(40)} | {total})
    for offset in offsets:
        root = tmp_path / f"cut{offset}"
        write_checkpoint(root, 2)  # the previous complete checkpoint (keep_last=1 would keep only it)
        left = offset
        for path, data in stream:  # the files this far, the one being written cut short (harsher
            if left <= 0:          # than the real save, whose manifest goes through a .tmp rename)
                break
            target = root / path.relative_to(tmp_path / "template")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[:left])
            left -= len(data)
        chosen, _ = resume_choice(root)
        manifest_done = offset >= sum(len(d) for _, d in stream[:-1])
        assert chosen == ("step-00000004" if manifest_done else "step-00000002"), (offset, total)
        checkpoint.rotate(root, keep_last=1)
        assert checkpoint.verify(root / chosen) is None and len(checkpoint.committed_tags(root)) >= 1
    print(f"T3/T4: save cut at {len(offsets)} offsets of {total} bytes; every resume chose a complete checkpoint")


def test_rotation_keeps_newest_good_and_never_touches_other_folders(tmp_path):
    for step in (2, 4, 6, 8):
        write_checkpoint(tmp_path, step)
    (tmp_path / "step-00000010").mkdir()  # a save in progress (no manifest)
    mine = tmp_path / "my-notes"
    mine.mkdir()
    corrupt = tmp_path / "step-00000008" / SHARDS[0]
    corrupt.write_bytes(b"x")  # the newest is broken: it must not count as one kept
    checkpoint.rotate(tmp_path, keep_last=2)
    left = sorted(p.name for p in tmp_path.iterdir() if p.is_dir())
    assert left == ["my-notes", "step-00000004", "step-00000006", "step-00000008", "step-00000010"]


# ---------------------------------------------------------------- a full disk
def test_disk_space_is_judged_by_the_last_checkpoint_and_rotation_can_make_room(tmp_path):
    assert checkpoint.space_problem(tmp_path, "step-00000002", free_bytes=0) is None  # nothing to judge by yet
    for step in (2, 4):
        write_checkpoint(tmp_path, step)
    size = checkpoint.committed_size(tmp_path / "step-00000004")
    assert size == sum(p.stat().st_size for p in (tmp_path / "step-00000004").iterdir() if p.name != "MANIFEST.json")
    assert checkpoint.space_problem(tmp_path, "step-00000006", free_bytes=2 * size) is None
    problem = checkpoint.space_problem(tmp_path, "step-00000006", free_bytes=size // 2)
    assert "not enough disk space for checkpoint step-00000006" in problem
    assert "step-00000004 is intact" in problem and "checkpoint.keep_last=1" in problem
    # With keep_last set, make_room has already rotated all it could: keeping fewer is no advice.
    assert "keep_last" not in checkpoint.space_problem(tmp_path, "step-00000006", free_bytes=0, keep_last=2)

    messages = []
    assert not checkpoint.make_room(tmp_path, keep_last=0, log=messages.append)  # keep all: nothing to delete
    assert checkpoint.make_room(tmp_path, keep_last=2, log=messages.append)
    assert checkpoint.committed_tags(tmp_path) == ["step-00000004"]  # the newest always stays
    assert "removed step-00000002 before saving" in messages[0]
    assert not checkpoint.make_room(tmp_path, keep_last=1, log=messages.append)


def test_uncommitted_saves_are_removed_and_nothing_else(tmp_path):
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4, commit=False)  # a save cut short
    (tmp_path / "my-notes").mkdir()
    messages = []
    checkpoint.remove_uncommitted(tmp_path, log=messages.append)
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["my-notes", "step-00000002"]
    assert messages == ["removed step-00000004: an uncommitted checkpoint (a save that did not finish)"]


def test_a_failed_write_says_the_disk_is_full_and_what_survives(tmp_path):
    import errno

    write_checkpoint(tmp_path, 2)
    message = checkpoint.write_failure(tmp_path, "step-00000004", OSError(errno.ENOSPC, "No space left on device"))
    assert message.startswith("the disk is full: writing checkpoint step-00000004")
    assert "step-00000002 is intact and is what a rerun resumes from" in message


# ---------------------------------------------------------------- safety of loading (T10) and of saving (T8)
class Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    folder = write_checkpoint(tmp_path, 2)
    evil = folder / SHARDS[1]
    torch.save({"weights": torch.zeros(2), "payload": Exploit(marker)}, evil)
    checkpoint.write_manifest(folder)  # an attacker can forge a manifest too
    with pytest.raises(CheckpointError, match=SHARDS[1]) as refused:
        checkpoint.preverify_loadable(folder)
    assert "GLOBAL posix.system" in str(refused.value)  # says why
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps(Exploit(marker)))
    with pytest.raises(CheckpointError, match="raw.pkl"):
        checkpoint.safe_load(raw)
    assert not marker.exists()


def test_deepspeed_classes_in_the_allowlist_load():
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    import io

    buffer = io.BytesIO()
    torch.save({"stage": ZeroStageEnum.weights, "scaler": LossScaler(1.0),
                "param_slice_mappings": [{"w": fragment_address(numel=4, start=8)}]}, buffer)
    buffer.seek(0)
    loaded = checkpoint.safe_load(buffer)
    assert loaded["stage"] == ZeroStageEnum.weights and loaded["scaler"].cur_scale == 1.0
    assert loaded["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=8)


def test_nonfinite_tensors_are_found_by_name(tmp_path):
    path = tmp_path / "optim.pt"
    torch.save({"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}, "fp32": [torch.ones(2)]}, path)
    problem = checkpoint.check_finite_files([path])
    assert problem and "state.0.exp_avg" in problem and "optim.pt" in problem
    torch.save({"fp32": [torch.ones(2)], "step": torch.tensor(3)}, path)
    assert checkpoint.check_finite_files([path]) is None


def test_rng_state_round_trips_through_the_safe_loader(tmp_path):
    import random
    import numpy as np

    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    checkpoint.set_rng_state(checkpoint.safe_load(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


# ---------------------------------------------------------------- another world size (T5)
def test_global_batch_is_kept_or_the_change_refused(tmp_path):
    from launcher.resume import keep_global_batch
    from trainer.config import ConfigError, RootConfig

    cfg = RootConfig()
    cfg.train.micro_batch_size, cfg.train.grad_accum = 2, 1
    keep_global_batch(cfg, saved_global=8, world=1, folder=tmp_path)
    assert cfg.train.grad_accum == 4
    cfg.train.micro_batch_size = 3
    with pytest.raises(ConfigError, match=r"global batch is 8 samples.*micro_batch_size in \[1, 2, 4, 8\]"):
        keep_global_batch(cfg, saved_global=8, world=1, folder=tmp_path)


def test_a_node_waits_for_node_0s_universal_conversion_and_gives_up_when_nothing_moves(tmp_path):
    """No-ssh node launchers share run.dir: node 0 converts, the others wait (never two writers)."""
    import threading
    import time

    from trainer import universal

    source = write_checkpoint(tmp_path / "checkpoints", 4)
    out = universal.universal_folder(source)

    def node0_converts():  # the way to_universal writes: a .tmp folder, manifest last, renamed into place
        tmp = out.with_name(out.name + ".tmp")
        tmp.mkdir(parents=True)
        for i in range(3):
            time.sleep(0.5)
            torch.save({"weights": torch.zeros(8)}, tmp / f"part{i}.pt")
        checkpoint.write_manifest(tmp)
        os.replace(tmp, out)

    writer = threading.Thread(target=node0_converts)
    writer.start()
    said = []
    assert universal.wait_for_universal(source, timeout_s=10, log=said.append, poll_s=0.1) == out
    writer.join()
    assert said and "node 0" in said[0]

    other = write_checkpoint(tmp_path / "checkpoints", 8)  # nobody converts this one
    with pytest.raises(CheckpointError, match="no universal checkpoint appeared .* node 0's launcher converts"):
        universal.wait_for_universal(other, timeout_s=0.5, log=said.append, poll_s=0.1)


def test_watching_a_conversion_survives_its_folder_being_renamed_into_place(tmp_path):
    """CI once failed here: the .tmp folder was renamed while the waiting node listed it
    (FileNotFoundError from rglob). A writer renames a folder in a loop while we watch it."""
    import shutil
    import threading
    import time

    from trainer import universal

    tmp, out, stop = tmp_path / "u.tmp", tmp_path / "u", threading.Event()

    def churn():
        while not stop.is_set():
            (tmp / "zero").mkdir(parents=True)
            (tmp / "zero" / "part.pt").write_bytes(b"x")
            os.replace(tmp, out)
            shutil.rmtree(out)

    writer = threading.Thread(target=churn, daemon=True)
    writer.start()
    seen, deadline = 0, time.monotonic() + 60
    try:  # watch until the folder was seen many times, mid-churn (a loaded machine schedules the writer late)
        while seen < 200 and time.monotonic() < deadline:
            seen += universal._newest_change(tmp) > 0
    finally:
        stop.set()
        writer.join()
    assert seen >= 200, f"the watcher saw the folder {seen} times in 60 s: the race was not exercised"


def test_a_resume_with_another_model_or_adapter_is_refused_before_launch(tmp_path):
    """The checkpoint records what it holds; a launch that builds something else is stopped by the
    launcher with the differing keys (before: DeepSpeed's key-mismatch traceback on every rank, or,
    for a base model of the same shapes, a silent resume of the old weights)."""
    from helpers import shardtune
    from launcher.compose import compose

    lora = compose(["peft=lora", "peft.r=8", f"run.dir={tmp_path}"])
    folder = write_checkpoint(tmp_path / "checkpoints", 4)
    state = json.loads((folder / checkpoint.STATE).read_text())
    (folder / checkpoint.STATE).write_text(json.dumps({**state, "layout": checkpoint.layout_of(lora)}))
    checkpoint.write_manifest(folder)
    assert checkpoint.layout_problem(checkpoint.layout_of(lora), lora, folder) is None
    here, moved = (compose(["peft=lora", f"model.name_or_path={where}/llama-8b"], validate_files=False)
                   for where in ("/data/models", "/mnt/scratch"))
    assert checkpoint.layout_problem(checkpoint.layout_of(here), moved, folder) is None  # the same model, moved
    assert "model.name_or_path: saved 'builtin:tiny-llama', now 'llama-8b'" in \
        checkpoint.layout_problem(checkpoint.layout_of(lora), moved, folder)
    other_lr = compose(["peft=lora", "peft.r=8", "optim.lr=1e-3", "peft.alpha=64"])
    assert checkpoint.layout_problem(checkpoint.layout_of(lora), other_lr, folder) is None  # same parameters

    proc = shardtune("train", f"run.dir={tmp_path}", "peft=lora", "peft.r=16", "run.launch=dry_run")
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert "peft.r: saved 8, now 16" in proc.stdout and str(folder) in proc.stdout, proc.stdout[-2000:]
    proc = shardtune("train", f"run.dir={tmp_path}", "peft=none", "run.launch=dry_run")
    assert proc.returncode == 2 and "peft.method: saved 'lora', now 'none'" in proc.stdout, proc.stdout[-2000:]
    assert "peft.r" not in proc.stdout.split("cannot resume")[1].split("resume with")[0]  # only what applies
    proc = shardtune("train", f"run.dir={tmp_path}", "peft=lora", "peft.r=8", "run.launch=dry_run")
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_train_state_round_trips_and_reads_older_checkpoints(tmp_path):
    """One schema for what a checkpoint records (trainer/train_state.py): written once by the save,
    read by the worker, the launcher and export; a file from an older shardtune reads with defaults."""
    from trainer.train_state import TrainState

    state = TrainState(step=12, tokens_seen=3456, nonfinite_streak=1, skipped_steps=[7], data={"epoch": 0},
                       world_size=2, global_batch=8, layout={"peft.method": "lora"}, zero_stage=3)
    (tmp_path / checkpoint.STATE).write_text(state.to_json())
    assert TrainState.read(tmp_path) == state == checkpoint.read_state(tmp_path)
    (tmp_path / checkpoint.STATE).write_text(json.dumps({"step": 4, "tokens_seen": 10, "unknown_key": 1}))
    old = TrainState.read(tmp_path)
    assert (old.step, old.tokens_seen, old.world_size, old.zero_stage, old.skipped_steps) == (4, 10, None, None, [])


REAL_SAVE = """
import os, sys, torch, deepspeed
from pathlib import Path
from trainer import checkpoint
from trainer.distributed import DistInfo
from trainer.train_state import TrainState
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
model = torch.nn.Linear(8, 8)
engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                  config={"train_batch_size": 1, "zero_optimization": {"stage": int(sys.argv[3])}})
info, run_dir = DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")), Path(sys.argv[1])
folder = checkpoint.save(engine, run_dir, TrainState(step=1), info, keep_last=0)
print("committed", folder.name, checkpoint.verify(folder, deep=True))
with torch.no_grad():
    model.weight[2, 3] = float("nan")
try:
    checkpoint.save(engine, run_dir, TrainState(step=2), info, keep_last=0)
except checkpoint.CheckpointError as err:
    print("refused:", err)
print("committed now:", checkpoint.committed_tags(checkpoint.checkpoint_root(run_dir)))
"""


@pytest.mark.parametrize("stage", [0, 2])
def test_a_real_deepspeed_save_is_hashed_as_written_and_a_nan_weight_is_never_committed(tmp_path, stage):
    """The save through DeepSpeed's engine (one CPU rank): the manifest taken while writing agrees with
    the files (a deep verify), and a NaN in the weights, found in memory, stops the next save before
    its commit: the committed checkpoints stay [step 1]."""
    import subprocess
    import sys

    from helpers import REPO, subprocess_env
    from launcher.local import free_port

    proc = subprocess.run([sys.executable, "-c", REAL_SAVE, str(tmp_path / "run"), str(free_port()), str(stage)],
                          cwd=REPO, env=subprocess_env({"DS_ACCELERATOR": "cpu"}), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "committed step-00000001 None" in proc.stdout, proc.stdout
    assert "refused:" in proc.stdout and "non-finite values" in proc.stdout, proc.stdout
    print(next(line for line in proc.stdout.splitlines() if line.startswith("refused")))
    assert "committed now: ['step-00000001']" in proc.stdout, proc.stdout
