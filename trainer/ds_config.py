"""Derive the exact DeepSpeed config from a shardtune config.

This is the only place a DeepSpeed config is made: the launcher writes its result to
`ds_config.json` and the engine is given that file, so the two can never drift apart.

With `deepspeed.config_file=ds_z3.json` (the HF Trainer / Axolotl habit) the user's JSON is the
base and this config fills it. Who decides each value:

* Keys shardtune owns: the batch sizes (`train_micro_batch_size_per_gpu`, `gradient_accumulation_steps`,
  `train_batch_size`), `gradient_clipping`, `bf16.enabled` / `fp16.enabled`, and the optimizer and
  scheduler sections' values. This config always decides; the file may say "auto", leave the key out,
  or state the same value. Any other value is a conflict, refused before any process starts, as HF
  Trainer refuses a mismatch with its TrainingArguments.
* Keys DeepSpeed owns (`zero_optimization.*`, fp16 loss scaling, communication, ...): the file's
  concrete value wins over shardtune's *defaults* and is written back into this config (config.yaml
  says the same stage as ds_config.json, which evaluation and resume rely on). A key you changed from
  its default (`deepspeed=zero2`, `deepspeed.stage=1`, `deepspeed.offload_optimizer=true`) that the file
  contradicts is a conflict. A value equal to the default cannot be told apart from no value: with
  `deepspeed.stage=3` (the default) the file's stage is used.
* "auto" in the file: filled from this config; `reduce_bucket_size`, `stage3_prefetch_bucket_size` and
  `stage3_param_persistence_threshold` as HF Trainer fills them, from the model's hidden size h (h*h,
  0.9*h*h, 10*h; the last two under ZeRO-3) when its config.json is at hand before launch, else
  shardtune's own choice (DeepSpeed's default). An "auto" nobody can fill is refused.
* The optimizer and scheduler are built by shardtune (trainer/optim.py) from `optim.*`: a file's
  "optimizer" section must be Adam/AdamW and its "scheduler" section WarmupLR (optim.scheduler=constant),
  WarmupDecayLR (linear, to 0) or WarmupCosineLR (cosine); their values are checked like the batch
  sizes, then the sections are left out of ds_config.json (the engine gets shardtune's optimizer).
  Anything else in them is refused, never ignored.
* `deepspeed.extra` is merged last and wins over the file.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from trainer.config import ConfigError, DeepSpeedConfig, RootConfig

AUTO = "auto"


CPU_REDUCE_BUCKET = 10_000_000


def resolve_precision(cfg: RootConfig, on_gpu: bool) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if on_gpu else "fp32"


def _zero_section(cfg: RootConfig, on_gpu: bool) -> Dict[str, Any]:
    ds = cfg.deepspeed
    zero: Dict[str, Any] = {"stage": ds.stage}
    if ds.stage == 0:
        return zero
    zero["contiguous_gradients"] = ds.contiguous_gradients
    # Overlapping communication with compute pays on GPU streams; on CPU it only adds copies.
    zero["overlap_comm"] = on_gpu if ds.overlap_comm is None else ds.overlap_comm
    reduce_bucket = ds.reduce_bucket_size
    if reduce_bucket is None and not on_gpu:
        # DeepSpeed's default (5e8 elements) is sized for GPUs; ZeRO-2/3 allocate it whole, which
        # is 2 GB of fp32 per rank before the first step. On CPU a 1e7 bucket costs 40 MB.
        reduce_bucket = CPU_REDUCE_BUCKET
    optional = {
        "reduce_bucket_size": reduce_bucket,
        "allgather_bucket_size": ds.allgather_bucket_size if ds.stage < 3 else None,
        "stage3_prefetch_bucket_size": ds.stage3_prefetch_bucket_size if ds.stage == 3 else None,
        "stage3_param_persistence_threshold": ds.stage3_param_persistence_threshold if ds.stage == 3 else None,
        "stage3_max_live_parameters": ds.stage3_max_live_parameters if ds.stage == 3 else None,
    }
    zero.update({k: v for k, v in optional.items() if v is not None})
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    if ds.stage == 3:
        # Saving a 16-bit model at the end gathers it on rank 0; exports stream instead.
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        if ds.zero_hpz_partition_size > 1:
            zero["zero_hpz_partition_size"] = ds.zero_hpz_partition_size
        if ds.zero_quantized_weights:
            zero["zero_quantized_weights"] = True
        if ds.zero_quantized_gradients:
            zero["zero_quantized_gradients"] = True
    return zero


def _deep_merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = value
    return base


def _shardtune_ds_config(cfg: RootConfig, world_size: int, on_gpu: bool) -> Dict[str, Any]:
    """The DeepSpeed config from this config alone (no user file, no `extra`)."""
    precision = resolve_precision(cfg, on_gpu)
    train = cfg.train
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "train_batch_size": train.micro_batch_size * train.grad_accum * world_size,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": _zero_section(cfg, on_gpu),
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 10**9,  # the trainer logs; keep DeepSpeed's own printing quiet
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def build_ds_config(cfg: RootConfig, world_size: int, on_gpu: bool) -> Dict[str, Any]:
    """The DeepSpeed config for `cfg` on `world_size` ranks.

    The optimizer and scheduler are built by the trainer (they need the parameter groups and the
    exact schedule shape), so they are not part of this dict; gradient clipping is. With
    deepspeed.config_file, the file's content (read at launch into deepspeed.config_file_content, see
    `adopt_user_ds_config`) is the base: the module docstring gives the rules. A conflict raises
    ConfigError.
    """
    ours = _shardtune_ds_config(cfg, world_size, on_gpu)
    if cfg.deepspeed.config_file:
        if cfg.deepspeed.config_file_content is None:
            raise ConfigError([f"deepspeed.config_file={cfg.deepspeed.config_file}: not read yet; the launcher "
                               "reads it while validating (trainer/validate.py)"])
        ours, problems = merge_user_ds_config(cfg, cfg.deepspeed.config_file_content, ours, world_size, on_gpu)
        problems += _disagreements(cfg)
        if problems:
            raise ConfigError(problems)
    return _deep_merge(ours, copy.deepcopy(dict(cfg.deepspeed.extra)))


# ---------------------------------------------------------------- the user's own DeepSpeed JSON

def _file_label(cfg: RootConfig) -> str:
    return f"deepspeed.config_file={cfg.deepspeed.config_file}"


def read_user_ds_config(path_text: str) -> Tuple[Path, Dict[str, Any]]:
    """(absolute path, JSON object) of the user's file; `~` expanded, relative to the current directory
    (the user's, at launch: Hydra does not change it). Problems raise ConfigError naming the file."""
    path = Path(os.path.expanduser(path_text)).resolve()
    key = f"deepspeed.config_file={path_text}"
    if not path.is_file():
        raise ConfigError([f"{key}: no such file ({path}); give a DeepSpeed JSON such as ds_z3.json "
                           "(relative paths are from the directory you launch from)"])
    try:
        content = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError([f"{key}: not valid JSON ({err}); give a DeepSpeed config file"]) from None
    if not isinstance(content, dict):
        raise ConfigError([f"{key}: holds a JSON {type(content).__name__}, not an object; a DeepSpeed config "
                           'is an object such as {"zero_optimization": {"stage": 3}}'])
    return path, content


def _lookup(tree: Dict[str, Any], dotted: str) -> Any:
    """The value at `dotted` in a nested dict; None when any part is missing."""
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _same(a: Any, b: Any) -> bool:
    """JSON values equal as DeepSpeed reads them: 1 == 1.0, 5e8 == 500000000, [0.9, 0.99] == (0.9, 0.99)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def _offloaded(section: Any) -> Any:
    """An offload section as deepspeed.offload_*: offloaded unless its device is none ("auto" stays)."""
    device = section.get("device", "none") if isinstance(section, dict) else section
    return AUTO if device == AUTO else device not in (None, "none")


def _whole_as_int(value: Any) -> Any:
    """A JSON number as the config's int fields hold it (5e8 is a float in JSON, an int in DeepSpeedConfig)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


ZERO = "zero_optimization"
# DeepSpeed-owned keys that have a counterpart in DeepSpeedConfig: (file key, our field, file value -> ours).
DEEPSPEED_OWNED: List[Tuple[str, str, Callable[[Any], Any]]] = [
    (f"{ZERO}.stage", "stage", _whole_as_int),
    (f"{ZERO}.offload_optimizer", "offload_optimizer", _offloaded),
    (f"{ZERO}.offload_param", "offload_param", _offloaded),
    (f"{ZERO}.overlap_comm", "overlap_comm", _whole_as_int),
    (f"{ZERO}.contiguous_gradients", "contiguous_gradients", _whole_as_int),
    (f"{ZERO}.reduce_bucket_size", "reduce_bucket_size", _whole_as_int),
    (f"{ZERO}.allgather_bucket_size", "allgather_bucket_size", _whole_as_int),
    (f"{ZERO}.stage3_prefetch_bucket_size", "stage3_prefetch_bucket_size", _whole_as_int),
    (f"{ZERO}.stage3_param_persistence_threshold", "stage3_param_persistence_threshold", _whole_as_int),
    (f"{ZERO}.stage3_max_live_parameters", "stage3_max_live_parameters", _whole_as_int),
    (f"{ZERO}.zero_hpz_partition_size", "zero_hpz_partition_size", _whole_as_int),
    (f"{ZERO}.zero_quantized_weights", "zero_quantized_weights", _whole_as_int),
    (f"{ZERO}.zero_quantized_gradients", "zero_quantized_gradients", _whole_as_int),
]
DEFAULTS = DeepSpeedConfig()


def hidden_size_fill(hidden: int, stage: int) -> Dict[str, int]:
    """HF Trainer's values for the hidden-size "auto" keys (HfTrainerDeepSpeedConfig.trainer_config_finalize)."""
    filled = {"reduce_bucket_size": hidden * hidden}
    if stage == 3:
        filled.update(stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
                      stage3_param_persistence_threshold=10 * hidden)
    return filled


def adopt_user_ds_config(cfg: RootConfig, hidden_size: Callable[[], Optional[int]] = lambda: None) -> List[str]:
    """Read deepspeed.config_file into the config, once, at launch; return the conflicts found.

    Stores the file's JSON in deepspeed.config_file_content and its absolute path in config_file
    (config.yaml then carries both: ranks and requeues never read the user's file), and writes the
    file's concrete DeepSpeed-owned values into deepspeed.* where those are still at their defaults.
    `hidden_size`: gives the model's, when known before launch, for HF Trainer's hidden-size "auto" values
    (asked only when the file has one: finding it may load the model's config).
    """
    ds = cfg.deepspeed
    if not ds.config_file or ds.config_file_content is not None:
        return []  # no file, or read already (a requeue reads config.yaml)
    path, content = read_user_ds_config(ds.config_file)
    ds.config_file, ds.config_file_content = str(path), content
    label = _file_label(cfg)
    problems: List[str] = []
    stage = _lookup(content, f"{ZERO}.stage")
    if stage not in (None, AUTO, 0, 1, 2, 3):
        return [f'{label}: "{ZERO}.stage": {stage!r} is not a ZeRO stage; give 0, 1, 2, 3 or "auto"']
    for file_key, field_name, to_ours in DEEPSPEED_OWNED:
        value = _lookup(content, file_key)
        if value is None or value == AUTO or to_ours(value) == AUTO:
            continue
        value, current, default = to_ours(value), getattr(ds, field_name), getattr(DEFAULTS, field_name)
        if _same(current, default):
            setattr(ds, field_name, value)
        elif not _same(current, value):
            problems.append(
                f'{label}: "{file_key}": {json.dumps(_lookup(content, file_key))} in the file but '
                f"deepspeed.{field_name}={current} in the config (not the default, {default}): the file decides "
                f"DeepSpeed's own settings unless you set them; drop deepspeed.{field_name} (or the deepspeed= "
                f'preset that sets it), write "auto" in the file, or make the two agree')
    autos = [name for name in hidden_size_fill(1, ds.stage)
             if _lookup(content, f"{ZERO}.{name}") == AUTO and getattr(ds, name) is None]
    hidden = hidden_size() if autos else None
    for name in autos if hidden else []:
        setattr(ds, name, hidden_size_fill(hidden, ds.stage)[name])
    return problems


@dataclass
class _Owned:
    """A key shardtune owns: its value, and how to name it in a message and to fix a conflict."""
    file_key: str
    value: Any
    ours: str  # e.g. "train.micro_batch_size=2"
    fix: str  # e.g. "set train.micro_batch_size=4"


def _owned_keys(cfg: RootConfig, ours: Dict[str, Any], world_size: int, on_gpu: bool) -> List[_Owned]:
    t, o, precision = cfg.train, cfg.optim, resolve_precision(cfg, on_gpu)
    prec = (f"deepspeed.precision={cfg.deepspeed.precision}" +
            (f" (bf16 on GPU, fp32 on CPU: {precision} here)" if cfg.deepspeed.precision == "auto" else ""))
    return [
        _Owned("train_micro_batch_size_per_gpu", t.micro_batch_size, f"train.micro_batch_size={t.micro_batch_size}",
               "set train.micro_batch_size={file}"),
        _Owned("gradient_accumulation_steps", t.grad_accum, f"train.grad_accum={t.grad_accum}",
               "set train.grad_accum={file}"),
        _Owned("train_batch_size", ours["train_batch_size"],
               f"train.micro_batch_size={t.micro_batch_size} x train.grad_accum={t.grad_accum} x "
               f"{world_size} rank(s) = {ours['train_batch_size']}",
               "change train.micro_batch_size or train.grad_accum (or cluster.nproc_per_node) to give {file}"),
        _Owned("gradient_clipping", o.grad_clip, f"optim.grad_clip={o.grad_clip}", "set optim.grad_clip={file}"),
        _Owned("bf16.enabled", precision == "bf16", prec, _precision_fix("bf16")),
        _Owned("fp16.enabled", precision == "fp16", prec, _precision_fix("fp16")),
        _Owned("zero_allow_untested_optimizer", True, "shardtune's optimizer (torch AdamW) under ZeRO",
               "remove the key (DeepSpeed calls torch's AdamW under ZeRO untested and refuses it without)"),
    ]


def _precision_fix(name: str) -> str:
    return (f"set deepspeed.precision={name} when the file's value is true; when false, set deepspeed.precision to "
            "the one the file enables (fp32 when it enables neither bf16 nor fp16)")


def _check_owned(cfg: RootConfig, content: Dict[str, Any], owned: List[_Owned], problems: List[str]) -> None:
    for key in owned:
        value = _lookup(content, key.file_key)
        if value is None or value == AUTO or _same(value, key.value):
            continue
        problems.append(f'{_file_label(cfg)}: "{key.file_key}": {json.dumps(value)} in the file but {key.ours} in '
                        f'the config; {key.fix.format(file=json.dumps(value))}, or write "auto" in the file '
                        "(shardtune then fills it)")


SCHEDULERS = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}


