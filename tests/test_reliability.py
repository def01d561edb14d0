"""Faults injected into real 2-rank DeepSpeed runs (tiny Llama, CPU, gloo): the table T0-T13 of
shared/notes/reliability.md (T7 data, T9 config and T11 Slurm live in their own test files).

Every test compares against one uninterrupted reference run (module fixture `reference`): 8 steps,
ZeRO-3, 2 ranks, a checkpoint every 2 steps. Faults are placed at known steps with
`train.fault_injection.pause_at_step` (a rank sleeps there and says so in its heartbeat), so the
test kills or signals it at that step instead of racing the loop.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, TINY, losses, metrics, train
from helpers import subprocess_env as child_env  # renamed: pytest would collect subprocess_env
import wandb_records as wandb_history  # test-only reader of W&B's offline files
from trainer import checkpoint
from trainer.control import EXIT_HUNG, EXIT_NONFINITE, EXIT_RESUME_ME, known_heartbeats
from trainer.run_dir import RunDir

pytestmark = pytest.mark.distributed

STEPS = 8
BASE = [*TINY, f"train.max_steps={STEPS}", "checkpoint.every_steps=2", "checkpoint.keep_last=0",
        "checkpoint.export_final=false", "eval.max_batches=1"]
EXACT = 1e-5  # same world size and stage: a resumed loss equals the uninterrupted one to this
RESHARDED = 1e-4  # another world size or stage: reductions run in another order
SENTINEL = "st-sentinel-0123456789abcdef0123456789abcdef"


# ---------------------------------------------------------------- helpers
def start(run_dir: Path, *overrides: str, env=None) -> subprocess.Popen:
    """`shardtune train` in the background, output to <run_dir>.log (read by `output`)."""
    log = open(f"{run_dir}.log", "w")
    return subprocess.Popen([sys.executable, "-m", "launcher.cli", "train", f"run.dir={run_dir}", *BASE, *overrides],
                            cwd=REPO, env=child_env(env), stdout=log, stderr=subprocess.STDOUT)


def output(run_dir: Path) -> str:
    return Path(f"{run_dir}.log").read_text()


def wait_for_beat(run_dir: Path, rank: int, phase=None, min_step: int = 0, timeout: float = 240) -> dict:
    """Poll rank `rank`'s heartbeat until it is in `phase` (any if None) at step >= min_step."""
    path = RunDir(run_dir).node_heartbeats / f"rank{rank}.json"  # a local launch: node-local heartbeats
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            beat = json.loads(path.read_text())
            if (phase is None or beat["phase"] == phase) and beat["step"] >= min_step:
                return beat
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"rank {rank} never reached phase {phase} step >= {min_step}:\n{output(run_dir)[-3000:]}")


