"""Users' DeepSpeed habits: their own ds_config.json with "auto" values, and the GPUs they choose
(CUDA_VISIBLE_DEVICES, hostfile slots=, --include/--exclude). Unit-level: no rank is started. What
GPUs a rendered command would use is computed by DeepSpeed's own runner functions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO, subprocess_env
from launcher.compose import compose, compose_node
from launcher.deepspeed_launch import decode_world
from launcher.devices import device_problems, local_gpu_args, select_slots
from launcher.hostfile import host_names, ssh_command
from launcher.local import local_command
from launcher.node import node_command, node_gpus
from launcher.rundir import rewrite_for_launch, write_run_dir
from trainer.config import ConfigError, load_run_config, save_run_config, to_config
from trainer.ds_config import build_ds_config
from trainer.run_dir import RunDir

TINY_HIDDEN = 128  # trainer/builtin/tiny-llama/config.json

# The shape of the HF Trainer / Axolotl ds_z3.json: everything shardtune knows is "auto".
DS_Z3 = {
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto", "loss_scale": 0, "initial_scale_power": 12},
    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
    "scheduler": {"type": "WarmupCosineLR",
                  "params": {"warmup_num_steps": "auto", "total_num_steps": "auto", "cos_min_ratio": "auto"}},
    "zero_optimization": {"stage": 3, "overlap_comm": True, "contiguous_gradients": True,
                          "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                          "stage3_param_persistence_threshold": "auto",
                          "stage3_gather_16bit_weights_on_model_save": True},
    "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "train_batch_size": "auto",
    "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
}


def _write(folder: Path, name: str, content: dict) -> Path:
    path = folder / name
    path.write_text(json.dumps(content))
    return path


def _has_auto(tree) -> bool:
    if isinstance(tree, dict):
        return any(_has_auto(v) for v in tree.values())
    return tree == "auto"


# ---------------------------------------------------------------- deepspeed.config_file

def test_auto_values_are_filled_into_the_run_dirs_ds_config_and_a_requeue_needs_no_user_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative path is the user's working directory's
    _write(tmp_path, "ds_z3.json", DS_Z3)
    cfg = compose(["deepspeed.config_file=ds_z3.json", f"run.dir={tmp_path / 'run'}", "train.micro_batch_size=2",
                   "train.grad_accum=3", "cluster.nproc_per_node=2", "optim.grad_clip=0.5"])
    run_dir = write_run_dir(cfg, on_gpu=False, overrides=[])
    written = RunDir(run_dir).read_ds_config()
    assert not _has_auto(written), written
    assert (written["train_micro_batch_size_per_gpu"], written["gradient_accumulation_steps"],
            written["train_batch_size"], written["gradient_clipping"]) == (2, 3, 12, 0.5)
    assert written["bf16"] == {"enabled": False}  # CPU: fp32
    assert written["fp16"] == {"enabled": False, "loss_scale": 0, "initial_scale_power": 12}  # the file's own keys stay
    zero = written["zero_optimization"]
    # HF Trainer's hidden-size rule: h*h, 0.9*h*h, 10*h
    assert (zero["stage"], zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (3, 128 * 128, int(0.9 * 128 * 128), 10 * TINY_HIDDEN)
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True and zero["overlap_comm"] is True
    assert "optimizer" not in written and "scheduler" not in written  # shardtune builds both from optim.*
    assert written["zero_allow_untested_optimizer"] is True

    # The ranks and every requeue (python -m launcher.resume) read config.yaml: the file's copy is there.
    saved = load_run_config(run_dir)
    assert saved.deepspeed.config_file == str(tmp_path / "ds_z3.json")
    assert saved.deepspeed.config_file_content == DS_Z3
    (tmp_path / "ds_z3.json").unlink()
    RunDir(run_dir).ds_config.unlink()
    rewrite_for_launch(saved, run_dir, on_gpu=False)
    assert RunDir(run_dir).read_ds_config() == written
    # The same file on GPUs: bf16, as shardtune's precision=auto decides there.
    assert build_ds_config(saved, 2, on_gpu=True)["bf16"]["enabled"] is True


def test_the_files_deepspeed_settings_win_over_defaults_and_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _write(tmp_path, "ds_z2.json", {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"},
                                                          "allgather_bucket_size": 2e8}})
    cfg = compose(["deepspeed.config_file='~/ds_z2.json'", "optim.name=cpu_adam"], validate_files=False)
    # Adopted into the config: evaluation, resume and the report read deepspeed.stage.
    assert (cfg.deepspeed.stage, cfg.deepspeed.offload_optimizer, cfg.deepspeed.allgather_bucket_size) == (2, True, 2e8)
    zero = build_ds_config(cfg, 2, on_gpu=False)["zero_optimization"]
    assert zero["stage"] == 2 and zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "stage3_prefetch_bucket_size" not in zero
    save_run_config(cfg, tmp_path)  # what the ranks read: the file's 2e8 held as the int field it is
    assert load_run_config(tmp_path).deepspeed.allgather_bucket_size == 200_000_000


@pytest.mark.parametrize("overrides, file, expected", [
    (["train.micro_batch_size=2"], {"train_micro_batch_size_per_gpu": 4},
     ['"train_micro_batch_size_per_gpu": 4 in the file but train.micro_batch_size=2',
      "set train.micro_batch_size=4, or write \"auto\""]),
    (["deepspeed=zero1"], {"zero_optimization": {"stage": 2}},
     ['"zero_optimization.stage": 2 in the file but deepspeed.stage=1', "drop deepspeed.stage"]),
    (["cluster.nproc_per_node=2", "train.micro_batch_size=4"], {"train_batch_size": 16},
     ['"train_batch_size": 16 in the file but train.micro_batch_size=4 x train.grad_accum=1 x 2 rank(s) = 8']),
    ([], {"bf16": {"enabled": True}},  # this machine has no GPU: precision=auto is fp32
     ['"bf16.enabled": true in the file but deepspeed.precision=auto', "set deepspeed.precision=bf16"]),
    (["optim.lr=1e-4"], {"optimizer": {"type": "AdamW", "params": {"lr": 3e-5}}},
     ['"optimizer.params.lr": 3e-05 in the file but optim.lr=0.0001']),
    ([], {"optimizer": {"type": "Lamb"}}, ['"optimizer.type": "Lamb": shardtune builds AdamW itself']),
    ([], {"optimizer": {"type": "AdamW", "params": {"amsgrad": True}}},
     ['"optimizer.params.amsgrad" is not a setting of shardtune\'s optimizer']),
    (["optim.scheduler=cosine"], {"scheduler": {"type": "WarmupLR"}},
     ['"scheduler.type": "WarmupLR" in the file is optim.scheduler=constant but the config has optim.scheduler=cosine']),
    ([], {"zero_optimization": {"stage3_max_live_parameters": "auto"}},
     ['"zero_optimization.stage3_max_live_parameters" is "auto" but shardtune has no value for it']),
])
def test_a_conflict_names_the_file_the_key_and_both_values(tmp_path, overrides, file, expected):
    path = _write(tmp_path, "ds.json", file)
    with pytest.raises(ConfigError) as err:
        compose([f"deepspeed.config_file={path}", *overrides], validate_files=False)
    text = str(err.value)
    assert f"deepspeed.config_file={path}" in text
    for part in expected:
        assert part in text, text


def test_a_conflicting_file_is_refused_by_shardtune_train_before_any_process_starts(tmp_path):
    _write(tmp_path, "ds_z2.json", {"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 8})
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "train", "deepspeed.config_file=ds_z2.json",
                           "deepspeed=zero1", "train.micro_batch_size=2", f"run.dir={run_dir}"],
                          cwd=tmp_path, env=subprocess_env({"PYTHONPATH": str(REPO)}), capture_output=True,
                          text=True, timeout=120)  # cwd: the user's, where the relative path points
    assert proc.returncode == 2, proc.stderr
    assert '"zero_optimization.stage": 2 in the file but deepspeed.stage=1' in proc.stderr
    assert '"train_micro_batch_size_per_gpu": 8 in the file but train.micro_batch_size=2' in proc.stderr
    assert not RunDir(run_dir).ds_config.exists() and not RunDir(run_dir).heartbeat_files()


def test_a_missing_or_broken_file_is_named(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    for name, says in (("missing.json", "no such file"), ("broken.json", "not valid JSON")):
        with pytest.raises(ConfigError, match=f"deepspeed.config_file={tmp_path / name}: {says}"):
            compose([f"deepspeed.config_file={tmp_path / name}"], validate_files=False)


# ---------------------------------------------------------------- the GPUs a launch uses

def _gpus_deepspeed_would_use(argv, pool):
    """{host: GPU ids} the ranks get: for the runner (ssh), what DeepSpeed's runner main() computes from our
    argv and a resource pool; for the per-node launcher we start ourselves, the world our argv carries."""
    if "launcher.deepspeed_launch" in argv:
        return decode_world(argv)
    from deepspeed.launcher import runner

    args = runner.parse_args(argv[argv.index("deepspeed.launcher.runner") + 1:])
    active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    return dict(runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus))


def _bound(*overrides):
    """The config bound to the schema but not validated: validation would judge it for this GPU-less machine."""
    return to_config(compose_node(list(overrides)))


def _local(tmp_path, *overrides):
    return _bound(f"run.dir={tmp_path}", *overrides)


def test_cuda_visible_devices_are_the_gpus_the_ranks_get(tmp_path):
    cfg = _local(tmp_path, "cluster.nproc_per_node=2")
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    argv, _ = local_command(cfg, tmp_path, 29500, on_gpu=True, environ=env)
    assert _gpus_deepspeed_would_use(argv, {"localhost": 8}) == {"localhost": [2, 3]}
    # what a user starting the workers by hand is shown: the runner's flags for the same GPUs
    assert local_gpu_args(cfg, env) == ["--include", "localhost:2,3"]
    assert runner_gpus(local_gpu_args(cfg, env), {"localhost": 8}) == {"localhost": [2, 3]}
    # Unrestricted GPU run, and every CPU run (ranks are processes 0..N-1)
    argv, _ = local_command(cfg, tmp_path, 29500, on_gpu=True, environ={})
    assert _gpus_deepspeed_would_use(argv, {"localhost": 8}) == {"localhost": [0, 1]}
    argv, _ = local_command(cfg, tmp_path, 29500, on_gpu=False, environ=env)
    assert _gpus_deepspeed_would_use(argv, {}) == {"localhost": [0, 1]}


def runner_gpus(flags, pool):
    """What DeepSpeed's runner computes from its device flags and a resource pool."""
    from deepspeed.launcher import runner

    args = runner.parse_args([*flags, "x.py"])
    active = runner.parse_inclusion_exclusion(pool, args.include, args.exclude)
    return dict(runner.apply_num_nodes_and_gpus(active, args.num_nodes, args.num_gpus))


