"""Compose a config exactly as `shardtune train` does, without launching: Hydra's one entry point
for every command (train, preflight, data preview, bench), and the one answer to "is there a GPU?".

Hydra runs only in the launcher: the workers read the resolved run directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from launcher.resources import BUNDLED, CONFIG_DIR
from trainer.config import RootConfig, to_config
from trainer.validate import ConfigError, validate

__all__ = ["CONFIG_DIR", "register", "has_cuda", "compose", "composition_problem", "ConfigError"]
PRIMARY = "config"  # configs/config.yaml: the primary config, whose defaults list picks each group's preset


def register() -> None:
    """Make the schema and the `${st.root:}` resolver known to Hydra: the folder of shardtune's own
    files (`${st.root:}/samples/...` is the shipped sample data, in a checkout or a wheel)."""
    ConfigStore.instance().store(name="shardtune_schema", node=RootConfig)
    if not OmegaConf.has_resolver("st.root"):
        OmegaConf.register_new_resolver("st.root", lambda: str(BUNDLED))


def has_cuda(cfg: RootConfig) -> bool:
    """Whether this launch runs on GPUs: cluster.device=cpu says no, else whether CUDA is visible here."""
    if cfg.cluster.device == "cpu":
        return False
    from launcher.devices import gpu_count

    return gpu_count() > 0


def add_config_options(parser) -> None:
    """Hydra's flags for where a config comes from, on a command that composes one as `shardtune train`
    does: `-cd DIR` (a folder of the user's own configs, searched besides shardtune's), `-cn NAME` (the
    primary config: DIR/NAME.yaml instead of config.yaml) and `--cfg` (print the composed config, run
    nothing)."""
    parser.add_argument("-cd", "--config-dir", dest="config_dirs", action="append", default=[], metavar="DIR",
                        help="a folder of your own configs (e.g. DIR/model/mine.yaml for model=mine), as for "
                             "shardtune train")
    parser.add_argument("-cn", "--config-name", dest="config_name", default=PRIMARY, metavar="NAME",
                        help=f"the primary config, NAME.yaml in a config folder (default: {PRIMARY})")
    parser.add_argument("--cfg", nargs="?", const="job", choices=["job"], default=None,
                        help="print the composed config (as `shardtune train --cfg job` would) and run nothing")


def config_dir_overrides(config_dirs: Sequence[str]) -> List[str]:
    """The Hydra override that adds `config_dirs` to the config search path."""
    folders = [Path(d).expanduser().resolve() for d in config_dirs]
    missing = [str(d) for d in folders if not d.is_dir()]
    if missing:
        raise ConfigError([f"--config-dir {missing[0]}: not a folder; give a folder of config files"])
    return [f"hydra.searchpath=[{','.join(f'file://{d}' for d in folders)}]"] if folders else []


def compose(overrides: List[str], validate_files: bool = True, on_gpu: Optional[bool] = None,
            config_dirs: Sequence[str] = (), config_name: str = PRIMARY) -> RootConfig:
    """The config `shardtune train OVERRIDES` would run, composed and validated, without launching.

    For the subcommands that need a config but no run (preflight, data preview, bench). `on_gpu`
    validates it as for a machine with (True) or without (False) GPUs instead of this one: a CPU
    login node estimating a GPU job. `config_dirs`, `config_name`: the user's own config folders (`-cd`)
    and primary config (`-cn`).
    """
    cfg = to_config(compose_node(overrides, config_dirs, config_name))
    return validate(cfg, has_cuda=has_cuda(cfg) if on_gpu is None else on_gpu, check_files=validate_files)


def compose_node(overrides: List[str], config_dirs: Sequence[str] = (), config_name: str = PRIMARY):
    """Hydra's composition alone (no schema binding, no validation); a bad override is a ConfigError
    that says which, not a traceback."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register()
    primary_dir, searched = primary_folder(config_name, config_dirs)
    try:
        with initialize_config_dir(version_base="1.3", config_dir=str(primary_dir), job_name="shardtune"):
            return hydra_compose(config_name=config_name, overrides=[*config_dir_overrides(searched), *overrides])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError([composition_problem(err)]) from None


def primary_folder(config_name: str, config_dirs: Sequence[str]) -> tuple:
    """(the folder holding the primary config, the other folders to search). Hydra finds a primary config
    only in the folder it starts from, not in folders added to its search path: a user's own primary
    config (`-cn mine` with `-cd DIR`) makes DIR that folder, and shardtune's configs are searched."""
    if config_name != PRIMARY:
        for folder in config_dirs:
            if (Path(folder).expanduser() / f"{config_name}.yaml").is_file():
                return Path(folder).expanduser().resolve(), [str(CONFIG_DIR), *(d for d in config_dirs if d != folder)]
    return CONFIG_DIR, list(config_dirs)


def config_yaml(cfg: RootConfig) -> str:
    """The composed config as YAML, as `--cfg` prints it."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def schema_keys(node: type = RootConfig, prefix: str = "") -> List[str]:
    """Every key of the config schema, dotted (optim.lr, cluster.slurm.time, ...)."""
    import dataclasses
    import typing

    keys = []
    for name, hint in typing.get_type_hints(node).items():
        keys.append(f"{prefix}{name}")
        if dataclasses.is_dataclass(hint):
            keys += schema_keys(hint, f"{prefix}{name}.")
    return keys


def unknown_key_problem(text: str) -> Optional[str]:
    """In our words, for an override naming a key the schema does not have: the closest valid keys
    (Hydra's own advice, `+key=...`, would only be refused by the schema next)."""
    import difflib
    import re

    match = re.search(r"Could not override '([^']+)'", text) or re.search(r"Key '([^']+)' is not in struct", text)
    if not match:
        return None
    key = match.group(1)
    close = difflib.get_close_matches(key, schema_keys(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    return (f"{key} is not a setting of shardtune's config; {hint}`shardtune config` describes every key "
            "(`shardtune train --help` lists the groups)")


def composition_problem(err: Exception) -> str:
    """Hydra's message for a bad override, with the schema's reason (e.g. "Key 'foo' not in 'TrainConfig'");
    an unknown key is said in our words with the closest valid ones."""
    ours = unknown_key_problem(str(err))
    if ours:
        return ours
    text = str(err).split("Config search path:")[0]  # Hydra's search path tells a user nothing here
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        reason = str(cause).splitlines()[0]
        if reason not in lines:
            lines.append(reason)
    return "\n    ".join(lines)