def job_processes(run_dir: Path) -> list[str]:
    """Processes whose command line names this run directory (ranks, launchers): orphans if any."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in ps if str(run_dir) in line and "ps -eo" not in line]


def processes_left(run_dir: Path, within_s: float = 10.0) -> list[str]:
    """job_processes once they had `within_s` to go: a killed process lingers a moment on a busy host."""
    deadline = time.time() + within_s
    while (left := job_processes(run_dir)) and time.time() < deadline:
        time.sleep(0.2)
    return left


def run_ok(run_dir: Path, *overrides: str, env=None, expect: int = 0) -> subprocess.CompletedProcess:
    proc = train(run_dir, *BASE[len(TINY):], *overrides, env=env)
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect}):\n{proc.stdout[-5000:]}"
    return proc


def by_step(run_dir: Path) -> dict:
    return {r["step"]: r for r in metrics(run_dir)}


def max_loss_diff(run_dir: Path, reference: Path, steps) -> float:
    got, want = by_step(run_dir), by_step(reference)
    return max(abs(got[s]["loss"] - want[s]["loss"]) for s in steps)


def keep_only_checkpoint(source: Path, target: Path, step: int) -> None:
    """A copy of `source` whose only checkpoint is `step`: as if the run had died right after it."""
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("heartbeats", "control", "hydra"))
    root = checkpoint.checkpoint_root(target)
    for folder in root.glob("step-*"):
        if folder.name != checkpoint.tag_for(step):
            shutil.rmtree(folder)
    (root / "latest").write_text(checkpoint.tag_for(step))


def fp32_state(folder: Path) -> dict:
    """Every tensor of every optimizer shard of a checkpoint (fp32 master weights and Adam moments)."""
    tensors = {}

    def walk(obj, name):
        import torch
        if isinstance(obj, torch.Tensor) and obj.is_floating_point():
            tensors[name] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(v, f"{name}.{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(v, f"{name}[{i}]")

    for path in sorted(folder.glob("*optim_states.pt")):
        walk(checkpoint.safe_load(path), path.name)
    return tensors


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    Path(f"{run_dir}.log").write_text(run_ok(run_dir).stdout)  # read by `output(reference)`
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    return run_dir


# ---------------------------------------------------------------- T0
def test_t0_identical_runs_are_identical(reference, tmp_path):
    run_ok(tmp_path / "again")
    diff = max(abs(a - b) for a, b in zip(losses(reference), losses(tmp_path / "again")))
    print(f"T0: largest per-step loss difference between two identical runs: {diff:.2e}")
    assert len(losses(tmp_path / "again")) == STEPS and diff <= 1e-6
    mine = fp32_state(checkpoint.checkpoint_root(tmp_path / "again") / checkpoint.tag_for(STEPS))
    theirs = fp32_state(checkpoint.checkpoint_root(reference) / checkpoint.tag_for(STEPS))
    assert mine.keys() == theirs.keys() and mine
    weight_diff = max(float((mine[k] - theirs[k]).detach().abs().max()) for k in mine)
    print(f"T0: largest difference of final weights and optimizer state: {weight_diff:.2e}")
    assert weight_diff == 0.0


# ---------------------------------------------------------------- T1 + T3 + T10 + T13
def test_t1_kill9_one_rank_then_resume_exactly(reference, tmp_path):
    """kill -9 rank 1 in step 6 (checkpoints 2 and 4 committed, steps 1-5 logged to W&B offline), with a
    sentinel WANDB_API_KEY; then plant a partial step-6 checkpoint that `latest` names, and resume."""
    run_dir = tmp_path / "killed"
    env = {"WANDB_API_KEY": SENTINEL, "WANDB_MODE": "offline"}
    wandb = ["logger=wandb", "logger.mode=offline"]
    job = start(run_dir, *wandb, "+train.fault_injection.pause_at_step=6", "+train.fault_injection.pause_rank=1",
                "+train.fault_injection.pause_seconds=300", env=env)
    beat = wait_for_beat(run_dir, rank=1, phase="paused")
    os.kill(beat["pid"], signal.SIGKILL)
    killed_at = time.time()
    code = job.wait(timeout=120)
    exit_s = time.time() - killed_at
    leftovers = processes_left(run_dir)
    print(f"T1: launcher exited {code} {exit_s:.1f}s after kill -9 of rank 1; {len(leftovers)} processes left")
    assert code != 0 and exit_s <= 30 and leftovers == [], output(run_dir)[-3000:]

    # T3: a crash mid-save of step 6 (shards written, no manifest) and `latest` already naming it.
    root = checkpoint.checkpoint_root(run_dir)
    partial = root / checkpoint.tag_for(6)
    shutil.copytree(root / checkpoint.tag_for(4), partial, ignore=shutil.ignore_patterns(checkpoint.MANIFEST))
    (root / "latest").write_text(partial.name)

    resumed = run_ok(run_dir, *wandb, env=env)
    assert f"resumed from {root / checkpoint.tag_for(4)} at step 4" in resumed.stdout
    saves = re.findall(r"committed in ([0-9.]+)s \(([0-9.]+) MiB\)", output(run_dir) + resumed.stdout)
    load_s = re.search(r"at step 4 \(loaded in ([0-9.]+)s\)", resumed.stdout).group(1)
    print(f"T1: checkpoint of the tiny model (2 ranks, ZeRO-3): {saves[0][1]} MiB, saved and committed in "
          f"{min(float(t) for t, _ in saves):.2f}-{max(float(t) for t, _ in saves):.2f}s ({len(saves)} saves), "
          f"verified and loaded in {load_s}s")
    assert "skipping checkpoint step-00000006" in resumed.stdout and "no MANIFEST.json" in resumed.stdout
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    diff = max_loss_diff(run_dir, reference, range(1, STEPS + 1))
    print(f"T1: largest loss difference vs the uninterrupted run after kill -9 + resume: {diff:.2e}")
    assert diff <= EXACT
    # Every step trained on the same samples: same token count per step, same total.
    assert [r["step_tokens"] for r in metrics(run_dir)] == [r["step_tokens"] for r in metrics(reference)]
    assert metrics(run_dir)[-1]["tokens"] == metrics(reference)[-1]["tokens"]

    # T13: one W&B run id, steps strictly increasing across both launches, none duplicated.
    run_ids = {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert run_ids == {(run_dir / "wandb_run_id").read_text().strip()}
    steps = wandb_history_steps(run_dir)
    print(f"T13: W&B steps over {len(list((run_dir / 'wandb').glob('offline-run-*')))} launches: {steps}")
    assert steps == list(range(1, STEPS + 1))  # strictly increasing, none duplicated, none lost

    # T10: the sentinel API key is nowhere in the run directory, the logs or the W&B files.
    hits = sentinel_hits(run_dir) + output(run_dir).count(SENTINEL) + resumed.stdout.count(SENTINEL)
    print(f"T10: sentinel WANDB_API_KEY found {hits} times")
    assert hits == 0


def wandb_history_steps(run_dir: Path) -> list[int]:
    """The step of every history row in the offline W&B folders `wandb sync` uploads, in launch order."""
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    # Launch 1 was killed before W&B confirmed its steps: its folder is set aside, launch 2 logs them again.
    assert len(list((run_dir / "wandb").glob(f"interrupted-offline-run-*-{run_id}"))) == 1
    assert len(wandb_history.run_files(run_dir / "wandb", run_id)) == 1
    return wandb_history.run_history_steps(run_dir / "wandb", run_id)


def sentinel_hits(run_dir: Path) -> int:
    return sum(p.read_bytes().count(SENTINEL.encode()) for p in run_dir.rglob("*") if p.is_file())


def test_a_killed_launcher_leaves_no_rank_training_and_a_relaunch_waits_for_them(reference, tmp_path):
    """kill -9 of the launcher itself (its ranks run in a session of their own): the ranks notice,
    checkpoint and exit; while they live, a second launch into the same run directory is refused."""
    run_dir = tmp_path / "orphaned"
    # The pause (at most 100 s) ends when the ranks see their launcher gone.
    job = start(run_dir, "+train.fault_injection.pause_at_step=4", "+train.fault_injection.pause_seconds=100")
    beat = wait_for_beat(run_dir, rank=0, phase="paused")
    second = run_ok(run_dir, expect=2)
    assert "is in use by" in second.stdout and f"pid {beat['pid']}:" in second.stdout, second.stdout[-3000:]
    job.kill()  # SIGKILL: no handler runs, nothing is forwarded
    job.wait()
    killed_at = time.time()
    leftovers = processes_left(run_dir, within_s=90)
    gone_s = time.time() - killed_at
    text = output(run_dir)
    stopped = re.search(r"stopped at step (\d+) \(the launcher \(\S+\) is gone\); checkpoint saved", text)
    print(f"orphans: ranks of a kill -9'd launcher gone {gone_s:.1f}s later, "
          f"{stopped.group(0) if stopped else 'no stop message'}")
    assert leftovers == [] and stopped, text[-3000:]
    step = int(stopped.group(1))
    assert checkpoint.committed_tags(checkpoint.checkpoint_root(run_dir))[0] == checkpoint.tag_for(step)
    resumed = run_ok(run_dir)
    assert f"at step {step}" in resumed.stdout
    assert max_loss_diff(run_dir, reference, range(1, STEPS + 1)) <= EXACT


# ---------------------------------------------------------------- T2
def test_t2_signals_stop_all_ranks_at_one_step_and_lose_nothing(reference, tmp_path):
    """SIGUSR1 to the job (the launcher) in step 3; resume; SIGTERM to rank 1 alone in step 6.

    The second launch is the resume of the first: its steps 4-6 must equal the uninterrupted run's.
    """
    run_dir = tmp_path / "signalled"
    root = checkpoint.checkpoint_root(run_dir)
    for step, target, sig in ((3, "job", signal.SIGUSR1), (6, "rank", signal.SIGTERM)):
        job = start(run_dir, f"+train.fault_injection.pause_at_step={step}", "+train.fault_injection.pause_rank=1",
                    "+train.fault_injection.pause_seconds=60")  # until the signal's stop request
        beat = wait_for_beat(run_dir, rank=1, phase="paused", min_step=step - 1)
        os.kill(job.pid if target == "job" else beat["pid"], sig)
        signalled_at = time.time()
        code = job.wait(timeout=240)
        manifest = root / checkpoint.tag_for(step) / checkpoint.MANIFEST
        assert code == EXIT_RESUME_ME and manifest.is_file(), f"exit {code}\n{output(run_dir)[-3000:]}"
        print(f"T2: {sig.name} to the {target} in step {step}: exit {code}, checkpoint committed "
              f"{manifest.stat().st_mtime - signalled_at:.1f}s after the signal")
        assert checkpoint.verify(manifest.parent) is None
        assert checkpoint.read_state(manifest.parent).step == step
        beats = known_heartbeats(run_dir)  # the launcher's last summary: the node-local files are gone
        assert {(b["step"], b["phase"]) for b in beats} == {(step, "done")}, beats  # both ranks, same step
        assert [r["step"] for r in metrics(run_dir)] == list(range(1, step + 1))  # 0 steps lost
        if step == 6:  # the second launch resumed exactly where the signal stopped the first
            assert f"resumed from {root / checkpoint.tag_for(3)} at step 3" in output(run_dir)
    diff = max_loss_diff(run_dir, reference, range(1, 7))
    print(f"T2: largest loss difference vs the uninterrupted run, steps 1-6 over a stop and a resume: {diff:.2e}")
    assert diff <= EXACT


# ---------------------------------------------------------------- T5
def test_t5_resume_on_another_world_size_and_stage(reference, tmp_path):
    """2 ranks ZeRO-3 -> 1 rank ZeRO-2 from step 4; that run's step-6 checkpoint -> 2 ranks ZeRO-3.

    Each direction crosses both the world size and the ZeRO stage (the universal checkpoint is
    converted by the launcher), and both continue the reference run's loss curve.
    """
    down = tmp_path / "two-to-one"
    keep_only_checkpoint(reference, down, 4)
    proc = run_ok(down, "cluster.nproc_per_node=1", "deepspeed=zero2")
    assert "train.grad_accum 1 -> 2" in proc.stdout and "universal" in proc.stdout
    diff_down = max_loss_diff(down, reference, range(5, STEPS + 1))

    up = tmp_path / "one-to-two"
    keep_only_checkpoint(down, up, 6)
    proc = run_ok(up, "train.grad_accum=2")  # 2 ranks x 2 x 2 = 8 != 4: the launcher corrects it
    assert "train.grad_accum 2 -> 1" in proc.stdout and "saved on 1 rank(s) with ZeRO-2" in proc.stdout
    diff_up = max_loss_diff(up, reference, range(7, STEPS + 1))
    # The gradient norms show that the arithmetic really changed (other reduction order), not only the labels.
    norm_diff = max(abs(by_step(down)[s]["grad_norm"] - by_step(reference)[s]["grad_norm"]) for s in range(5, 9))
    print(f"T5: largest loss difference vs the unchanged 2-rank ZeRO-3 run: 2->1 ranks (ZeRO-3 -> ZeRO-2), "
          f"steps 5-8: {diff_down:.2e}; then 1->2 ranks (ZeRO-2 -> ZeRO-3), steps 7-8: {diff_up:.2e} "
          f"(gradient norms differ by up to {norm_diff:.1e})")
    assert max(diff_down, diff_up) <= RESHARDED
    assert [r["step"] for r in metrics(up)] == list(range(1, STEPS + 1))


# ---------------------------------------------------------------- T8
def test_t8_nonfinite_loss_and_gradients_are_skipped_then_abort(tmp_path):
    """NaN loss on rank 1 only in step 2, inf gradients (finite loss) in step 4, NaN in steps 6-8: abort."""
    run_dir = tmp_path / "nan"
    proc = run_ok(run_dir, "checkpoint.every_steps=1", "train.max_nonfinite_steps=3",
                  "+train.fault_injection.nan_at_step=[2,6,7,8]", "+train.fault_injection.nan_rank=1",
                  "+train.fault_injection.inf_grad_at_step=4", expect=EXIT_NONFINITE)
    records = by_step(run_dir)
    skipped = [s for s, r in records.items() if r["skipped"]]
    print(f"T8: skipped steps {skipped}; aborted with exit {proc.returncode}")
    assert skipped == [2, 4, 6, 7] and 8 not in records
    assert "aborting: 3 non-finite steps in a row (last step 8)" in proc.stdout
    assert all(math.isfinite(records[s]["loss"]) for s in (1, 3, 5))
    root = checkpoint.checkpoint_root(run_dir)
    states = {s: fp32_state(root / checkpoint.tag_for(s)) for s in range(1, 8)}
    for before, after in ((1, 2), (3, 4)):  # a skipped step leaves the weights as they were
        weights = [k for k in states[after] if "fp32" in k or "single_partition" in k]
        assert weights and all(bool((states[after][k] == states[before][k]).all()) for k in weights)
    bad = [name for s in states for name, t in states[s].items() if not bool(t.isfinite().all())]
    print(f"T8: {sum(len(v) for v in states.values())} tensors in 7 checkpoints, {len(bad)} non-finite")
    assert bad == []


# ---------------------------------------------------------------- T12
@pytest.mark.parametrize("phase", ["training", "setup:model"])
def test_t12_a_stopped_rank_fails_the_job_naming_it(tmp_path, phase):
    """SIGSTOP of rank 1 while it trains, or while it loads its model (a set-up phase kept alive by a
    thread for up to cluster.setup_timeout_s, since it cannot report progress: SIGSTOP stops that too)."""
    run_dir = tmp_path / "hung"
    timeout_s = 20  # a healthy rank may be silent for seconds on a loaded machine
    slow_load = ["+train.fault_injection.setup_delay_s=300", "+train.fault_injection.setup_delay_rank=1"]
    job = start(run_dir, "train.max_steps=400", "checkpoint.every_steps=0", f"cluster.heartbeat_timeout_s={timeout_s}",
                *(slow_load if phase != "training" else []))
    beat = wait_for_beat(run_dir, rank=1, min_step=3) if phase == "training" else wait_for_beat(run_dir, 1, phase)
    os.kill(beat["pid"], signal.SIGSTOP)
    stopped_at = time.time()
    code = job.wait(timeout=120)
    exit_s = time.time() - stopped_at
    leftovers = processes_left(run_dir)
    text = output(run_dir)
    print(f"T12: SIGSTOP rank 1 at step {beat['step']}, phase {beat['phase']}: job ended {exit_s:.1f}s later "
          f"(timeout {timeout_s}s), exit {code}; {len(leftovers)} processes left")
    assert code == EXIT_HUNG and exit_s <= timeout_s + 20 and leftovers == []
    stuck = text[text.index("stuck: "):].splitlines()[0]
    assert "rank 1 " in stuck and "stopped" in stuck and "at step" in stuck, text[-3000:]
    if phase != "training":
        assert f"phase {phase}" in stuck, stuck


def test_a_generation_slower_than_the_silence_limit_is_not_a_hang(tmp_path):
    """Under ZeRO-3 every generated token gathers the whole model: a large model's baseline generation
    outlasted the silence limit and the job was ended at step 0 (exit 4) while nothing was stuck. Each
    token now tells the heartbeat; here every token takes 1 s against a 6 s limit, and the run finishes.
    The model load (a set-up phase, which cannot report progress) takes 10 s too: a keepalive covers it.
    (A rank that truly stops is still named within the limit: T12.)"""
    run_dir, limit_s = tmp_path / "slow", 6
    proc = run_ok(run_dir, "train.max_steps=2", "eval.baseline=false", "eval.prompts=[Hello]", "eval.prompts_file=null",
                  "eval.max_new_tokens=10", f"cluster.heartbeat_timeout_s={limit_s}",
                  "+train.fault_injection.token_delay_s=1", "+train.fault_injection.setup_delay_s=10")
    evals = metrics(run_dir, "eval")
    print(f"slow generation: eval phases of {[round(r['eval_time_s'], 1) for r in evals]} s, limit {limit_s} s")
    assert evals and all(r["eval_time_s"] > limit_s for r in evals), evals
    assert "no heartbeat" not in proc.stdout and "stuck" not in proc.stdout


def test_a_save_slower_than_the_collective_timeout_on_one_rank_is_not_a_failure(tmp_path):
    """One rank's disk is slow: its synchronous checkpoint files take longer to write than
    cluster.timeout_s. The other ranks wait for it in patient barriers (the process group's store,
    polled), not in a collective that would end the job at the timeout (DeepSpeed's barrier at the
    end of save_checkpoint did)."""
    run_dir, timeout_s = tmp_path / "slowdisk", 15
    started = time.time()
    proc = run_ok(run_dir, "train.max_steps=2", "checkpoint.every_steps=2", f"cluster.timeout_s={timeout_s}",
                  "+train.fault_injection.save_write_delay_s=8", "+train.fault_injection.save_write_delay_rank=1")
    committed = checkpoint.committed_tags(checkpoint.checkpoint_root(run_dir))
    print(f"slow disk on rank 1: run took {time.time() - started:.0f}s with {timeout_s}s collective timeout; "
          f"committed {committed}")
    assert committed == [checkpoint.tag_for(2)], proc.stdout[-3000:]
    assert "imed out" not in proc.stdout and "stuck" not in proc.stdout


# ---------------------------------------------------------------- asynchronous checkpoints
def test_an_async_save_gives_the_same_run_and_stalls_training_less(reference, tmp_path):
    """checkpoint.async_save=true: the same losses, final weights and committed checkpoints as the
    reference's synchronous saves; training stalls only for the copy to host memory."""
    run_dir = tmp_path / "async"
    proc = run_ok(run_dir, "checkpoint.async_save=true")
    assert max_loss_diff(run_dir, reference, range(1, STEPS + 1)) <= EXACT
    root, reference_root = checkpoint.checkpoint_root(run_dir), checkpoint.checkpoint_root(reference)
    assert checkpoint.committed_tags(root) == checkpoint.committed_tags(reference_root)
    mine, theirs = fp32_state(root / checkpoint.tag_for(STEPS)), fp32_state(reference_root / checkpoint.tag_for(STEPS))
    assert mine.keys() == theirs.keys() and all(bool((mine[k] == theirs[k]).all()) for k in mine)
    stalls = [float(x) for x in re.findall(r"training stalled ([0-9.]+)s", proc.stdout)]
    sync = [float(x) for x in re.findall(r"committed in ([0-9.]+)s", output(reference))]
    print(f"async save: training stalled {[f'{x:.3f}' for x in stalls]} s per save; the reference run's "
          f"synchronous saves: {[f'{x:.3f}' for x in sync]} s")
    assert len(stalls) == len(sync) == STEPS // 2  # steps 2, 4, 6, 8