def test_cluster_include_and_exclude_choose_the_gpus(tmp_path, monkeypatch):
    import launcher.local

    monkeypatch.setattr(launcher.local, "gpu_count", lambda: 4)  # this machine has no GPU to count
    cfg = _local(tmp_path, "cluster.nproc_per_node=2", "cluster.include='localhost:1,3'")
    argv, _ = local_command(cfg, tmp_path, 29500, on_gpu=True, environ={})
    assert _gpus_deepspeed_would_use(argv, {"localhost": 4}) == {"localhost": [1, 3]}
    assert runner_gpus(local_gpu_args(cfg, {}), {"localhost": 4}) == {"localhost": [1, 3]}
    argv, _ = local_command(_local(tmp_path, "cluster.nproc_per_node=3", "cluster.exclude=localhost:0"),
                            tmp_path, 29500, on_gpu=True, environ={})
    assert _gpus_deepspeed_would_use(argv, {"localhost": 4}) == {"localhost": [1, 2, 3]}
    argv, extra = local_command(_local(tmp_path, "cluster.nproc_per_node=1", "cluster.include=localhost:3"),
                                tmp_path, 29500, on_gpu=True, environ={})  # one chosen GPU: placed by DeepSpeed too
    assert _gpus_deepspeed_would_use(argv, {"localhost": 4}) == {"localhost": [3]} and extra == {}