def _optimizer_owned(cfg: RootConfig) -> Dict[str, Tuple[Any, str]]:
    o = cfg.optim
    return {"lr": (o.lr, f"optim.lr={o.lr}"), "betas": ([o.beta1, o.beta2], f"optim.beta1={o.beta1}, optim.beta2={o.beta2}"),
            "eps": (o.eps, f"optim.eps={o.eps}"), "weight_decay": (o.weight_decay, f"optim.weight_decay={o.weight_decay}"),
            "adam_w_mode": (True, "shardtune's AdamW (decoupled weight decay)"),
            "torch_adam": (None, ""), "bias_correction": (True, "shardtune's AdamW (with bias correction)")}


def _scheduler_owned(cfg: RootConfig, kind: str) -> Dict[str, Tuple[Any, str]]:
    o = cfg.optim
    owned = {"warmup_min_lr": (0, "shardtune's warm-up, which starts from 0"),
             "warmup_max_lr": (o.lr, f"optim.lr={o.lr}"),
             "warmup_num_steps": (o.warmup_steps, f"optim.warmup_steps={o.warmup_steps}"),
             "warmup_type": ("linear", "shardtune's warm-up, which is linear"),
             "last_batch_iteration": (-1, "shardtune's scheduler, which resumes from its checkpoint")}
    if kind != "WarmupLR":
        owned["total_num_steps"] = (cfg.train.max_steps, f"train.max_steps={cfg.train.max_steps}")
    if kind == "WarmupCosineLR":
        owned["cos_min_ratio"] = (o.min_lr_ratio, f"optim.min_lr_ratio={o.min_lr_ratio}")
        owned["warmup_min_ratio"] = (0, "shardtune's warm-up, which starts from 0")
    return owned


