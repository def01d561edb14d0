"""cluster=hostfile over ssh, for real: an sshd started by the test (its own port, host key and
client key, nothing in ~/.ssh touched), pdsh, and the deepspeed launcher reaching two "hosts"
(localhost and 127.0.0.1, both this machine) to start one rank on each."""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from helpers import TINY, losses, shardtune
from launcher.local import free_port

pytestmark = pytest.mark.distributed

PACKAGES = ["openssh-server", "openssh-client", "pdsh"]


def ensure_installed() -> str:
    """sshd's absolute path (it re-executes itself), installing Debian's packages where we may."""
    if not (shutil.which("sshd") or os.path.exists("/usr/sbin/sshd")) or not shutil.which("pdsh"):
        apt = shutil.which("apt-get")
        if os.geteuid() != 0 or not apt:
            pytest.skip(f"needs {', '.join(PACKAGES)} (not installed, and no root apt-get to install them)")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = [apt, "install", "-y", "--no-install-recommends", *PACKAGES]
        if subprocess.run(install, env=env, capture_output=True).returncode != 0:
            subprocess.run([apt, "update"], env=env, capture_output=True)
            done = subprocess.run(install, env=env, capture_output=True, text=True)
            assert done.returncode == 0, f"apt-get install {' '.join(PACKAGES)} failed:\n{done.stderr[-2000:]}"
    return shutil.which("sshd") or "/usr/sbin/sshd"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("sshd for key-based login as this user needs root to start")
    program = ensure_installed()
    home = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(home / key)], check=True)
    shutil.copy(home / "client_key.pub", home / "authorized_keys")
    port = free_port()
    (home / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {home}/host_key\nAuthorizedKeysFile {home}/authorized_keys\n"
        f"PidFile {home}/sshd.pid\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\nLogLevel ERROR\n")
    # What a user puts in ~/.ssh/config, here in a file of its own handed to ssh with -F.
    (home / "ssh_config").write_text(
        f"Host *\n  IdentityFile {home}/client_key\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
        "  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege-separation directory
    subprocess.run([program, "-f", str(home / "sshd_config"), "-E", str(home / "sshd.log")], check=True)
    options = ["-F", str(home / "ssh_config"), "-p", str(port)]
    deadline = time.time() + 30
    while subprocess.run(["ssh", *options, "-o", "BatchMode=yes", "localhost", "true"],
                         capture_output=True).returncode != 0:
        assert time.time() < deadline, f"sshd did not answer on port {port}: {(home / 'sshd.log').read_text()}"
        time.sleep(0.3)
    yield SimpleNamespace(port=port, env={"PDSH_SSH_ARGS_APPEND": f"-F {home / 'ssh_config'}"})
    pid = (home / "sshd.pid").read_text().strip() if (home / "sshd.pid").exists() else ""
    if pid:
        subprocess.run(["kill", pid])


def over_ssh(run_dir: Path, hostfile: Path, port: int):
    return [f"run.dir={run_dir}", *TINY, "train.max_steps=4", "eval.prompts_file=null", "eval.general_files=[]",
            "eval.max_batches=2", "checkpoint.export_final=false", "cluster=hostfile", "cluster.no_ssh=false",
            f"cluster.hostfile={hostfile}", "cluster.nnodes=2", "cluster.nproc_per_node=1",
            f"cluster.ssh_port={port}", f"cluster.master_port={free_port()}", "cluster.threads_per_rank=1"]


def test_pdsh_over_ssh_starts_a_rank_on_each_host_and_they_train_as_one_world(sshd, tmp_path):
    hostfile, run_dir = tmp_path / "hosts.txt", tmp_path / "run"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    proc = shardtune("train", *over_ssh(run_dir, hostfile, sshd.port), env=sshd.env)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "Running on the following workers: localhost,127.0.0.1" in proc.stdout, proc.stdout[-4000:]
    values = losses(run_dir)
    assert len(values) == 4 and all(v == v for v in values), values
    assert sorted(p.name for p in (run_dir / "heartbeats").glob("rank*.json")) == ["rank0.json", "rank1.json"]


def test_an_unreachable_host_is_named_before_any_rank_starts(sshd, tmp_path):
    hostfile, run_dir = tmp_path / "hosts.txt", tmp_path / "run"
    hostfile.write_text("localhost slots=1\nno-such-host.invalid slots=1\n")
    started = time.time()
    proc = shardtune("train", *over_ssh(run_dir, hostfile, sshd.port), env=sshd.env, timeout=120)
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "1 of 2 host(s)" in proc.stdout and "no-such-host.invalid:" in proc.stdout, proc.stdout[-3000:]
    assert "localhost:" not in proc.stdout.split("cannot be reached")[1]  # the reachable one is not blamed
    assert not (run_dir / "heartbeats").exists() or not list((run_dir / "heartbeats").iterdir())
    assert time.time() - started < 60
