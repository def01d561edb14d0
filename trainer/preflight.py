"""Predict per-rank memory and FLOPs per step before a job is launched or queued.

The model is never loaded: its config.json is instantiated on PyTorch's meta device (shapes, no
storage), which gives exact parameter counts for any architecture transformers knows.

Memory per rank, in bytes (P parameters, T trainable, W ranks, b bytes per 16/32-bit value):
    parameters     P*b, divided by W under ZeRO-3 (+ the persistent small ones, replicated,
                   + the gathered working set: about prefetch bucket + one layer, at most P)
    gradients      model-dtype gradients (all T on stage 0/1; the whole reduce bucket on stage 2/3,
                   allocated up front: reduce_bucket_size values, 5e8 by default)
                   + fp32 gradient partition 4T/W (ZeRO 1-3) + each whole gradient before bucketing
                   (T*b, ZeRO 2/3); ZeRO-3 adds two flat all-gather buffers of its working set
    optimizer      fp32 master copy 4T (/W on ZeRO 1-3; DeepSpeed keeps one even in fp32 training,
                   and none on stage 0 in fp32) + Adam moments 8T (/W on ZeRO 1-3)
    activations    per token per layer: (5H + 3Q + 2KV + 4I) values kept for backward (sdpa;
                   counted with torch's saved-tensor hooks on Llama: within 2 %), plus the layer's
                   S x S scores with eager attention; full checkpointing keeps only H per layer and
                   recomputes one layer at a time; selective keeps the matmul outputs. LoRA with
                   dropout keeps each adapted layer's dropped input (and its 1-byte mask) as well:
                   in every layer without checkpointing, in the recomputed layer only with it
                   (the dropout is redone with the same RNG state). Selective also keeps LoRA's own
                   matmul outputs, r + out values per adapted layer, dropout or not.
    logits         3 B*S*V fp32 values around the loss (logits, log-softmax, and one gradient of that
                   size at a time in backward; the labels are shifted, not the logits); with
                   model.loss_chunks=N, those of B*S/N tokens + the label tokens' hidden states
    runtime        CPU: the resident size of a rank before training (Python, torch, DeepSpeed, gloo,
                   tokenizer, data), measured; GPU: PyTorch's allocator only (the CUDA context is not
                   in torch's counters)
Offloaded parts move from the device to host memory; on a CPU run both are the same RAM.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional, Tuple

from trainer.flops import ModelShape, flops_per_token

GB = 1024 ** 3
# Resident size of one CPU rank just before its first step, measured here (torch 2.13, deepspeed
# 0.19.8, transformers 5.23, gloo, 2 ranks): the tiny model adds under 1 % of it.
CPU_RUNTIME_BYTES = int(0.47 * GB)
# DeepSpeed defaults used when the deepspeed group leaves a knob unset.
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_PERSISTENCE_THRESHOLD = 100_000


@dataclass(frozen=True)
class Setup:
    """How the model is trained: everything besides its shape that moves memory."""
    world: int
    stage: int
    precision: str  # fp32 | bf16 | fp16
    micro_batch: int
    seq_len: int
    trainable: Optional[int] = None  # None: every parameter
    offload_optimizer: bool = False
    offload_param: bool = False
    checkpointing: str = "none"  # none | full | selective
    attn: str = "sdpa"
    on_gpu: bool = False
    persistent_params: int = 0  # ZeRO-3: parameters below the persistence threshold, kept whole
    reduce_bucket: int = DS_REDUCE_BUCKET
    prefetch_bucket: int = DS_PREFETCH_BUCKET
    # LoRA with dropout > 0: values per token (all layers) of the dropped inputs its adapters keep
    lora_dropout_values: int = 0
    # LoRA: values per token (all layers) its adapters' matmuls output (r + out each); selective keeps them
    lora_output_values: int = 0
    peft: str = "none"  # peft.method: the verdict never suggests the method already in use
    loss_chunks: int = 1  # model.loss_chunks: the head and loss over 1/N of the tokens at a time
    compiled: bool = False  # model.compile: ZeRO-3 remedies must turn it off (validation refuses both)


@dataclass
class Estimate:
    device: Dict[str, int] = field(default_factory=dict)  # component -> bytes on the training device
    host: Dict[str, int] = field(default_factory=dict)  # component -> bytes in host RAM (offload, runtime)
    flops_per_step: float = 0.0  # per rank
    flops_per_token: float = 0.0

    @property
    def device_total(self) -> int:
        return sum(self.device.values())

    @property
    def host_total(self) -> int:
        return sum(self.host.values())

    def rank_total(self, on_gpu: bool) -> int:
        """What limits a rank: device memory on GPU, device + host (one RAM) on CPU."""
        return self.device_total if on_gpu else self.device_total + self.host_total


def value_bytes(precision: str) -> int:
    return 2 if precision in ("bf16", "fp16") else 4


def model_state_bytes(shape: ModelShape, s: Setup) -> Dict[str, Tuple[int, bool]]:
    """Parameters, gradients and optimizer states: component -> (bytes, offloaded to host?)."""
    b, P, W = value_bytes(s.precision), shape.params, s.world
    T = P if s.trainable is None else s.trainable
    shard = W if s.stage >= 1 else 1
    parts: Dict[str, Tuple[int, bool]] = {}
    if s.stage == 3:
        parts["parameters (partition)"] = (P * b // W, s.offload_param)
        gathered = min(P - s.persistent_params, s.prefetch_bucket + shape.largest_layer_params)
        parts["parameters (gathered, persistent)"] = ((gathered + s.persistent_params) * b, False)
    else:
        parts["parameters"] = (P * b, False)
    # ZeRO 2/3 allocate the whole reduce bucket up front (torch.empty of reduce_bucket_size values), and
    # it is all touched: DeepSpeed's default 5e8 costs 2 GB per rank in fp32 whatever the model's size.
    model_grads = T if s.stage <= 1 else s.reduce_bucket
    parts["gradients (model dtype)"] = (model_grads * b, False)
    if s.stage >= 2:  # each gradient exists whole before it is copied into the bucket and freed
        parts["gradients (before bucketing)"] = (T * b, False)
    if s.stage == 3:  # the flat all-gather buffers of the working set, input and output side
        parts["all-gather buffers"] = (2 * min(P, s.prefetch_bucket + shape.largest_layer_params) * b, False)
    master = 4 * T // shard if (s.stage >= 1 or b == 2) else 0
    if s.stage >= 1:
        parts["gradients (fp32 partition)"] = (4 * T // W, s.offload_optimizer)
    elif b == 2:
        parts["gradients (fp32)"] = (4 * T, False)
    parts["optimizer (fp32 master)"] = (master, s.offload_optimizer)
    parts["optimizer (Adam moments)"] = (8 * T // shard, s.offload_optimizer)
    return parts


def activation_values_per_token_layer(shape: ModelShape, checkpointing: str) -> int:
    """Values one token keeps per decoder layer for backward (sdpa attention)."""
    H, I = shape.hidden, shape.intermediate
    Q, KV = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    if checkpointing == "full":
        return H  # the layer's input only
    if checkpointing == "selective":
        return H + Q + 2 * KV + H + Q + 2 * I + H  # input + q,k,v + o_proj out + attention out + gate,up + down out
    # layer input, two norms' normalised and scaled outputs, the attention residual (5H); rotated q,
    # attention out and o_proj's contiguous input (3Q); rotated k and v (2KV); gate, up, act, product (4I)
    return 5 * H + 3 * Q + 2 * KV + 4 * I


def activation_bytes(shape: ModelShape, s: Setup) -> Dict[str, int]:
    b, tokens = value_bytes(s.precision), s.micro_batch * s.seq_len
    per_layer = activation_values_per_token_layer(shape, s.checkpointing) * tokens * b
    parts = {"activations (kept for backward)": per_layer * shape.layers}
    if s.checkpointing != "none":  # backward recomputes one layer at a time, with all its activations
        parts["activations (one recomputed layer)"] = activation_values_per_token_layer(shape, "none") * tokens * b
    if s.attn == "eager":  # attention probabilities, S x S per head, kept (softmax out) and its grad
        layers = 1 if s.checkpointing != "none" else shape.layers
        parts["attention scores (eager)"] = 2 * shape.heads * s.seq_len ** 2 * s.micro_batch * b * layers
    if s.lora_dropout_values:  # dropped inputs in the model dtype + their bool masks
        dropped = s.lora_dropout_values * tokens * (b + 1)
        if s.checkpointing == "none":
            parts["LoRA dropout inputs"] = dropped
        else:  # inside the checkpointed layers: alive only while their layer is recomputed
            parts["LoRA dropout inputs (one recomputed layer)"] = dropped // shape.layers
    if s.checkpointing == "selective" and s.lora_output_values:  # mm outputs: selective's policy keeps them
        parts["LoRA matmul outputs (selective keeps)"] = s.lora_output_values * tokens * b
    if s.loss_chunks > 1:  # one chunk's logits at a time, plus the label tokens' gathered hidden states
        parts["logits and loss (one chunk)"] = 3 * -(-tokens // s.loss_chunks) * shape.vocab * 4
        parts["head inputs (label tokens)"] = tokens * shape.hidden * b
    else:
        parts["logits and loss"] = 3 * tokens * shape.vocab * 4
    return parts


def estimate(shape: ModelShape, s: Setup, runtime_bytes: Optional[int] = None) -> Estimate:
    """Per-rank memory and per-rank FLOPs of one micro-batch step of `s` on a model of `shape`."""
    est = Estimate()
    for name, (size, offloaded) in model_state_bytes(shape, s).items():
        (est.host if offloaded else est.device)[name] = size
    est.device.update(activation_bytes(shape, s))
    if not s.on_gpu:
        est.host["runtime (python, torch, deepspeed)"] = CPU_RUNTIME_BYTES if runtime_bytes is None else runtime_bytes
    trainable = None if s.trainable is None or s.trainable == shape.params else s.trainable
    est.flops_per_token = flops_per_token(shape, s.seq_len, trainable)
    est.flops_per_step = est.flops_per_token * s.micro_batch * s.seq_len
    return est


# ---- from a shardtune config ---------------------------------------------------------------------

def shape_from_config_dict(config: dict, lora: Optional[dict] = None,
                           persistence_threshold: int = DS_PERSISTENCE_THRESHOLD,
                           adapter: Any = None) -> Tuple[ModelShape, int, int]:
    """(shape, trainable parameters, persistent parameters) of a Hugging Face config, without weights.

    Args:
        config: the model's config.json as a dict.
        lora: {"r": int, "targets": "all-linear" | [names]} for LoRA, else None.
        persistence_threshold: ZeRO-3 keeps parameters with fewer elements than this whole.
        adapter: a peft config object (any method, as the run builds it): the trainable and persistent
            parameters are then counted on the wrapped model, on the meta device (no memory), exactly
            as peft makes them: DoRA's magnitudes, IA3's vectors, prefix tuning's prefixes included.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    params = {id(p): p for p in model.parameters()}  # a tied head is one tensor, counted once
    total = sum(p.numel() for p in params.values())
    embedding = model.get_input_embeddings().weight.numel()
    layers = model.model.layers if hasattr(model, "model") and hasattr(model.model, "layers") else []
    largest = max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0)
    persistent = sum(p.numel() for p in params.values() if p.numel() < persistence_threshold)
    c = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    heads = c.num_attention_heads
    shape = ModelShape(params=total, embedding_params=embedding,
                       tied_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
                       layers=c.num_hidden_layers, heads=heads, kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                       head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads, hidden=c.hidden_size,
                       intermediate=_intermediate_size(c), vocab=c.vocab_size, largest_layer_params=largest)
    trainable = total
    if adapter is not None:
        import peft

        with torch.device("meta"):
            wrapped = peft.get_peft_model(model, adapter)
        params = {id(p): p for p in wrapped.parameters()}
        trainable = sum(p.numel() for p in params.values() if p.requires_grad)
        persistent = sum(p.numel() for p in params.values() if p.numel() < persistence_threshold)
    elif lora is not None:
        trainable = lora_parameters(model, lora["r"], lora["targets"])
        persistent = sum(p.numel() for p in params.values() if p.numel() < persistence_threshold)
        persistent += trainable if lora["r"] * 2 * shape.hidden < persistence_threshold else 0
    return shape, trainable, persistent


