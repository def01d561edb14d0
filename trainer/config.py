"""The typed schema of a shardtune run.

One dataclass per config group. The launcher registers these with Hydra (structured configs), so
an unknown key or a wrong type is rejected while composing; `validate()` adds the cross-field
checks. Workers never run Hydra: they read the resolved `config.yaml` of a run directory back into
these same dataclasses with `load_run_config()`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trainer.peft_methods import NAMES as PEFT_METHODS
from trainer.run_dir import RunDir


def one_of(*choices: Any, default: Any) -> Any:
    """A setting's valid values, written once beside it: validation refuses any other value
    (trainer/validate.py) and `shardtune config KEY` lists them (launcher/config_cmd.py)."""
    assert default in choices, (default, choices)
    return field(default=default, metadata={"choices": choices})


def schema_choices(schema: type = None, prefix: str = "") -> Dict[str, tuple]:
    """Every setting declared with `one_of`, dotted (peft.method -> its valid values)."""
    import dataclasses
    import typing

    schema = schema or RootConfig
    hints = typing.get_type_hints(schema)
    found: Dict[str, tuple] = {}
    for item in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[item.name]):
            found.update(schema_choices(hints[item.name], f"{prefix}{item.name}."))
        elif "choices" in item.metadata:
            found[f"{prefix}{item.name}"] = item.metadata["choices"]
    return found


@dataclass
class ModelConfig:
    # A local Hugging Face folder, a hub id (Org/Name: found in the Hugging Face cache, downloaded
    # once per node before the ranks start when it is not there and the network allows), a .gguf
    # file, or "builtin:<name>" for a model whose architecture ships with shardtune
    # (trainer/builtin/<name>/: config and a tokenizer built by scripts/build_tiny_tokenizer.py);
    # its weights are a seeded random init.
    name_or_path: str = MISSING  # the model group's preset sets it (model=tiny_llama by default)
    revision: Optional[str] = None  # of a hub id: a branch, tag or commit (default: main)
    gguf_file: Optional[str] = None  # file name inside name_or_path, when loading from GGUF
    family: str = "llama"  # picks chat template and LoRA targets defaults: llama|qwen|mistral|gemma|smollm
    dtype: str = one_of("auto", "float32", "bfloat16", "float16", default="auto")  # auto: bf16 on GPU, fp32 on CPU
    # the attention kernel transformers uses
    attn_implementation: str = one_of("sdpa", "eager", "flex_attention", "flash_attention_2", default="sdpa")
    trust_remote_code: bool = False  # run the model repository's own Python code (architectures transformers lacks)
    chat_template: Optional[str] = None  # "chatml" or a Jinja template; None keeps the tokenizer's
    # recompute activations in backward (every layer, or selectively): memory for compute
    activation_checkpointing: str = one_of("none", "full", "selective", default="none")
    compile: bool = False  # torch.compile the model (fixed shapes compile once: see data.pad_to)
    # 1: the model's own head and one cross-entropy over B x S x V logits; N > 1: the head applied to
    # label tokens only, in N checkpointed chunks (trainer/loss.py): a 1/N of the logits' memory
    loss_chunks: int = 1
    frozen_modules: List[str] = field(default_factory=list)  # full FT: name patterns kept frozen
    # true: ignore any weights and build the model from its config.json with seeded random weights,
    # made on the GPU (or partitioned under ZeRO-3): training from scratch, throughput benchmarks
    random_init: bool = False
    init_seed: Optional[int] = None  # seed of a random init (builtin or random_init; default: run seed)
    cache_dir: Optional[str] = None  # where converted models (GGUF -> HF) are kept


@dataclass
class DataConfig:
    # JSONL/JSON/Parquet/CSV files or globs; the format is detected per file (data.format)
    train_files: List[str] = field(default_factory=list)
    # held-out files; empty: data.eval_fraction of the train documents
    eval_files: List[str] = field(default_factory=list)
    weights: List[float] = field(default_factory=list)  # mixing weights, one per train_files entry
    eval_fraction: float = 0.0  # held-out fraction when no eval_files
    seed: int = 0  # picks the held-out documents and the subsets of mixed sources
    # auto: detected per file; preference and kto are the preference objectives' data
    format: str = one_of("auto", "messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "kto",
                         default="auto")
    # rename source fields: canonical name -> name in your files, e.g. {messages: dialog, content: text}
    fields: Dict[str, str] = field(default_factory=dict)
    # trained tokens: the assistant's answers, all, or the last turn's answer
    loss_on: str = one_of("assistant", "all", "last_turn", default="assistant")
    max_seq_len: int = 512  # tokens per row; longer documents follow data.length_policy
    # a document longer than max_seq_len: truncated, or dropped
    length_policy: str = one_of("truncate", "drop", default="truncate")
    packing: bool = False  # several documents per row, per-document position ids, no cross-attention
    # width of a micro-batch's rows: longest (its own longest row) | max_seq_len (every batch one
    # shape: what torch.compile needs to compile once) | auto (max_seq_len with model.compile, else longest)
    pad_to: str = one_of("auto", "longest", "max_seq_len", default="auto")
    # strict: stop at the first bad record (file:line); skip: count them by reason
    on_error: str = one_of("strict", "skip", default="strict")  # strict: stop at a bad record; skip: count by reason
    num_proc: int = 1  # tokenizer worker processes
    cache_dir: Optional[str] = None  # default: $SHARDTUNE_DATA_CACHE or ~/.cache/shardtune/data
    # index the sources instead of preparing them, and tokenise each row when it is trained on: for data
    # larger than a node's disk (uncompressed JSON lines or save_to_disk folders; SFT only)
    streaming: bool = False
    # shuffle the train rows each epoch (seeded by seed: the same order on every run and world size)
    shuffle: bool = True


@dataclass
class ObjectiveConfig:
    """What the loop minimises (trainer/objectives/): next-token SFT, or a preference objective."""
    name: str = one_of("sft", "dpo", "simpo", "kto", default="sft")  # what the loop minimises (trainer/objectives/)
    beta: float = 0.1  # dpo/kto: scale of the implicit reward; simpo: of the length-normalised log-prob
    # dpo: sigmoid (the paper's), ipo, or robust (noisy labels, with label_smoothing)
    # dpo: sigmoid (the paper's), ipo, or robust (noisy labels, with label_smoothing)
    loss_type: str = one_of("sigmoid", "ipo", "robust", default="sigmoid")
    label_smoothing: float = 0.0  # dpo sigmoid/robust: assumed probability that a pair's labels are flipped
    sft_weight: float = 0.0  # dpo/simpo: weight of an SFT term (mean NLL per token) on the chosen answer (RPO)
    gamma: float = 0.5  # simpo: target reward margin
    desirable_weight: float = 1.0  # kto: weight of desirable (label true) examples
    undesirable_weight: float = 1.0  # kto: weight of undesirable (label false) examples
    # auto: dpo/kto take the base model with adapters disabled (any peft method) or, for full
    # fine-tuning, log-probs precomputed in one pass before training; simpo has none
    reference: str = one_of("auto", "adapters_off", "precomputed", "none", default="auto")


@dataclass
class PeftConfig:
    # the peft method; none: full fine-tuning
    method: str = one_of(*PEFT_METHODS, default="none")  # the table in trainer/peft_methods.py
    r: int = 8  # LoRA/DoRA rank
    alpha: int = 16  # LoRA scaling numerator: updates are scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.0  # dropout on the LoRA branch's input
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    use_rslora: bool = False  # rank-stabilised LoRA scaling, alpha / sqrt(r): better for large r
    # modules trained in full beside the adapter, e.g. [lm_head]
    modules_to_save: List[str] = field(default_factory=list)
    num_virtual_tokens: int = 16  # prefix tuning
    quantize_4bit: bool = False  # QLoRA: not built yet, refused at validation


@dataclass
class DeepSpeedConfig:
    # ZeRO stage: 0 replicates everything, 1 shards optimizer states, 2 also gradients, 3 also parameters
    stage: int = one_of(0, 1, 2, 3, default=3)
    offload_optimizer: bool = False  # optimizer states in CPU memory (ZeRO-2/3): less GPU memory, slower steps
    offload_param: bool = False  # parameters in CPU memory (ZeRO-3 only)
    precision: str = one_of("auto", "fp32", "bf16", "fp16", default="auto")  # auto: bf16 on GPU, fp32 on CPU
    overlap_comm: Optional[bool] = None  # None: derived (on for GPU)
    # copy gradients into one contiguous buffer as they are produced (less fragmentation)
    contiguous_gradients: bool = True
    reduce_bucket_size: Optional[int] = None  # None: DeepSpeed's default
    allgather_bucket_size: Optional[int] = None  # elements per all-gather (ZeRO-1/2); None: DeepSpeed's default
    # ZeRO-3: elements of parameters fetched ahead; None: DeepSpeed's default
    stage3_prefetch_bucket_size: Optional[int] = None
    # ZeRO-3: parameters smaller than this stay whole on every rank
    stage3_param_persistence_threshold: Optional[int] = None
    stage3_max_live_parameters: Optional[int] = None  # ZeRO-3: most parameters gathered at once before release
    zero_hpz_partition_size: int = 1  # ZeRO++ hpZ
    zero_quantized_weights: bool = False  # ZeRO++ qwZ
    zero_quantized_gradients: bool = False  # ZeRO++ qgZ
    extra: Dict[str, Any] = field(default_factory=dict)  # merged last into ds_config.json
    # Your own DeepSpeed JSON (HF Trainer's `--deepspeed ds_z3.json`), relative to the directory you launch
    # from: the base of ds_config.json, its "auto" values filled from this config (rules: trainer/ds_config.py)
    config_file: Optional[str] = None
    # Written by the launcher, not by you: config_file's JSON as read at launch, kept in config.yaml so that
    # the ranks and every requeue use this copy and never read your file again
    config_file_content: Optional[Dict[str, Any]] = None


@dataclass
class OptimConfig:
    name: str = one_of("adamw", "fused_adam", "cpu_adam", default="adamw")  # adamw: torch's; the others: DeepSpeed's
    fused: bool = True  # adamw: torch's single-kernel AdamW (CPU and CUDA); false: the foreach one
    lr: float = 2e-4  # peak learning rate (after warmup): full fine-tuning ~1e-5, LoRA ~1e-4 to 3e-4
    weight_decay: float = 0.0  # decoupled (AdamW) weight decay
    beta1: float = 0.9  # Adam's first-moment decay
    beta2: float = 0.999  # Adam's second-moment decay
    eps: float = 1e-8  # Adam's denominator epsilon
    scheduler: str = one_of("cosine", "linear", "constant", default="cosine")  # the lr schedule after warmup
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to optim.lr
    min_lr_ratio: float = 0.1  # cosine/linear decay ends at optim.lr x this
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0: no clipping


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps of the whole run (a resumed run continues up to it)
    micro_batch_size: int = 2  # rows per rank per forward pass
    grad_accum: int = 1  # micro-batches per optimizer step; global batch = micro x accum x world size
    global_batch_size: Optional[int] = None  # if set: must equal micro x accum x world size
    log_every: int = 1  # optimizer steps between metrics lines
    max_nonfinite_steps: int = 3  # abort after this many non-finite steps in a row
    deterministic: bool = True  # deterministic kernels: the same seed and data give the same losses
    timing: bool = False  # per-phase step timing + peak memory per rank in <run.dir>/timing/ (shardtune bench)
    profile_steps: int = 0  # > 0: torch.profiler over the last N steps, tables in <run.dir>/profile/
    fault_injection: Dict[str, Any] = field(default_factory=dict)  # tests only: see trainer/faults.py


@dataclass
class EvalConfig:
    every_steps: int = 0  # 0: only at the start (baseline) and the end
    baseline: bool = True  # evaluate once before the first step (the report's 'before')
    max_batches: int = 0  # 0: the whole eval split
    general_files: List[str] = field(default_factory=list)  # text the model should not forget
    # prompts answered greedily before and after training (shown in the report)
    prompts: List[str] = field(default_factory=list)
    prompts_file: Optional[str] = None  # more prompts, one per line (added after `prompts`)
    # auto: chat when the train data is chat; text: plain continuation
    prompt_style: str = one_of("auto", "chat", "text", default="auto")  # auto: chat when the train data is chat
    max_new_tokens: int = 32  # tokens generated per eval prompt
    retention_threshold: float = 0.05  # flag when general eval loss worsens by more than this


@dataclass
class CheckpointConfig:
    every_steps: int = 50  # optimizer steps between checkpoints; 0: only at the end (and on a stop signal)
    keep_last: int = 2  # checkpoints kept (older ones are removed after a newer one is committed)
    save_final: bool = True  # checkpoint at the last step
    export_final: bool = True  # write an HF model / adapter to <run.dir>/export at the end
    # With an adapter (peft.method other than none), whether each checkpoint also holds the frozen base
    # weights. false: adapter-sized checkpoints; a resume reloads the base from model.name_or_path and
    # refuses one whose weight files changed. true: self-contained checkpoints (the base may vanish).
    save_frozen_base: bool = False
    # true: a save stalls training only while each rank copies its state to host memory; a thread writes
    # the files and the checkpoint commits (manifest last) at a later step, once every rank's are on
    # disk. A crash before that leaves the previous checkpoint the latest. Needs host memory for one
    # copy of each rank's share. The save at a stop request and the last one are written at once.
    async_save: bool = False


@dataclass
class SlurmConfig:
    partition: Optional[str] = None  # sbatch --partition
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    constraint: Optional[str] = None  # sbatch --constraint (node features)
    time: str = "01:00:00"  # sbatch --time: the job's limit; it checkpoints and requeues itself before it
    gpus_per_node: int = 0  # sbatch --gpus-per-node; 0: none requested (CPU jobs)
    # The node's one launcher task runs all its ranks: its CPUs and memory are theirs. None: the whole
    # node with exclusive (all CPUs, --mem=0), else cpus_per_rank x nproc_per_node and the cluster's memory.
    cpus_per_task: Optional[int] = None
    cpus_per_rank: int = 2  # when cpus_per_task is None on a shared node; small enough for any node
    # sbatch --mem per node, e.g. 200G; None: all of an exclusive node, else the cluster's default
    mem: Optional[str] = None
    exclusive: bool = False  # sbatch --exclusive: whole nodes
    signal_seconds: int = 120  # --signal=B:USR1@N before the time limit
    max_requeues: int = 3  # requeues after a time limit or preemption before the job gives up
    # a sweep (-m): its trials are one job array, at most this many running at once (--array=...%K); 0: no limit
    sweep_parallelism: int = 4
    extra_sbatch: List[str] = field(default_factory=list)  # more #SBATCH lines, e.g. ['--reservation=x']
    setup: List[str] = field(default_factory=list)  # shell lines run before launching (modules, venv)
    template: str = "slurm/job.sbatch.j2"  # the job script's Jinja template
    submit: bool = True  # False: write the script and print it (dry run)
    job_name: Optional[str] = None  # default: run.name
    python: Optional[str] = None  # interpreter on the compute nodes; default: the one running shardtune
    preflight: bool = True  # run preflight for the job's GPUs before submitting
    # memory of one of the job's GPUs, e.g. 80GB: lets preflight judge a GPU job from a login node without GPUs
    gpu_memory: Optional[str] = None


@dataclass
class ClusterConfig:
    # where the ranks run: this machine, a Slurm job, or cluster.hostfile's hosts
    backend: str = one_of("local", "slurm", "hostfile", default="local")
    nnodes: int = 1  # nodes of the job
    nproc_per_node: int = 2  # ranks per node (one per GPU; on CPU, processes)
    node_rank: int = 0  # this node's rank (cluster=hostfile with no_ssh: set on each node)
    master_addr: str = "127.0.0.1"  # address of node 0 for the rendezvous
    master_port: Optional[int] = None  # None: a free port (local) or derived from the job id (slurm)
    hostfile: Optional[str] = None  # cluster=hostfile: "host slots=N" lines, as for the deepspeed launcher
    no_ssh: bool = False  # cluster=hostfile: run the same command on every node with its cluster.node_rank
    # cluster=hostfile over ssh: the deepspeed launcher's --launcher
    # cluster=hostfile over ssh: the deepspeed launcher's --launcher
    ssh_launcher: str = one_of("pdsh", "openmpi", "mvapich", "mpich", "impi", default="pdsh")
    ssh_port: Optional[int] = None  # cluster=hostfile over ssh: sshd's port on the hosts; None: ssh's default
    device: str = one_of("auto", "cpu", "cuda", default="auto")  # auto: CUDA when this machine has it
    threads_per_rank: Optional[int] = None  # OMP_NUM_THREADS; None: cores / ranks on the node
    # auto (CPU: tcmalloc, else jemalloc, when installed; else glibc) | tcmalloc | jemalloc | glibc:
    # preloaded into every rank (trainer/allocator.py); measured trade-offs in docs/performance.md
    allocator: str = one_of("auto", "jemalloc", "tcmalloc", "glibc", default="auto")
    timeout_s: int = 300  # collective timeout: a dead or stuck rank fails the job after this
    heartbeat_timeout_s: int = 120  # a rank silent this long is named as hung and the job ends
    # model loading, engine set-up, resume (phases that cannot report progress): a rank in one is kept
    # alive this long, then judged by heartbeat_timeout_s; data preparation and reference passes report
    # their own progress, so they are never cut short
    setup_timeout_s: int = 1800
    env: Dict[str, str] = field(default_factory=dict)  # NCCL_/GLOO_ settings passed to every rank
    # GPUs to use, in DeepSpeed's --include/--exclude syntax ("localhost:2,3", "node1:0,1@node2"): GPU runs
    # of cluster=local and cluster=hostfile over ssh; CUDA_VISIBLE_DEVICES and hostfile slots= need none
    include: Optional[str] = None
    exclude: Optional[str] = None  # the GPUs not to use, same syntax; not with include
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    @property
    def world_size(self) -> int:
        """Ranks of the whole job: decided here once, for the launcher, validation and bench."""
        return self.nnodes * self.nproc_per_node


@dataclass
class LoggerConfig:
    """Where metrics go besides metrics.jsonl: `backends` (`logger=wandb|tensorboard|mlflow` sets one,
    `logger.backends=[wandb,tensorboard,mlflow]` several). A tracker's own environment (WANDB_MODE,
    WANDB_PROJECT, ..., MLFLOW_TRACKING_URI) applies to every value left unset (None); a value set
    here wins over it (trainer/metrics.py)."""
    backends: List[str] = field(default_factory=list)  # each one of: wandb | tensorboard | mlflow
    # one tracker, as before `backends`; added to them when not none
    backend: str = one_of("wandb", "none", default="none")
    # W&B; None: WANDB_MODE, else online if logged in, else offline
    mode: Optional[str] = one_of("online", "offline", "disabled", None, default=None)
    # W&B project, MLflow experiment; None: WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME, else "shardtune"
    project: Optional[str] = None
    # MLflow: None: MLFLOW_TRACKING_URI, else a file store in <run.dir>/mlruns
    mlflow_tracking_uri: Optional[str] = None
    mlflow_log_model: bool = True  # MLflow: the run's export/ folder as an artifact at the end
    entity: Optional[str] = None  # None: WANDB_ENTITY, else the account's default entity
    group: Optional[str] = None  # None: WANDB_RUN_GROUP (a sweep sets its own)
    tags: List[str] = field(default_factory=list)  # empty: WANDB_TAGS (comma-separated)

    @property
    def trackers(self) -> List[str]:
        """The trackers on, each once, in order: `backends`, then `backend` unless it is none."""
        named = [*self.backends, *([self.backend] if self.backend != "none" else [])]
        return list(dict.fromkeys(named))


@dataclass
class RunConfig:
    dir: str = MISSING  # the run directory: config, checkpoints, metrics, exports; the same dir again resumes
    name: str = MISSING  # the run's name (W&B and reports); default: the timestamp of run.dir
    # print: write the run dir and print the worker commands; dry_run: print the command, start nothing
    launch: str = one_of("spawn", "print", "dry_run", default="spawn")
    # what an Optuna sweep minimises: a key of metrics.jsonl, its last value (eval_loss, loss, general_loss)
    sweep_metric: str = "eval_loss"


@dataclass
class RootConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 1234  # seeds model init, data order and dropout
    resume: str = "auto"  # auto | never | <path to a checkpoint folder>
    experiment: Optional[str] = None  # name of the experiment preset, informational




class ConfigError(ValueError):
    """A config that cannot run. `problems` lists every issue found, each naming its key."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in problems))


def to_config(node: Any) -> RootConfig:
    """Bind a DictConfig (or plain dict) to the schema, rejecting unknown keys and wrong types."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RootConfig), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None)
        message = str(err).split("\n")[0]
        if "issing mandatory value" in message:
            message = "no value given; set it on the command line, e.g. " + f"{key}=..."
        raise ConfigError([f"{key}: {message}" if key else message]) from None


def load_run_config(run_dir: str | Path) -> RootConfig:
    """Read `<run_dir>/config.yaml`, as the launcher resolved it, into typed objects."""
    path = RunDir(run_dir).config
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no resolved config; is {run_dir} a shardtune run directory?")
    return to_config(OmegaConf.load(path))


def save_run_config(cfg: RootConfig, run_dir: str | Path) -> Path:
    path = RunDir(run_dir).config
    # Atomic: in no-ssh multi-node runs every node writes it while others' workers may read it.
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    OmegaConf.save(OmegaConf.structured(cfg), tmp)
    os.replace(tmp, path)
    return path
