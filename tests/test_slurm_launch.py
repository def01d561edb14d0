"""cluster=slurm and cluster=hostfile without a cluster: the script we render, the checks we make."""
from __future__ import annotations

import pytest

from helpers import shardtune
from launcher.compose import compose
from launcher.deepspeed_launch import decode_world
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
    assert "--qos" not in script and "--constraint" not in script  # unset options are left out
    assert "#SBATCH --mem=0" in script  # exclusive and mem unset: all the node's memory


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
    assert "--node_rank=1" in argv and "--master_addr=10.0.0.1" in argv and env == {}
    assert decode_world(argv) == {"a": [0, 1], "b": [0, 1]}  # DeepSpeed's per-node launcher places the ranks
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


# ---- CPUs and memory of the node's one launcher task -------------------------------------------------

def _script(tmp_path, *overrides):
    import subprocess

    cfg = compose(["cluster=slurm", f"run.dir={tmp_path}", "run.name=exp1", *overrides])
    script = render_script(cfg, tmp_path)
    (tmp_path / "job.sbatch").write_text(script)
    syntax = subprocess.run(["bash", "-n", str(tmp_path / "job.sbatch")], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    sbatch = [line for line in script.splitlines() if line.startswith("#SBATCH ")]
    (srun,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return sbatch, srun


def test_the_node_task_asks_for_cpus_for_every_rank_and_srun_passes_them_on(tmp_path):
    # A shared node: cpus_per_rank (2) x nproc_per_node, and srun told so (Slurm 22.05-23.02 drop it).
    sbatch, srun = _script(tmp_path, "cluster.nproc_per_node=8", "cluster.slurm.gpus_per_node=8")
    assert "#SBATCH --cpus-per-task=16" in sbatch and "#SBATCH --gpus-per-node=8" in sbatch
    assert not [line for line in sbatch if line.startswith(("#SBATCH --mem", "#SBATCH --exclusive"))], sbatch
    assert srun.startswith('srun --nodes=1 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" '), srun
    sbatch, _ = _script(tmp_path, "cluster.nproc_per_node=8", "cluster.slurm.cpus_per_rank=6")
    assert "#SBATCH --cpus-per-task=48" in sbatch
    # A node of its own: all its memory and all its CPUs (the allocation's count, given to srun).
    sbatch, srun = _script(tmp_path, "cluster.nproc_per_node=8", "cluster.slurm.exclusive=true")
    assert "#SBATCH --exclusive" in sbatch and "#SBATCH --mem=0" in sbatch
    assert not [line for line in sbatch if line.startswith("#SBATCH --cpus-per-task")], sbatch
    assert '--cpus-per-task="$SLURM_CPUS_ON_NODE"' in srun
    # Given values win, exclusive or not.
    sbatch, srun = _script(tmp_path, "cluster.nproc_per_node=8", "cluster.slurm.exclusive=true",
                           "cluster.slurm.cpus_per_task=64", "cluster.slurm.mem=256G")
    assert "#SBATCH --cpus-per-task=64" in sbatch and "#SBATCH --mem=256G" in sbatch
    assert '--cpus-per-task="$SLURM_CPUS_PER_TASK"' in srun


def test_a_request_that_starves_the_ranks_is_refused():
    with pytest.raises(ConfigError) as err:
        compose(["cluster=slurm", "cluster.nproc_per_node=8", "cluster.slurm.cpus_per_task=4"])
    (problem,) = [p for p in err.value.problems if p.startswith("cluster.slurm.cpus_per_task")]
    assert problem.startswith("cluster.slurm.cpus_per_task=4 gives the node's 8 ranks (cluster.nproc_per_node) "
                              "fewer than one CPU each"), problem
    assert "at least 8" in problem and "leave it null" in problem
    with pytest.raises(ConfigError, match="cluster.slurm.cpus_per_rank=0 must be >= 1"):
        compose(["cluster=slurm", "cluster.slurm.cpus_per_rank=0"])
    compose(["cluster=slurm", "cluster.nproc_per_node=8", "cluster.slurm.cpus_per_task=8"])  # one each: allowed


def test_inside_an_allocation_srun_is_given_its_cpus_per_task(tmp_path, monkeypatch):
    from launcher import local
    from launcher.slurm import launch_in_allocation

    started = []
    monkeypatch.setattr(local, "run_workers", lambda argv, env, run_dir, **options: started.append(argv) or 0)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "1")
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    cfg = compose(["cluster=slurm", f"run.dir={tmp_path}"])
    launch_in_allocation(cfg, tmp_path)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # salloc --cpus-per-task=16
    launch_in_allocation(cfg, tmp_path)
    assert not [a for a in started[0] if a.startswith("--cpus-per-task")]
    assert "--cpus-per-task=16" in started[1] and started[1].index("--cpus-per-task=16") < started[1].index("-m")


def test_a_sweeps_trials_share_an_array_only_when_they_request_the_same_resources(tmp_path):
    """Trials differing only in hyperparameters share one array; a trial asking for other nodes gets its
    own (an array's #SBATCH lines are one for all its tasks). The real submission: tests/slurm/."""
    from launcher.slurm_array import array_script, groups, requests
    from trainer.run_dir import RunDir

    trials = []
    for n, nodes in enumerate([1, 1, 2]):
        cfg = compose(["cluster=slurm", f"cluster.nnodes={nodes}", f"run.dir={tmp_path / f'trial-{n}'}",
                       f"run.name=sweep-{n}", f"optim.lr={n + 1}e-4"])
        RunDir(tmp_path / f"trial-{n}").path.mkdir()
        RunDir(tmp_path / f"trial-{n}").job_script.write_text(render_script(cfg, tmp_path / f"trial-{n}"))
        trials.append(tmp_path / f"trial-{n}")
    found = list(groups(trials).values())
    assert found == [trials[:2], trials[2:]]
    shared = requests(RunDir(trials[0]).job_script)
    assert "#SBATCH --signal=B:USR1@120" in shared and not any("--job-name" in line for line in shared)
    script = array_script(tmp_path, "sweep", trials[:2], shared, parallelism=3)
    assert "#SBATCH --array=0-1%3" in script and f"#SBATCH --output={tmp_path}/slurm-%A_%a.out" in script
    assert str(RunDir(trials[1]).job_script) in script and 'exec bash "$SCRIPT"' in script
    assert "%" not in array_script(tmp_path, "sweep", trials[:2], shared, parallelism=0).split("--array=")[1].split()[0]


def test_a_login_node_without_gpus_judges_the_gpu_job_by_the_memory_it_is_told(tmp_path, capsys):
    """Submission from a CPU login node: preflight estimates the job for its GPUs (cluster.slurm.gpu_memory)
    and refuses one that cannot fit, before it waits in the queue."""
    from launcher.slurm import preflight_fits

    def cfg(*overrides):
        return compose(["cluster=slurm", "cluster.slurm.gpus_per_node=2", "cluster.nproc_per_node=2",
                        f"run.dir={tmp_path}", *overrides], validate_files=False, on_gpu=True)

    assert preflight_fits(cfg(), on_gpu=False)  # no memory given: said, and submitted as before
    assert "preflight skipped" in capsys.readouterr().out
    assert preflight_fits(cfg("cluster.slurm.gpu_memory=80GB"), on_gpu=False)
    assert "fits" in capsys.readouterr().out
    assert not preflight_fits(cfg("cluster.slurm.gpu_memory=1MB"), on_gpu=False)
    assert "not submitted: the job would not fit" in capsys.readouterr().out
    assert not preflight_fits(cfg("cluster.slurm.gpu_memory=lots"), on_gpu=False)
    assert "cluster.slurm.gpu_memory='lots'" in capsys.readouterr().out
