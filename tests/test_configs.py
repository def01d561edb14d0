"""Every shipped config composes and validates; invalid configs are rejected before any spawn."""
from pathlib import Path

import pytest

from helpers import REPO, shardtune
from launcher.compose import compose
from trainer.config import ConfigError, RootConfig
from trainer.ds_config import build_ds_config
from trainer.validate import validate

CONFIGS = REPO / "configs"
NEEDS_PATH = {"model": ["model.name_or_path=" + str(REPO / "trainer/builtin/tiny-llama")],
              "data": ["data.train_files=[" + str(REPO / "samples/chat/train.jsonl") + "]"]}


def shipped(group):
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


@pytest.mark.parametrize("group", ["model", "data", "peft", "deepspeed", "optim", "cluster", "logger", "experiment"])
def test_every_shipped_config_composes_and_validates(group):
    names = shipped(group)
    assert names, f"no configs in configs/{group}"
    for name in names:
        overrides = [f"{group}={name}"]
        cfg = None
        try:
            cfg = compose(overrides, validate_files=False)
        except ConfigError as err:  # a preset that needs a user value must say which key
            assert "name_or_path" in str(err) or "train_files" in str(err), f"{group}={name}: {err}"
            cfg = compose(overrides + NEEDS_PATH[group], validate_files=False)
        assert isinstance(cfg, RootConfig)


def test_default_config_is_the_demo_and_valid():
    cfg = compose([])
    assert cfg.model.name_or_path == "builtin:tiny-llama"
    assert cfg.cluster.nproc_per_node == 2 and cfg.deepspeed.stage == 3
    assert all(Path(f).is_file() for f in cfg.data.train_files)


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=0"], "optim.lr"),
    (["optim.lr=-1e-4"], "optim.lr"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["train.max_steps=0"], "train.max_steps"),
    (["deepspeed=zero0", "deepspeed.offload_optimizer=true"], "deepspeed.offload_optimizer"),
    (["deepspeed=zero2", "deepspeed.offload_param=true"], "deepspeed.offload_param"),
    (["train.global_batch_size=10"], "train.global_batch_size"),
    (["peft=lora", "peft.quantize_4bit=true", "cluster.device=cpu"], "peft.quantize_4bit"),
    (["peft.method=adapterX"], "peft.method"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["peft=lora", "peft.modules_to_save=[lm_head]", "deepspeed=zero3"], "peft.modules_to_save"),
    (["data.train_files=[/nonexistent/file.jsonl]"], "data.train_files"),
    (["model.name_or_path=/nonexistent/model"], "model.name_or_path"),
])
def test_invalid_values_are_rejected_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        compose(overrides + ["cluster.device=cpu"])
    assert key in str(err.value)


def test_global_batch_error_suggests_the_grad_accum_that_fits():
    with pytest.raises(ConfigError) as err:
        compose(["train.global_batch_size=16", "train.micro_batch_size=2", "cluster.nproc_per_node=2"])
    assert "train.grad_accum=4" in str(err.value)


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        compose(["optim.lr=0", "train.micro_batch_size=0", "cluster.device=cpu"])
    assert len(err.value.problems) == 2


def test_cli_rejects_before_spawning(tmp_path):
    run_dir = tmp_path / "run"
    for overrides, needle in ([["optim.lr=-1"], "optim.lr"], [["train.foo=1"], "foo"],
                              [["train.max_steps=abc"], "train.max_steps"]):
        proc = shardtune("train", f"run.dir={run_dir}", *overrides, timeout=120)
        assert proc.returncode != 0, proc.stdout
        assert needle in proc.stdout
        assert not (run_dir / "config.yaml").exists(), "a run directory was written for an invalid config"
    (tmp_path / "a-file").write_text("")
    proc = shardtune("train", f"run.dir={tmp_path / 'a-file' / 'run'}", timeout=120)
    assert proc.returncode == 2 and "cannot be created (Not a directory)" in proc.stdout, proc.stdout[-2000:]
    assert "Traceback" not in proc.stdout


