"""One-process checks of the heartbeat watchdog's judgement (the real hang is T12 in test_reliability)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from trainer.control import describe_stragglers, likely_stuck, process_state, stale_ranks


def write_beat(run_dir, rank, step, phase, age_s, pid):
    folder = run_dir / "heartbeats"
    folder.mkdir(exist_ok=True)
    (folder / f"rank{rank}.json").write_text(json.dumps({"rank": rank, "step": step, "phase": phase,
                                                         "time": time.time() - age_s, "pid": pid}))


def test_a_stopped_rank_is_named_even_when_it_is_not_behind(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        os.kill(sleeper.pid, signal.SIGSTOP)
        deadline = time.time() + 10  # the state changes once the kernel delivers the signal
        while process_state(sleeper.pid) != "stopped" and time.time() < deadline:
            time.sleep(0.05)
        assert process_state(sleeper.pid) == "stopped"
        write_beat(tmp_path, 0, 5, "backward", age_s=20, pid=os.getpid())  # waiting in a collective
        write_beat(tmp_path, 1, 5, "forward", age_s=15, pid=sleeper.pid)
        stale = stale_ranks(tmp_path, timeout_s=10)
        assert [b["rank"] for b in stale] == [0, 1]
        assert [b["rank"] for b in likely_stuck(stale)] == [1]
        assert "likely stuck: rank 1 (pid %d, stopped)" % sleeper.pid in describe_stragglers(tmp_path)
    finally:
        sleeper.kill()


def test_finished_fresh_and_dead_ranks_are_not_stale(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    write_beat(tmp_path, 0, 8, "done", age_s=500, pid=os.getpid())
    write_beat(tmp_path, 1, 8, "forward", age_s=1, pid=os.getpid())
    write_beat(tmp_path, 2, 3, "forward", age_s=500, pid=dead.pid)
    assert stale_ranks(tmp_path, timeout_s=10) == []
    assert [b["rank"] for b in likely_stuck([json.loads(p.read_text()) for p in
                                             sorted((tmp_path / "heartbeats").glob("*.json"))])] == [2]


def test_a_dead_launcher_is_noticed_only_on_its_own_host(tmp_path, monkeypatch):
    from trainer.control import LAUNCHER_ENV, StopRequest, launcher_gone, launcher_identity

    host = launcher_identity().rsplit(":", 1)[0]
    finished = subprocess.Popen(["true"])
    finished.wait()  # reaped: its pid is gone
    assert launcher_gone(f"{host}:{finished.pid}")
    assert not launcher_gone(launcher_identity())  # alive: this process
    assert not launcher_gone(f"another-host:{finished.pid}")  # a pid on another machine says nothing here
    assert not launcher_gone(None)  # started by the user's own deepspeed/torchrun
    monkeypatch.setenv(LAUNCHER_ENV, f"{host}:{finished.pid}")
    stop = StopRequest(tmp_path)
    assert stop.requested() and stop.reason() == f"the launcher ({host}:{finished.pid}) is gone"


def test_processes_of_a_run_are_found_by_their_run_dir(tmp_path):
    import sys

    from trainer.control import processes_of_run

    mine, other = tmp_path / "run2", tmp_path / "run"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--run-dir", str(mine)])
    try:
        time.sleep(0.3)
        assert [pid for pid, _ in processes_of_run(mine)] == [sleeper.pid]
        assert processes_of_run(other) == []  # "run" is a prefix of "run2", not the same run
    finally:
        sleeper.kill()
        sleeper.wait()
    assert processes_of_run(mine) == []


def test_a_no_ssh_node_launcher_does_not_count_its_peer_nodes_on_the_same_host(tmp_path):
    """Two no-ssh node launchers on one host: node 1's ranks are not 'an earlier launch' to node 0
    (CI once saw node 0 refused this way and node 1 wait 120 s for it), but a leftover of node 0 is."""
    import os
    import sys

    from trainer.control import NODE_ENV, node_identity, processes_of_run

    run = tmp_path / "run"
    node1 = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "--run-dir", str(run)],
                             env={**os.environ, NODE_ENV: node_identity("127.0.0.1", 29511, 1)})
    try:
        time.sleep(0.3)
        assert processes_of_run(run, node_identity("127.0.0.1", 29511, 0)) == []  # a peer of this world
        assert [pid for pid, _ in processes_of_run(run, node_identity("127.0.0.1", 29511, 1))] == [node1.pid]
        assert [pid for pid, _ in processes_of_run(run, node_identity("127.0.0.1", 29600, 0))] == [node1.pid]
        assert [pid for pid, _ in processes_of_run(run)] == [node1.pid]  # a single-node launch counts all
    finally:
        node1.kill()
        node1.wait()


def test_a_crash_while_shutting_down_after_a_finished_run_is_not_a_failure(tmp_path):
    from launcher.local import exit_code

    (tmp_path / "control").mkdir()
    (tmp_path / "control" / "exit.json").write_text(json.dumps({"code": 0, "detail": ""}))
    write_beat(tmp_path, 0, 8, "done", age_s=1, pid=os.getpid())
    write_beat(tmp_path, 1, 8, "checkpoint", age_s=1, pid=os.getpid())
    assert exit_code(tmp_path, 250) == 250  # a rank had not finished: a failure
    write_beat(tmp_path, 1, 8, "done", age_s=1, pid=os.getpid())
    assert exit_code(tmp_path, 250) == 0  # every rank finished; one aborted in teardown
    (tmp_path / "control" / "exit.json").write_text("")  # cut short (a full disk)
    assert exit_code(tmp_path, 1) == 1


def test_an_exit_record_cut_short_reads_as_none_and_a_sweep_trial_as_failed(tmp_path):
    from launcher.sweep_cmd import current_status
    from trainer.control import EXIT_HUNG, control_dir, record_exit, recorded_exit

    assert recorded_exit(tmp_path) is None
    record_exit(tmp_path, EXIT_HUNG, "rank 1 silent")
    assert recorded_exit(tmp_path) == EXIT_HUNG
    assert not list(control_dir(tmp_path).glob("*.tmp"))  # written through a temporary file, then renamed
    (control_dir(tmp_path) / "exit.json").write_text('{"code": ')  # what a full disk leaves
    assert recorded_exit(tmp_path) is None
    assert current_status({"status": "submitted"}, tmp_path) == "failed"


def test_a_second_launch_is_refused_while_the_first_launcher_holds_the_run_lock(tmp_path):
    """Two launches in the same second both find no live rank yet; the lock lets only one through."""
    import os
    import socket

    from helpers import shardtune
    from launcher.app import launch_lock

    with launch_lock(tmp_path):
        proc = shardtune("train", f"run.dir={tmp_path}", "run.launch=dry_run")
        assert proc.returncode == 2, proc.stdout[-2000:]
        assert f"in use by the launch of {socket.gethostname()}:{os.getpid()}" in proc.stdout, proc.stdout[-2000:]
        assert not (tmp_path / "config.yaml").exists()  # the refused launch wrote nothing
        with launch_lock(tmp_path, shared_by_nodes=True):  # no-ssh node launchers take none
            pass
    proc = shardtune("train", f"run.dir={tmp_path}", "run.launch=dry_run")
    assert proc.returncode == 0, proc.stdout[-2000:]


def test_keepalive_keeps_a_long_save_alive_up_to_its_limit(tmp_path):
    """A checkpoint save of a large model beats once, then writes for minutes: the watchdog took
    that for a hang (heartbeat_timeout_s) and killed a healthy job. The keepalive touches the
    heartbeat meanwhile, but only up to its limit: a save stuck for good still goes silent."""
    from trainer.control import Heartbeat

    def beat_time():
        return json.loads((tmp_path / "heartbeats" / "rank0.json").read_text())["time"]

    heartbeat = Heartbeat(tmp_path, 0, write_every_s=0.05)
    heartbeat.beat(4, "checkpoint")
    first = beat_time()
    with heartbeat.keepalive(limit_s=60, every_s=0.05):
        deadline = time.time() + 10
        while beat_time() == first and time.time() < deadline:
            time.sleep(0.05)
        assert beat_time() > first  # touched while the phase ran
    record = json.loads((tmp_path / "heartbeats" / "rank0.json").read_text())
    assert (record["step"], record["phase"]) == (4, "checkpoint")

    with heartbeat.keepalive(limit_s=0.3, every_s=0.05):
        time.sleep(1.0)
        after_limit = beat_time()
        time.sleep(0.5)
        assert beat_time() == after_limit  # silent past the limit: the watchdog judges again


def test_a_killed_jobs_shared_memory_buffers_go_before_a_launch_on_its_port():
    """Ranks killed with -9 leave DeepSpeed's /dev/shm all-reduce buffers, named by port; a launch
    removes those of its port first, but only when no live job holds that port."""
    import socket

    from launcher.local import port_is_free, remove_shm_buffers

    for family, address in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            held = socket.socket(family)
            held.bind((address, 0))
        except OSError:
            continue  # no IPv6 here
        with held:
            held.listen()
            port = held.getsockname()[1]
            assert not port_is_free(port), address  # a live rendezvous: its buffers are in use
        assert port_is_free(port)
    stale = Path("/dev/shm") / f"deepspeed_allreduce_buffer_0_127.0.0.1_{port}_1"
    if not stale.parent.is_dir():
        pytest.skip("no /dev/shm")
    stale.write_bytes(b"\0" * 64)
    remove_shm_buffers(port)
    assert not stale.exists()


def test_the_watchdog_names_one_silent_rank_among_256_in_time_and_cheaply(tmp_path):
    """256 simulated ranks (Heartbeat objects beating from one thread, each with its writer thread);
    one stops. The watchdog pass the launcher runs every second names it within the limit plus one
    heartbeat write interval plus one pass (before: the limit plus one pass); its own CPU per pass is
    printed, for all 256 files and for one node's 8 (what a node's launcher reads)."""
    import threading

    from trainer.control import Heartbeat

    ranks, victim, limit_s, write_every_s, watch_every_s = 256, 137, 2.0, 0.5, 0.25
    beats = [Heartbeat(tmp_path, rank, write_every_s=write_every_s) for rank in range(ranks)]
    stopped, done = threading.Event(), threading.Event()

    def beat_all():
        step = 0
        while not done.wait(0.05):
            step += 1
            for beat in beats:
                if not (beat.rank == victim and stopped.is_set()):
                    beat.beat(step, "forward")

    beater = threading.Thread(target=beat_all, daemon=True)
    beater.start()
    time.sleep(1.0)
    stopped.set()
    silent_since, named_after, cpu_all, cpu_node = time.monotonic(), None, [], []
    while time.monotonic() - silent_since < 4 * limit_s:
        started = time.thread_time()
        stale = stale_ranks(tmp_path, limit_s)
        cpu_all.append(time.thread_time() - started)
        started = time.thread_time()
        stale_ranks(tmp_path, limit_s, ranks=range(136, 144))
        cpu_node.append(time.thread_time() - started)
        if stale:
            named_after = time.monotonic() - silent_since
            break
        time.sleep(watch_every_s)
    done.set()
    beater.join()
    for beat in beats:
        beat.finish(0)
    print(f"256 ranks: rank {victim} named {named_after:.2f}s after it stopped (limit {limit_s}s, writes every "
          f"{write_every_s}s, passes every {watch_every_s}s); watchdog CPU per pass: all 256 files "
          f"{1000 * sum(cpu_all) / len(cpu_all):.1f} ms, one node's 8 {1000 * sum(cpu_node) / len(cpu_node):.2f} ms")
    assert [b["rank"] for b in stale] == [victim]
    assert limit_s <= named_after <= limit_s + write_every_s + watch_every_s + 1.0
