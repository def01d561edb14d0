"""Hydra's flags for where a config comes from work on every command that composes a config (train,
preflight, data preview, bench): a folder of the user's own configs (`-cd DIR` / `--config-dir DIR`),
a primary config of their own (`-cn NAME`) and `--cfg` (print the composed config, run nothing)."""
from __future__ import annotations

import pytest

from launcher import cli
from launcher.compose import compose
from trainer.config import ConfigError


@pytest.fixture
def user_configs(tmp_path):
    folder = tmp_path / "my-configs"
    (folder / "model").mkdir(parents=True)
    (folder / "model" / "mine.yaml").write_text("name_or_path: builtin:tiny-llama\nfamily: llama\ndtype: float32\n")
    return folder


def test_compose_searches_the_users_folder_besides_ours(user_configs):
    cfg = compose(["model=mine", "peft=lora"], validate_files=False, config_dirs=[str(user_configs)])
    assert cfg.model.name_or_path == "builtin:tiny-llama" and cfg.model.dtype == "float32"
    with pytest.raises(ConfigError, match="model=mine|Could not find 'model/mine'"):
        compose(["model=mine"], validate_files=False)  # not found without the folder
    with pytest.raises(ConfigError, match="not a folder"):
        compose([], config_dirs=[str(user_configs / "nope")])


@pytest.mark.parametrize("command", [
    ["train", "-cd", "{dir}", "model=mine", "--cfg", "job"],
    ["preflight", "-cd", "{dir}", "model=mine"],
    ["preflight", "--config-dir", "{dir}", "model=mine", "--json"],
    ["data", "preview", "-n", "1", "--no-color", "--config-dir", "{dir}", "model=mine"],
])
def test_every_composing_command_takes_a_config_dir(user_configs, command, capsys):
    argv = [part.format(dir=user_configs) for part in command]
    try:
        code = cli.main(argv)
    except SystemExit as exit_:  # Hydra's main exits on --cfg
        code = exit_.code or 0
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]


def test_bench_passes_the_config_dir_to_its_runs(user_configs):
    from launcher.bench_cmd import parse_args

    args = parse_args(["--steps", "2", "-cd", str(user_configs), "model=mine"])
    assert args.config_dirs == [str(user_configs)] and args.overrides == ["model=mine"]


@pytest.mark.parametrize("command", [["preflight"], ["data", "preview"], ["bench"]])
def test_every_composing_command_takes_a_config_name_and_prints_the_config(user_configs, command, capsys):
    """Hydra's -cn (a primary config of the user's own) and --cfg (print it, run nothing), as on train."""
    (user_configs / "mine.yaml").write_text("defaults:\n  - config\n  - _self_\ntrain:\n  max_steps: 7\n")
    code = cli.main([*command, "-cd", str(user_configs), "-cn", "mine", "--cfg"])
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    assert "max_steps: 7" in out.out and "name_or_path: builtin:tiny-llama" in out.out