def test_hydra_flags_keep_working(tmp_path):
    proc = shardtune("train", "--cfg", "job", "peft=lora", timeout=120, check=True)
    assert "method: lora" in proc.stdout
    help_text = shardtune("train", "--help", timeout=120, check=True).stdout
    assert "Config groups" in help_text and "deepspeed: zero0, zero1, zero2, zero3, zero3_offload" in help_text
    assert "usage: shardtune" in shardtune("--help", check=True).stdout


def test_print_mode_writes_run_dir_and_prints_manual_commands(tmp_path):
    run_dir = tmp_path / "run"
    proc = shardtune("train", f"run.dir={run_dir}", "run.launch=print", check=True, timeout=120)
    assert "deepspeed --num_gpus 2 --module trainer --run-dir" in proc.stdout
    assert "torchrun" in proc.stdout
    for name in ("config.yaml", "ds_config.json", "env.json"):
        assert (run_dir / name).is_file()
    dry = shardtune("train", f"run.dir={run_dir}", "run.launch=dry_run", check=True, timeout=120).stdout
    assert "-m launcher.deepspeed_launch --world_info=" in dry and "DS_ACCELERATOR=cpu" in dry


def test_ds_config_is_derived_from_the_config():
    cfg = compose(["deepspeed=zero3_offload", "train.micro_batch_size=3", "train.grad_accum=2", "optim.grad_clip=0.5",
                   "cluster.device=cpu"])
    ds = build_ds_config(cfg, world_size=4, on_gpu=False)
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] is False  # fp32 on CPU by default
    assert build_ds_config(cfg, world_size=1, on_gpu=True)["bf16"]["enabled"] is True
    cfg.deepspeed.extra = {"zero_optimization": {"reduce_bucket_size": 123}}
    assert build_ds_config(cfg, 1, False)["zero_optimization"]["reduce_bucket_size"] == 123


def test_validate_passes_a_good_config_through():
    cfg = compose(["cluster.device=cpu"])
    assert validate(cfg, has_cuda=False) is cfg


@pytest.mark.parametrize("command", ["train", "preflight", "bench"])
@pytest.mark.parametrize("override, needles", [
    ("train.foo=1", ["train.foo is not a setting of shardtune's config", "shardtune config"]),
    ("optim.lrr=1e-4", ["optim.lrr is not a setting", "did you mean optim.lr"]),
    ("model=nosuch", ["model/nosuch", "tiny_llama"]),
    ("train.micro_batch_size=abc", ["train.micro_batch_size=abc", "Integer"])])
def test_subcommands_name_a_bad_override_without_a_traceback(command, override, needles):
    proc = shardtune(command, override, timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "Traceback" not in proc.stdout
    for needle in needles:
        assert needle in proc.stdout


def test_every_setting_is_described_in_the_schema():
    """`shardtune config` reads descriptions from the comments beside the schema's fields: a key added
    without one would be listed with no word of what it does."""
    from launcher.config_cmd import settings

    undescribed = [s.key for s in settings() if not s.description]
    assert not undescribed, f"keys with no comment in trainer/config.py: {undescribed}"


def test_config_command_describes_keys_groups_and_presets():
    out = shardtune("config", "optim.lr", "peft", "peft=lora", check=True).stdout
    assert "optim.lr  (float, default 0.0002)" in out and "peak learning rate" in out
    assert "peft=NAME picks a preset: dora, ia3, lora, none, prefix_tuning" in out
    assert "peft.r  (int, default 16)" in out  # peft=lora's preset value, not the schema's 8
    assert "valid: none, lora, dora, ia3, prefix_tuning" in out
    typo = shardtune("config", "optim.lrr")
    assert typo.returncode == 2 and "did you mean optim.lr" in typo.stdout
    # the habits of other tools: `train --help KEY`, and `train --version` naming ours, not Hydra's
    assert "deepspeed.stage  (int, default 3)" in shardtune("train", "--help", "deepspeed.stage", check=True).stdout
    assert shardtune("train", "--version", check=True).stdout.startswith("shardtune ")