def _intermediate_size(c) -> int:
    """The MLP width under its various names (GPT-2: n_inner, None meaning 4 x hidden)."""
    for key in ("intermediate_size", "n_inner", "ffn_dim"):
        value = getattr(c, key, None)
        if value:
            return int(value)
    return 4 * c.hidden_size


def _lora_linears(model, targets):
    """(in, out) widths of the layers LoRA adapts: Linear, and GPT-2's Conv1D (weight stored in x out)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, Conv1D)) or name.endswith("lm_head"):
            continue
        if targets == "all-linear" or name.split(".")[-1] in set(targets):
            if isinstance(module, Conv1D):
                yield module.weight.shape[0], module.weight.shape[1]
            else:
                yield module.in_features, module.out_features


def _meta_model(config: dict):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))


def lora_dropout_values(config: dict, targets) -> int:
    """Values per token that LoRA's dropout keeps for backward: every adapted layer's input width."""
    return sum(fan_in for fan_in, _ in _lora_linears(_meta_model(config), targets))


def lora_output_values(config: dict, r: int, targets) -> int:
    """Values per token that LoRA's matmuls output (A: r, B: the layer's output width), all layers."""
    return sum(r + fan_out for _, fan_out in _lora_linears(_meta_model(config), targets))


def lora_parameters(model, r: int, targets) -> int:
    """r * (in + out) for every targeted layer ("all-linear": all but the output head)."""
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in _lora_linears(model, targets))


def read_model_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "config.json")) as handle:
        return json.load(handle)


def setup_from_config(cfg, on_gpu: bool, trainable: int, persistent: int, shape: ModelShape) -> Setup:
    from trainer.ds_config import build_ds_config, resolve_precision

    ds = cfg.deepspeed
    zero = build_ds_config(cfg, cfg.cluster.nnodes * cfg.cluster.nproc_per_node, on_gpu)["zero_optimization"]
    # A preference row is two sequences in one forward pass (trainer/objectives). Its reference adds
    # nothing resident: with peft the same weights with adapters off, run under no_grad before the
    # policy's forward (its logits are freed before the policy's activations exist); with full
    # fine-tuning log-probs precomputed before training (two floats per row).
    sequences_per_row = 1 if cfg.objective.name == "sft" else 2
    return Setup(world=cfg.cluster.nnodes * cfg.cluster.nproc_per_node, stage=ds.stage,
                 precision=resolve_precision(cfg, on_gpu), micro_batch=cfg.train.micro_batch_size * sequences_per_row,
                 seq_len=cfg.data.max_seq_len, trainable=None if trainable == shape.params else trainable,
                 offload_optimizer=ds.offload_optimizer, offload_param=ds.offload_param,
                 checkpointing=cfg.model.activation_checkpointing, attn=cfg.model.attn_implementation,
                 loss_chunks=cfg.model.loss_chunks, compiled=cfg.model.compile, peft=cfg.peft.method,
                 on_gpu=on_gpu, persistent_params=persistent if ds.stage == 3 else 0,
                 reduce_bucket=zero.get("reduce_bucket_size", DS_REDUCE_BUCKET),
                 prefetch_bucket=zero.get("stage3_prefetch_bucket_size", DS_PREFETCH_BUCKET))


# ---- verdict --------------------------------------------------------------------------------------

def available_bytes_per_rank(on_gpu: bool, ranks_per_node: int, gpu_memory: Optional[int] = None) -> Tuple[int, str]:
    """Memory one rank may use, and its description: the GPU's memory (`gpu_memory` when given: a
    machine without the job's GPU), or RAM shared by the node's ranks."""
    if on_gpu and gpu_memory:
        return gpu_memory, f"GPU ({gpu_memory / GB:.1f} GB, --gpu-memory)"
    if on_gpu:
        import torch

        props = torch.cuda.get_device_properties(0)
        return props.total_memory, f"{props.name} ({props.total_memory / GB:.0f} GB)"
    available = _mem_available()
    return available // ranks_per_node, f"{available / GB:.1f} GB free RAM shared by {ranks_per_node} ranks"


def _mem_available() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


REMEDIES = [  # (what to tell the user, how it changes the setup); tried in order
    # On one rank ZeRO-3 has nothing to partition.
    ("deepspeed=zero3{no_compile}", lambda s: replace(s, stage=3) if s.stage < 3 and s.world > 1 else None),
    ("model.loss_chunks=8", lambda s: replace(s, loss_chunks=8) if s.loss_chunks < 8 else None),
    # LoRA's dropout keeps a dropped copy of every adapted layer's input: 14 GiB of a 53 GiB 8B run
    # on one H100 (4096 tokens); without it the step is also faster (fewer element-wise kernels).
    ("peft.dropout=0", lambda s: replace(s, lora_dropout_values=0) if s.lora_dropout_values else None),
    ("model.activation_checkpointing=full", lambda s: replace(s, checkpointing="full") if s.checkpointing != "full" else None),
    ("train.micro_batch_size={mbs}", lambda s: replace(s, micro_batch=s.micro_batch // 2) if s.micro_batch > 1 else None),
    ("deepspeed=zero3_offload{no_compile}", lambda s: replace(s, stage=3, offload_optimizer=True, offload_param=True)
        if s.on_gpu and not s.offload_param else None),
]


def verdict(shape: ModelShape, s: Setup, est: Estimate, capacity: int, where: str, world: int) -> str:
    need = est.rank_total(s.on_gpu)
    if need <= capacity:
        return f"fits on {world} x {where} with {(capacity - need) / GB:.1f} GB to spare per rank"
    tried, current = [], s
    for text, change in REMEDIES:
        changed = change(current)
        if changed is None:
            continue
        current = changed
        tried.append(text.format(mbs=current.micro_batch, no_compile=" model.compile=false" if s.compiled else ""))
        if estimate(shape, current).rank_total(s.on_gpu) <= capacity:
            return (f"will not fit: needs {need / GB:.1f} GB per rank, {capacity / GB:.1f} GB available; "
                    f"try {' '.join(tried)}")
    peft = "peft=lora, " if s.peft == "none" else ""  # never the method the run already uses
    return (f"will not fit: needs {need / GB:.1f} GB per rank, {capacity / GB:.1f} GB available, even with "
            f"{' '.join(tried) or 'every remedy'}; use more ranks, {peft}or a smaller model")


def format_table(est: Estimate, on_gpu: bool) -> str:
    rows: List[Tuple[str, str, int]] = [(name, "device" if on_gpu else "RAM", size) for name, size in est.device.items()]
    rows += [(name, "host" if on_gpu else "RAM", size) for name, size in est.host.items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"  {'component':<{width}}  where    GB"]
    lines += [f"  {name:<{width}}  {where:<6} {size / GB:6.3f}" for name, where, size in rows if size]
    total = "total per GPU" if on_gpu else "total per rank"
    lines.append(f"  {total:<{width}}  {'':<6} {est.rank_total(on_gpu) / GB:6.3f}")
    if on_gpu:
        lines.append(f"  {'host RAM per rank':<{width}}  {'':<6} {est.host_total / GB:6.3f}")
    return "\n".join(lines)
