"""Convert a checkpoint to DeepSpeed's universal format, loadable on any world size and ZeRO stage.

`ds_to_universal` writes one folder per parameter under `zero/` (fp32 master weights and Adam
moments) plus `zero/optimizer_state.pt`. DeepSpeed 0.19.8 writes them in two dialects, by the
stage the checkpoint was SAVED with, while its loaders expect the dialect of the stage they load
INTO:

    saved with ZeRO-3: per-parameter files are flat tensors, no `step.pt`, and
        optimizer_state.pt lacks `ds_version` -> ZeRO-1/2 refuses it ("Empty ds_version").
    saved with ZeRO-1/2: per-parameter files are `{"param": shaped tensor}` plus `step.pt`, and
        optimizer_state.pt lacks the nested `optimizer_state_dict` the ZeRO-3 loader reads.

`to_universal` therefore rewrites the result into one dialect both loaders accept (the ZeRO-1/2
files, which the ZeRO-3 loader also reads, plus the keys each loader needs), so a run can change
its world size and its ZeRO stage in one resume.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from trainer.checkpoint import (STATE, CheckpointError, preverify_loadable, safe_load, verify,
                                write_manifest)

PARAM = "param"  # deepspeed.checkpoint.constants.PARAM
OPTIM_SD = "optimizer_state_dict"  # deepspeed.checkpoint.constants.OPTIMIZER_STATE_DICT
MOMENTS = ("fp32", "exp_avg", "exp_avg_sq")


def universal_folder(folder: Path) -> Path:
    return Path(folder).parent / "universal" / Path(folder).name


def to_universal(folder: Path, log=print) -> Path:
    """Convert a committed checkpoint to DeepSpeed's universal format (once; later calls reuse it).

    Runs in one process, before any rank starts (no collective can time out while it works). The
    result is a committed checkpoint of its own: written to a temporary folder, manifest last, then
    renamed into place, so an interrupted conversion is never used.
    """
    folder = Path(folder)
    out = universal_folder(folder)
    if out.is_dir() and verify(out, deep=False) is None:
        return out
    preverify_loadable(folder)  # ds_to_universal unpickles with weights_only=False: check first
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    # --inject_missing_state: ZeRO-1/2 conversion demands Megatron's `universal_checkpoint_info`
    # (tensor-parallel merge patterns); a plain data-parallel model has none, and the flag supplies
    # the empty default.
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(folder), "--output_folder", str(tmp), "--inject_missing_state"],
                          capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR", "cpu")})
    if proc.returncode != 0:
        raise CheckpointError(f"converting {folder} to a universal checkpoint failed "
                              f"(exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    make_stage_neutral(tmp, folder)
    for extra in [folder / STATE, *sorted(folder.glob("rng_rank*.pt"))]:
        shutil.copy2(extra, tmp / extra.name)
    write_manifest(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"converted {folder.name} to a universal checkpoint in {time.perf_counter() - started:.1f}s: {out}")
    return out


def wait_for_universal(folder: Path, timeout_s: float, log=print, poll_s: float = 2.0) -> Path:
    """The universal copy of `folder` that another process (node 0's launcher) is writing, once committed.

    No-ssh node launchers share the run directory: one converts, the others wait, so that two
    conversions never write the same folder. A large model converts for minutes: the wait lasts
    while the conversion's files keep changing, and ends `timeout_s` after the last change."""
    out = universal_folder(folder)
    tmp, last_change, said = out.with_name(out.name + ".tmp"), time.time(), False
    while not (out.is_dir() and verify(out, deep=False) is None):
        last_change = max(last_change, _newest_change(tmp))
        if time.time() - last_change > timeout_s:
            raise CheckpointError(f"no universal checkpoint appeared at {out} after {timeout_s:.0f}s without "
                                  f"progress (cluster.timeout_s): node 0's launcher converts {folder.name} for "
                                  "all nodes; start it too, or read its output for why the conversion failed")
        if not said:
            log(f"waiting for node 0's launcher to convert {folder.name} to a universal checkpoint")
            said = True
        time.sleep(poll_s)
    return out


def _newest_change(tree: Path) -> float:
    """The newest modification time under `tree`, 0 if there is none.

    The writer renames the folder into place while this runs: os.walk skips a folder that
    vanished (rglob raised), and a file gone between listing and stat is skipped too."""
    newest = 0.0
    for root, _dirs, files in os.walk(tree):
        for path in [root] + [os.path.join(root, name) for name in files]:
            try:
                newest = max(newest, os.stat(path).st_mtime)
            except OSError:
                continue
    return newest


def make_stage_neutral(out: Path, source: Path) -> None:
    """Rewrite a fresh `ds_to_universal` output so that ZeRO-1, 2 and 3 all load it (see the module doc)."""
    model_states = sorted(out.glob("*model_states.pt"))
    if not model_states:
        raise CheckpointError(f"{out}: ds_to_universal wrote no *model_states.pt")
    # The engine reads its metadata from the file named for the stage it loads into.
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if not (out / name).exists():
            shutil.copy2(model_states[0], out / name)
    shapes = _param_shapes(safe_load(model_states[0], map_location="cpu"), model_states[0])
    step = _complete_optimizer_state(out / "zero" / "optimizer_state.pt", source)
    for param_dir in sorted(p for p in (out / "zero").iterdir() if p.is_dir()):
        _shape_param_files(param_dir, shapes.get(param_dir.name), step)


def _param_shapes(model_states: Dict[str, Any], path: Path) -> Dict[str, torch.Size]:
    """Every parameter's shape, tied ones (lm_head.weight -> embed_tokens.weight) included."""
    groups = model_states.get("param_shapes")
    if not groups:
        raise CheckpointError(f"{path}: no param_shapes (not a ZeRO checkpoint?)")
    groups = groups if isinstance(groups, list) else [groups]
    shapes = {name: torch.Size(shape) for group in groups for name, shape in group.items()}
    for tied, owner in (model_states.get("shared_params") or {}).items():
        if owner in shapes:
            shapes.setdefault(tied, shapes[owner])
    return shapes


def _complete_optimizer_state(path: Path, source: Path):
    """Give optimizer_state.pt the keys of both dialects; return the optimizer step it holds."""
    state = safe_load(path, map_location="cpu")
    if not state.get("ds_version"):
        optim_files = sorted(source.glob("*optim_states.pt"))
        state["ds_version"] = safe_load(optim_files[0], map_location="cpu")["ds_version"]
    if OPTIM_SD in state:  # saved with ZeRO-3: the step lives in the nested optimizer state
        step = state[OPTIM_SD]["state"][0]["step"]
    else:  # saved with ZeRO-1/2: every parameter folder has the same step.pt
        step = safe_load(next(path.parent.glob("*/step.pt")), map_location="cpu")
        state[OPTIM_SD] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    torch.save(state, path)
    return step


def _shape_param_files(param_dir: Path, shape: Optional[torch.Size], step) -> None:
    """Flat tensors -> {"param": tensor of the parameter's shape}; add step.pt where missing."""
    if not (param_dir / "fp32.pt").is_file():
        raise CheckpointError(f"{param_dir / 'fp32.pt'}: missing from the universal checkpoint")
    for key in MOMENTS:  # a tied parameter's folder (lm_head.weight) holds only fp32.pt
        path = param_dir / f"{key}.pt"
        if not path.is_file():
            continue
        value = safe_load(path, map_location="cpu")
        if isinstance(value, torch.Tensor):
            if shape is None:
                raise CheckpointError(f"{path}: a flat tensor, and the model states name no shape for it")
            if value.numel() != math.prod(shape):
                raise CheckpointError(f"{path}: {value.numel()} values for a parameter of shape {tuple(shape)}")
            torch.save({PARAM: value.reshape(shape)}, path)
    if not (param_dir / "step.pt").is_file():
        torch.save(step, param_dir / "step.pt")