def _check_params(cfg: RootConfig, section: str, params: Any, owned: Dict[str, Tuple[Any, str]],
                  problems: List[str]) -> None:
    if not isinstance(params, dict):
        problems.append(f'{_file_label(cfg)}: "{section}.params" must be an object')
        return
    for name, value in params.items():
        key = f"{section}.params.{name}"
        if name not in owned:
            problems.append(f'{_file_label(cfg)}: "{key}" is not a setting of shardtune\'s {section}; remove it '
                            f"(understood: {', '.join(sorted(owned))})")
        elif value != AUTO and owned[name][0] is not None and not _same(value, owned[name][0]):
            problems.append(f'{_file_label(cfg)}: "{key}": {json.dumps(value)} in the file but {owned[name][1]} '
                            'in the config; make them agree, or write "auto" in the file')


def _check_optimizer(cfg: RootConfig, content: Dict[str, Any], problems: List[str]) -> None:
    section = content.get("optimizer")
    if section is None:
        return
    kind = section.get("type") if isinstance(section, dict) else None
    if str(kind).lower() not in ("adam", "adamw"):
        problems.append(f'{_file_label(cfg)}: "optimizer.type": {json.dumps(kind)}: shardtune builds AdamW itself '
                        f'(optim.name={cfg.optim.name}); use "AdamW" with "auto" params, or remove the section')
        return
    _check_params(cfg, "optimizer", section.get("params", {}), _optimizer_owned(cfg), problems)


