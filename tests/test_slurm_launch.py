"""cluster=slurm and cluster=hostfile without a cluster: the script we render, the checks we make."""
from __future__ import annotations

import pytest

from helpers import shardtune
from launcher.compose import compose
from launcher.node import node_command, read_hostfile
from launcher.slurm import in_allocation, render_script
from trainer.validate import ConfigError


def test_script_has_the_requested_resources_and_the_requeue_machinery(tmp_path):
    cfg = compose(["cluster=slurm", "cluster.nnodes=2", "cluster.slurm.gpus_per_node=4",
                   "cluster.slurm.partition=gpu", "cluster.slurm.account=proj", "cluster.slurm.time=02:00:00",
                   "cluster.slurm.signal_seconds=300", "cluster.slurm.max_requeues=5", "cluster.slurm.exclusive=true",
                   "cluster.slurm.extra_sbatch=['--reservation=r1']", "cluster.slurm.setup=[module load cuda]",
                   f"run.dir={tmp_path}", "run.name=exp1"])
    script = render_script(cfg, tmp_path)
    for line in ("#SBATCH --job-name=exp1", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                 "#SBATCH --gpus-per-node=4", "#SBATCH --partition=gpu", "#SBATCH --account=proj",
                 "#SBATCH --time=02:00:00", "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --exclusive", "#SBATCH --reservation=r1",
                 f"#SBATCH --output={tmp_path}/slurm-%j.out", "MAX_REQUEUES=5", "module load cuda",
                 "trap 'on_stop USR1' USR1", 'scontrol requeue "$SLURM_JOB_ID"', "-m launcher.node --run-dir"):
        assert line in script, line
    assert "--qos" not in script and "--mem" not in script  # unset options are left out


def test_dry_run_writes_the_script_without_submitting(tmp_path):
    proc = shardtune("train", "cluster=slurm", f"run.dir={tmp_path}", "cluster.slurm.submit=false")
    assert proc.returncode == 0, proc.stdout
    assert (tmp_path / "job.sbatch").exists() and not (tmp_path / "slurm_job_id").exists()
    assert f"sbatch {tmp_path}/job.sbatch" in proc.stdout


def test_in_allocation_but_not_in_our_own_batch_script():
    assert not in_allocation({})
    assert in_allocation({"SLURM_JOB_ID": "7"})
    assert not in_allocation({"SLURM_JOB_ID": "7", "SHARDTUNE_BATCH_JOB": "7"})


def test_no_ssh_needs_a_port_and_a_valid_node_rank():
    with pytest.raises(ConfigError) as err:
        compose(["cluster=hostfile", "cluster.node_rank=2", "cluster.master_port=null"])
    text = str(err.value)
    assert "cluster.node_rank=2 must be in [0, cluster.nnodes=2)" in text and "cluster.master_port" in text


def test_hostfile_lines_and_node_commands(tmp_path):
    hosts = tmp_path / "hosts"
    hosts.write_text("# two nodes\na slots=2\nb slots=2\n")
    assert read_hostfile(str(hosts)) == [("a", 2), ("b", 2)]
    hosts.write_text("a slots=2\nb 2\n")
    with pytest.raises(SystemExit, match=r"hosts:2: 'b 2' is not 'HOST slots=N'"):
        read_hostfile(str(hosts))
    cfg = compose(["cluster=hostfile", "cluster.no_ssh=true", "cluster.master_port=29500",
                   "cluster.nproc_per_node=2", f"run.dir={tmp_path}"])
    argv, env = node_command(cfg, tmp_path, 1, ["a", "b"], "10.0.0.1", 29500, use_deepspeed=True)
    assert argv[argv.index("--node_rank") + 1] == "1" and "--no_ssh" in argv and env == {}
    assert (tmp_path / "hostfile.node1").read_text() == "a slots=2\nb slots=2\n"
    argv, env = node_command(cfg, tmp_path, 1, ["a", "b"], "10.0.0.1", 29500, use_deepspeed=False)
    assert env == {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "RANK": "1", "LOCAL_RANK": "0",
                   "WORLD_SIZE": "2"}


def test_over_ssh_rank_0_listens_where_the_other_hosts_can_reach_it(tmp_path, capsys):
    from launcher.hostfile import rendezvous_address, ssh_command

    hosts = tmp_path / "hosts"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    cfg = compose(["cluster=hostfile", "cluster.no_ssh=false", f"cluster.hostfile={hosts}", "cluster.ssh_port=2222",
                   f"run.dir={tmp_path}"])
    assert cfg.cluster.master_addr == "127.0.0.1"  # as shipped, for no-ssh runs on one machine
    assert rendezvous_address(cfg, ["node-a", "node-b"]) == "node-a"  # loopback: unreachable from node-b
    assert "loopback" in capsys.readouterr().err
    assert rendezvous_address(cfg, ["localhost", "127.0.0.1"]) == "127.0.0.1"  # every host is this machine
    cfg.cluster.master_addr = "10.0.0.7"
    assert rendezvous_address(cfg, ["node-a", "node-b"]) == "10.0.0.7"  # the user's choice stands
    argv = ssh_command(cfg, tmp_path, ["node-a", "node-b"])
    assert argv[argv.index("--ssh_port") + 1] == "2222" and "--no_ssh_check" in argv
    assert argv[argv.index("--master_addr") + 1] == "10.0.0.7"
    with pytest.raises(ConfigError, match="cluster.ssh_port=70000 is not a port"):
        compose(["cluster=hostfile", "cluster.no_ssh=false", f"cluster.hostfile={hosts}", "cluster.ssh_port=70000"])