def test_a_kill_during_a_background_write_resumes_from_the_last_commit(reference, tmp_path):
    """kill -9 of every process of the job while step 4's files are being written in the background
    (a slow disk: each file waits 2 s): step 4 was never committed, so the resume takes step 2 and
    continues the uninterrupted curve exactly."""
    run_dir = tmp_path / "killed"
    job = start(run_dir, "checkpoint.async_save=true", "+train.fault_injection.save_write_delay_s=2")
    root = checkpoint.checkpoint_root(run_dir)
    deadline = time.time() + 240
    while not ((root / checkpoint.tag_for(2) / checkpoint.MANIFEST).is_file()
               and (root / checkpoint.tag_for(4)).is_dir()) and time.time() < deadline:
        time.sleep(0.1)
    assert not (root / checkpoint.tag_for(4) / checkpoint.MANIFEST).exists(), output(run_dir)[-3000:]
    for line in job_processes(run_dir):
        os.kill(int(line.split()[0]), signal.SIGKILL)
    job.kill()
    job.wait(timeout=60)
    assert processes_left(run_dir) == []
    assert checkpoint.committed_tags(root) == [checkpoint.tag_for(2)], list(root.iterdir())
    resumed = run_ok(run_dir, "checkpoint.async_save=true")
    assert f"resumed from {root / checkpoint.tag_for(2)} at step 2" in resumed.stdout, resumed.stdout[-3000:]
    assert "removed step-00000004: an uncommitted checkpoint" in resumed.stdout + output(run_dir)
    diff = max_loss_diff(run_dir, reference, range(1, STEPS + 1))
    print(f"async save killed mid-write: resumed from step 2, largest loss difference vs uninterrupted {diff:.2e}")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1)) and diff <= EXACT