def _check_scheduler(cfg: RootConfig, content: Dict[str, Any], problems: List[str]) -> None:
    section = content.get("scheduler")
    if section is None:
        return
    kind = section.get("type") if isinstance(section, dict) else None
    if kind not in SCHEDULERS:
        problems.append(f'{_file_label(cfg)}: "scheduler.type": {json.dumps(kind)} is not one shardtune builds; use '
                        "WarmupLR, WarmupDecayLR or WarmupCosineLR, or remove the section (optim.scheduler decides)")
        return
    if SCHEDULERS[kind] != cfg.optim.scheduler:
        problems.append(f'{_file_label(cfg)}: "scheduler.type": "{kind}" in the file is optim.scheduler='
                        f"{SCHEDULERS[kind]} but the config has optim.scheduler={cfg.optim.scheduler}; set "
                        f"optim.scheduler={SCHEDULERS[kind]}, or remove the section")
    if kind == "WarmupDecayLR" and cfg.optim.min_lr_ratio != 0:
        problems.append(f'{_file_label(cfg)}: "scheduler.type": "WarmupDecayLR" decays to 0 but optim.min_lr_ratio='
                        f"{cfg.optim.min_lr_ratio}; set optim.min_lr_ratio=0, or remove the section")
    _check_params(cfg, "scheduler", section.get("params", {}), _scheduler_owned(cfg, kind), problems)