@pytest.mark.parametrize("include, exclude", [("localhost:1,3", None), ("localhost", None), (None, "localhost:0"),
                                              ("a@b:0,2", None), (None, "b:1@a"), ("b:2@a:0", None)])
def test_our_slot_filter_agrees_with_deepspeeds(include, exclude):
    from deepspeed.launcher import runner

    pool = {"localhost": 4} if "localhost" in (include or exclude) else {"a": 2, "b": 3}
    ours = select_slots(pool, include, exclude)
    assert ours == dict(runner.parse_inclusion_exclusion(pool, include or "", exclude or ""))


@pytest.mark.parametrize("env, overrides, says", [
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, ["cluster.nproc_per_node=4"],
     "CUDA_VISIBLE_DEVICES=2,3 gives 2 GPU(s) but cluster.nproc_per_node=4 (one rank per GPU): set "
     "cluster.nproc_per_node=2, or list 4 GPU(s) in CUDA_VISIBLE_DEVICES"),
    ({"CUDA_VISIBLE_DEVICES": "GPU-3f2a,GPU-77b1"}, ["cluster.nproc_per_node=2"],
     "CUDA_VISIBLE_DEVICES=GPU-3f2a,GPU-77b1 is not a list of distinct GPU indices"),
    ({"CUDA_VISIBLE_DEVICES": "0,1"}, ["cluster.include='localhost:0,1'"],
     "cluster.include=localhost:0,1 and CUDA_VISIBLE_DEVICES=0,1 both choose GPUs"),
    ({}, ["cluster.include='node7:0,1'"], "cluster=local runs on this machine, which DeepSpeed calls localhost"),
    ({}, ["cluster.include='localhost:0,9'"], "localhost has GPUs 0-7, not 9"),
    ({}, ["cluster.exclude=localhost:0", "cluster.nproc_per_node=2"],
     "cluster.exclude=localhost:0 gives 7 GPU(s) but cluster.nproc_per_node=2"),
])
def test_chosen_gpus_that_do_not_match_the_ranks_are_refused(tmp_path, env, overrides, says):
    cfg = _local(tmp_path, *overrides)
    problems = device_problems(cfg, env, on_gpu=True, gpu_count=8)
    assert any(says in p for p in problems), problems