# ---------------------------------------------------------------- a full disk
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of a size the test sets (mount -o remount,size=...): a disk that really fills."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.strip()}")

    def resize(size_bytes: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(mount)], check=True)

    try:
        yield mount, resize
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_stops_with_the_reason_and_loses_no_committed_checkpoint(reference, small_disk):
    mount, resize = small_disk
    run_dir = mount / "run"
    stop_at_4 = "+train.fault_injection.stop_at_step=4"  # the first part of the run: steps 1-4, then "resume me"
    # The first save does not fit (4 MiB; a checkpoint here is ~7 MiB): it fails part-way, and says so.
    proc = run_ok(run_dir, stop_at_4, expect=1)
    assert "the disk is full: writing checkpoint step-00000002" in proc.stdout, proc.stdout[-4000:]
    assert "no earlier checkpoint exists" in proc.stdout
    assert "Error executing job" not in proc.stdout  # the launcher itself did not crash (exit.json unwritable)

    resize(64 << 20)  # room made: the same command starts again; the partial save is cleared away
    proc = run_ok(run_dir, stop_at_4, expect=EXIT_RESUME_ME)
    assert "removed step-00000002: an uncommitted checkpoint" in proc.stdout
    root = checkpoint.checkpoint_root(run_dir)
    size = checkpoint.committed_size(root / "step-00000004")
    used = sum(p.stat().st_size for p in mount.rglob("*") if p.is_file())

    # Room for half a checkpoint more, and keep_last=0 keeps every checkpoint (none may be rotated
    # out early to make room): step 6 is refused before anything is written.
    resize(used + size // 2)
    proc = run_ok(run_dir, "checkpoint.keep_last=0", expect=1)
    assert "not enough disk space for checkpoint step-00000006" in proc.stdout, proc.stdout[-4000:]
    assert checkpoint.committed_tags(root) == ["step-00000004", "step-00000002"]
    assert not (root / "step-00000006").exists()
    assert all(checkpoint.verify(root / tag) is None for tag in checkpoint.committed_tags(root))

    proc = run_ok(run_dir, "checkpoint.keep_last=1")  # the advice in the message: keep fewer
    assert "removed step-00000002 before saving rather than after" in proc.stdout
    assert checkpoint.committed_tags(root) == [checkpoint.tag_for(STEPS)]
    diff = max_loss_diff(run_dir, reference, range(1, STEPS + 1))
    print(f"full disk: refused at step 6 with about {size // 2} bytes free for a {size}-byte checkpoint; resumed to step "
          f"{STEPS}; largest loss difference from the uninterrupted run {diff:.1e}")
    assert diff <= EXACT