def _fill(base: Dict[str, Any], ours: Dict[str, Any], prefix: str, unfilled: List[str]) -> None:
    """Keys the file leaves out or says "auto" for take our value; its concrete values stay."""
    for key, value in ours.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _fill(base[key], value, f"{prefix}{key}.", unfilled)
        elif key not in base or base[key] == AUTO:
            base[key] = value
    for key, value in list(base.items()):
        if value == AUTO:
            unfilled.append(f"{prefix}{key}")


def _disagreements(cfg: RootConfig) -> List[str]:
    """DeepSpeed-owned values of the file that deepspeed.* does not say (adopt_user_ds_config makes them agree
    at launch; an edited config.yaml could not): the ranks would disagree with ds_config.json."""
    problems = []
    for file_key, field_name, to_ours in DEEPSPEED_OWNED:
        value, current = _lookup(cfg.deepspeed.config_file_content, file_key), getattr(cfg.deepspeed, field_name)
        if value not in (None, AUTO) and to_ours(value) != AUTO and not _same(to_ours(value), current):
            problems.append(f'{_file_label(cfg)}: "{file_key}": {json.dumps(value)} in the file but '
                            f"deepspeed.{field_name}={current} in the config; make them agree")
    return problems


def merge_user_ds_config(cfg: RootConfig, content: Dict[str, Any], ours: Dict[str, Any], world_size: int,
                         on_gpu: bool) -> Tuple[Dict[str, Any], List[str]]:
    """(the file's JSON with every "auto" filled from `ours`, the conflicts); see the module docstring."""
    problems: List[str] = []
    _check_owned(cfg, content, _owned_keys(cfg, ours, world_size, on_gpu), problems)
    _check_optimizer(cfg, content, problems)
    _check_scheduler(cfg, content, problems)
    merged = {k: v for k, v in copy.deepcopy(content).items() if k not in ("optimizer", "scheduler")}
    hidden_keys = [f"{ZERO}.{k}" for k in hidden_size_fill(1, 3)]
    for key in hidden_keys:  # no hidden size known and no value of ours: DeepSpeed's default, as without "auto"
        if _lookup(merged, key) == AUTO and _lookup(ours, key) is None:
            del merged[ZERO][key.split(".", 1)[1]]
    unfilled: List[str] = []
    _fill(merged, ours, "", unfilled)
    problems += [f'{_file_label(cfg)}: "{key}" is "auto" but shardtune has no value for it; give a value in the file'
                 for key in unfilled]
    return merged, problems


def job_on_gpu(cfg: RootConfig, has_cuda: bool) -> bool:
    """Whether the ranks will run on GPUs. A Slurm job decides on the compute nodes, not on this (login)
    node: the same rule as launcher/slurm.py `derive_for_compute_nodes`."""
    if cfg.cluster.backend == "slurm":
        return cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and cfg.cluster.slurm.gpus_per_node > 0)
    return cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and has_cuda)


def user_ds_config_problems(cfg: RootConfig, world_size: int, on_gpu: bool) -> List[str]:
    """The conflicts between deepspeed.config_file and this config (after `adopt_user_ds_config`)."""
    if not cfg.deepspeed.config_file or cfg.deepspeed.config_file_content is None:
        return []
    ours = _shardtune_ds_config(cfg, world_size, on_gpu)
    return merge_user_ds_config(cfg, cfg.deepspeed.config_file_content, ours, world_size, on_gpu)[1]