def test_one_rank_inherits_any_cuda_visible_devices(tmp_path):
    cfg = _local(tmp_path, "cluster.nproc_per_node=1")  # a plain process: a MIG name is fine there
    assert device_problems(cfg, {"CUDA_VISIBLE_DEVICES": "MIG-5c1e"}, on_gpu=True, gpu_count=1) == []
    argv, extra = local_command(cfg, tmp_path, 29500, on_gpu=True, environ={"CUDA_VISIBLE_DEVICES": "MIG-5c1e"})
    assert argv[1:3] == ["-m", "trainer"] and "CUDA_VISIBLE_DEVICES" not in extra


def test_validation_refuses_a_count_mismatch_for_a_gpu_run(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with pytest.raises(ConfigError, match=r"CUDA_VISIBLE_DEVICES=2,3 gives 2 GPU\(s\) but cluster.nproc_per_node=4"):
        compose(["cluster.nproc_per_node=4"], validate_files=False, on_gpu=True)
    compose(["cluster.nproc_per_node=2"], validate_files=False, on_gpu=True)  # two listed, two ranks
    compose(["cluster.nproc_per_node=4"], validate_files=False, on_gpu=False)  # CPU: nothing changes
    with pytest.raises(ConfigError, match="cluster.include chooses GPUs, and this run is on CPU"):
        compose(["cluster.include=localhost:0"], validate_files=False, on_gpu=False)


def _hostfile_cfg(tmp_path, text, *overrides):
    hosts = tmp_path / "hosts"
    hosts.write_text(text)
    return _bound("cluster=hostfile", "cluster.no_ssh=false", f"cluster.hostfile={hosts}", "cluster.nproc_per_node=2",
                  "cluster.master_addr=10.0.0.1", f"run.dir={tmp_path}", *overrides)


def test_hostfile_slots_are_honoured_on_gpus(tmp_path):
    cfg = _hostfile_cfg(tmp_path, "a slots=2\nb slots=2\n")
    argv = ssh_command(cfg, tmp_path, host_names(cfg), on_gpu=True)
    assert "--num_gpus" not in argv
    assert _gpus_deepspeed_would_use(argv, {"a": 2, "b": 2}) == {"a": [0, 1], "b": [0, 1]}
    argv = ssh_command(cfg, tmp_path, host_names(cfg), on_gpu=False)  # CPU: as before
    assert argv[argv.index("--num_gpus") + 1] == "2"
    cfg = _hostfile_cfg(tmp_path, "a slots=4\nb slots=2\n")
    assert device_problems(cfg, {}, on_gpu=True, gpu_count=0) == [
        f"cluster.hostfile={tmp_path / 'hosts'}: host a gives 4 GPU(s) but cluster.nproc_per_node=2 (one rank per "
        "GPU): set cluster.nproc_per_node=4, or set slots=2 on that line (or choose GPUs with cluster.include)"]


def test_include_chooses_hosts_and_gpus_over_ssh(tmp_path):
    cfg = _hostfile_cfg(tmp_path, "a slots=4\nb slots=4\nc slots=4\n", "cluster.include='a:0,1@c:2,3'")
    assert device_problems(cfg, {}, on_gpu=True, gpu_count=0) == []
    assert host_names(cfg) == ["a", "c"]
    argv = ssh_command(cfg, tmp_path, host_names(cfg), on_gpu=True)
    assert "--num_nodes" not in argv and "--num_gpus" not in argv  # the runner refuses them with --include
    assert _gpus_deepspeed_would_use(argv, {"a": 4, "b": 4, "c": 4}) == {"a": [0, 1], "c": [2, 3]}


def test_a_no_ssh_node_runs_on_its_cuda_visible_devices(tmp_path):
    cfg = compose(["cluster=hostfile", "cluster.no_ssh=true", "cluster.master_port=29500", "cluster.nproc_per_node=2",
                   f"run.dir={tmp_path}"], validate_files=False)
    visible = node_gpus(cfg, on_gpu=True, environ={"CUDA_VISIBLE_DEVICES": "2,3"})
    argv, _ = node_command(cfg, tmp_path, 1, ["a", "b"], "10.0.0.1", 29500, use_deepspeed=True, visible=visible)
    assert _gpus_deepspeed_would_use(argv, {"a": 2, "b": 4}) == {"a": [0, 1], "b": [2, 3]} and "--node_rank=1" in argv
    assert node_gpus(cfg, on_gpu=False, environ={"CUDA_VISIBLE_DEVICES": "2,3"}) is None  # CPU: as before
    # UUIDs (no index to --include): the node numbers the job's GPUs 0..N-1, as before
    assert node_gpus(cfg, on_gpu=True, environ={"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}) is None
    with pytest.raises(SystemExit, match=r"CUDA_VISIBLE_DEVICES=5 gives 1 GPU\(s\) but cluster.nproc_per_node=2"):
        node_gpus(cfg, on_gpu=True, environ={"CUDA_VISIBLE_DEVICES": "5"})
