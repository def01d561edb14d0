"""Real jobs on the local two-node Slurm cluster (fixture ``slurm_cluster`` in conftest.py)."""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import slurm_harness  # tests/slurm/ is put on sys.path by conftest.py

REPO = Path(__file__).resolve().parents[2]


def _wait_for(predicate, timeout, what, cluster=None, poll=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{cluster.log_tails(10)}" if cluster is not None else ""
            raise AssertionError(f"timed out after {timeout} s waiting for {what}{extra}")
        time.sleep(poll)


def test_cluster_is_up(slurm_cluster):
    out = slurm_cluster.run(["sinfo", "-h", "-N", "-o", "%N %t %c %P"]).stdout.split("\n")
    rows = sorted(line.split() for line in out if line.strip())
    assert rows == [["n1", "idle", "2", "debug*"], ["n2", "idle", "2", "debug*"]]
    assert slurm_cluster.node_addr("n1") == "127.0.0.1"
    assert slurm_cluster.node_addr("n2") == "127.0.0.1"
    assert slurm_cluster.env["SLURM_CONF"] == str(slurm_cluster.conf_path)


def test_two_node_job(slurm_cluster, tmp_path):
    """sbatch -N2 --ntasks-per-node=1 with srun inside: one task per node, ids 0/1 on n1/n2.

    The batch script also runs launcher/slurm_env.py inside the job, the way the launcher will:
    n1 does not resolve, so the head address must come from scontrol's NodeAddr.
    """
    probe = (
        "import json, os; from launcher.slurm_env import expand_nodelist, head_node_address, "
        "derive_port, port_key_from_env; nl = os.environ['SLURM_JOB_NODELIST']; "
        "print(json.dumps({'nodelist': nl, 'nodes': expand_nodelist(nl), "
        "'head': head_node_address(nl), 'port': derive_port(port_key_from_env())}))"
    )
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH -N2
        #SBATCH --ntasks-per-node=1
        #SBATCH -o {tmp_path}/job-%j.out
        set -euo pipefail
        srun bash -c 'echo "$SLURM_NODEID $SLURMD_NODENAME $SLURM_PROCID" > {tmp_path}/task.$SLURM_PROCID'
        PYTHONPATH={REPO} {sys.executable} -c "{probe}" > {tmp_path}/probe.json
        """
    )
    job_id = slurm_cluster.sbatch([], script=script, cwd=tmp_path)
    slurm_cluster.wait_job(job_id, "COMPLETED", timeout=120)

    tasks = sorted((tmp_path / f"task.{i}").read_text().split() for i in range(2))
    assert tasks == [["0", "n1", "0"], ["1", "n2", "1"]]

    info = slurm_cluster.scontrol_show_job(job_id)
    assert info["NodeList"] == "n[1-2]"
    assert info["NumNodes"] == "2"
    assert info["ExitCode"] == "0:0"

    probe_out = json.loads((tmp_path / "probe.json").read_text())
    assert probe_out["nodelist"] == "n[1-2]"
    assert probe_out["nodes"] == ["n1", "n2"]
    assert probe_out["head"] == slurm_cluster.node_addr("n1") == "127.0.0.1"
    from launcher.slurm_env import derive_port

    assert probe_out["port"] == derive_port(job_id)


def test_usr1_trap_requeues_job(slurm_cluster, tmp_path):
    """scancel --signal=USR1 --batch reaches the trap; the trap requeues; run 2 has SLURM_RESTART_COUNT=1."""
    out = tmp_path / "requeue.out"
    script = textwrap.dedent(
        f"""\
        #!/bin/bash
        #SBATCH -N1
        #SBATCH --requeue
        #SBATCH --open-mode=append
        #SBATCH -o {out}
        echo "run restart=${{SLURM_RESTART_COUNT:-0}} node=$SLURMD_NODENAME"
        if [ "${{SLURM_RESTART_COUNT:-0}}" -ge 1 ]; then
            echo "second run finished"
            exit 0
        fi
        on_usr1() {{
            echo "got USR1"
            touch {tmp_path}/usr1
            scontrol requeue "$SLURM_JOB_ID"
            echo "requeue rc=$?"
            kill "$child" 2>/dev/null
            exit 0
        }}
        trap on_usr1 USR1
        sleep 300 &
        child=$!
        touch {tmp_path}/ready
        wait "$child"
        echo "wait returned without a signal"
        """
    )
    job_id = slurm_cluster.sbatch([], script=script, cwd=tmp_path)
    slurm_cluster.wait_job(job_id, "RUNNING", timeout=120)
    _wait_for(lambda: (tmp_path / "ready").exists(), 60, "the batch script to install its trap", slurm_cluster)

    t0 = time.monotonic()
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", str(job_id)])
    _wait_for(lambda: (tmp_path / "usr1").exists(), 60, "the USR1 trap to run", slurm_cluster)
    t_trap = time.monotonic() - t0

    def restarted():
        info = slurm_cluster.scontrol_show_job(job_id)
        return info if info.get("Restarts") == "1" else None

    _wait_for(restarted, 60, "Restarts=1", slurm_cluster)
    t_requeued = time.monotonic() - t0

    def second_run_started():
        info = slurm_cluster.scontrol_show_job(job_id)
        state = info.get("JobState")
        return state if info.get("Restarts") == "1" and state in ("RUNNING", "COMPLETING", "COMPLETED") else None

    _wait_for(second_run_started, 120, "the requeued job to start again", slurm_cluster, poll=0.2)
    t_rerun = time.monotonic() - t0
    slurm_cluster.wait_job(job_id, "COMPLETED", timeout=120)
    t_done = time.monotonic() - t0

    text = out.read_text()
    assert "run restart=0" in text, text
    assert "got USR1" in text, text
    assert "run restart=1" in text, text
    assert "second run finished" in text, text
    assert "wait returned without a signal" not in text, text
    info = slurm_cluster.scontrol_show_job(job_id)
    assert info["Restarts"] == "1"
    assert info["ExitCode"] == "0:0"

    slurm_cluster.timings.update(
        {
            "USR1 signal -> trap ran": t_trap,
            "USR1 signal -> requeued (Restarts=1)": t_requeued,
            "USR1 signal -> second run started": t_rerun,
            "USR1 signal -> second run COMPLETED": t_done,
        }
    )


def test_harness_recovers_from_crashed_session(slurm_cluster, tmp_path):
    """A second, small cluster "crashes" (its owner vanishes without stopping it, with a job running);
    a new harness on the same state folder kills the leftovers and starts cleanly. A stale pid file
    naming an unrelated live process must not get that process killed."""
    # Not below tmp_path: munged wants every folder above its socket searchable by all (0700 is not).
    state = Path(tempfile.mkdtemp(prefix="shardtune-slurm-crashtest-")) / "state"
    os.chmod(state.parent, 0o755)
    kw = dict(nodes=("m1",), cpus_per_node=1, ctld_port=slurm_cluster.ctld_port + 100,
              cluster_name="crashtest", start_timeout=120)
    first = slurm_harness.LocalSlurm(state, **kw)
    bystander = None
    try:
        first.start()
        job_id = first.sbatch(["--wrap", "sleep 300", "-o", "/dev/null"])
        first.wait_job(job_id, "RUNNING", timeout=120)
        old = first._owned_processes()
        assert len(old) >= 4, old  # munged, slurmctld, slurmd, slurmstepd, sleep
        # Simulate the owner dying: its flock goes away, nothing is stopped, nothing cleaned.
        first._release_lock()
        first._started = False
        import atexit

        atexit.unregister(first.stop)

        # A stale pid file pointing at an unrelated live process.
        bystander = subprocess.Popen(["sleep", "60"])
        first.slurmd_pid_file("m1").write_text(f"{bystander.pid}\n")

        t0 = time.monotonic()
        with slurm_harness.LocalSlurm(state, **kw) as second:
            recovery = time.monotonic() - t0
            assert not [p for p in old if slurm_harness._alive(p)]
            assert bystander.poll() is None, "a process named in a stale pid file was killed"
            j2 = second.sbatch(["--wrap", "true", "-o", "/dev/null"])
            assert second.wait_job(j2, "COMPLETED", timeout=120) == "COMPLETED"
            assert j2 == 1  # fresh controller state (slurmctld -c)
        assert not state.exists()
        slurm_cluster.timings["crashed-session recovery to idle"] = recovery
    finally:
        if bystander is not None:
            bystander.send_signal(signal.SIGKILL)
            bystander.wait()
        first.stop()  # no-op unless the test failed early
        for p in first._owned_processes():
            os.kill(p, signal.SIGKILL)
        shutil.rmtree(state.parent, ignore_errors=True)
