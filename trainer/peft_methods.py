"""Parameter-efficient methods through peft: one table, `METHODS`, says everything about each.

    peft=lora           LoRA (r, alpha, dropout, target_modules, rsLoRA, modules_to_save)
    peft=dora           LoRA with weight decomposition (DoRA)
    peft=ia3            (IA)^3: learned scaling vectors on keys, values and the MLP
    peft=prefix_tuning  trained key/value prefixes in every layer
    peft=none           full fine-tuning (model.frozen_modules keeps some parts frozen)

`peft.target_modules` is "all-linear" (every linear layer but the output head), "family" (the
model family's attention + MLP projections, see trainer/families.py) or an explicit list.

Adding a method is one `PeftMethod` entry here (its build, the settings that shape its checkpoint,
its targets for the pre-launch check, whether it merges, packs, keeps the base's forward, what vLLM
says of it) plus `configs/peft/<name>.yaml` for `peft=<name>`; the valid values of peft.method, the
checkpoint layout check, export, packing, preflight and validation read the table. Torch-free at
import (peft is imported when a method is built), so the config schema can list the names.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from trainer.config import PeftConfig

# (IA)^3 scales keys, values and the input of the MLP's down projection (the paper's choice, and
# peft's own default for Llama); the same module names serve every Llama-style family we ship.
IA3_TARGETS: Tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
IA3_FEEDFORWARD: Tuple[str, ...] = ("down_proj",)


@dataclass(frozen=True)
class PeftMethod:
    name: str
    build: Callable[[PeftConfig, str], Any]  # (peft node, model family) -> the peft config object
    layout_keys: Tuple[str, ...]  # the peft.* settings that decide which tensors a checkpoint holds
    weight_markers: Tuple[str, ...]  # substrings naming the method's own parameters (not the base's)
    # (peft node, family) -> the module names it targets, checked against the model before launch; None: no check
    named_targets: Optional[Callable[[PeftConfig, str], List[str]]] = None
    rank_adapter: bool = False  # LoRA-style rank-r matrices: peft.r applies; preflight's LoRA memory terms
    no_merge: Optional[str] = None  # why it cannot be merged into the base (None: it can)
    no_packing: Optional[str] = None  # why packed documents would leak into each other (None: safe)
    changes_base_forward: bool = False  # the base model alone differs from the untrained adapter's model
    vllm_refuses: Optional[str] = None  # why vLLM's LoRA loader refuses it (None: vLLM serves it)
    on_zero3: Optional[Callable[[Any], int]] = None  # a fix-up of the wrapped model under ZeRO-3


def _lora(cfg: PeftConfig, family: str, dora: bool):
    import peft

    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                           target_modules=_targets(cfg, family), use_rslora=cfg.use_rslora, use_dora=dora,
                           **_common(cfg))


def _ia3(cfg: PeftConfig, family: str):
    import peft

    targets, feedforward = _ia3_targets(cfg)
    return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, **_common(cfg))


def _prefix(cfg: PeftConfig, family: str):
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **_common(cfg))


def _common(cfg: PeftConfig) -> dict:
    return dict(task_type="CAUSAL_LM", modules_to_save=list(cfg.modules_to_save) or None)


def _lora_named_targets(cfg: PeftConfig, family: str) -> List[str]:
    """Names only when they are names (not all-linear or a regex)."""
    if cfg.target_modules == "family" or not isinstance(cfg.target_modules, str):
        return list(_targets(cfg, family))
    return []


LORA_LAYOUT = ("r", "target_modules", "modules_to_save")
METHODS: Dict[str, PeftMethod] = {m.name: m for m in (
    PeftMethod("lora", lambda cfg, family: _lora(cfg, family, dora=False), LORA_LAYOUT, ("lora_",),
               named_targets=_lora_named_targets, rank_adapter=True),
    PeftMethod("dora", lambda cfg, family: _lora(cfg, family, dora=True), LORA_LAYOUT, ("lora_",),
               named_targets=_lora_named_targets, rank_adapter=True,
               vllm_refuses="vLLM serves plain LoRA only; DoRA's magnitude vectors are not loaded",
               on_zero3=lambda model: _register_dora_base_weights(model)),
    PeftMethod("ia3", _ia3, ("target_modules", "modules_to_save"), ("ia3_",),
               named_targets=lambda cfg, family: _ia3_targets(cfg)[0],
               vllm_refuses="vLLM serves LoRA adapters only, not (IA)^3 scaling vectors"),
    PeftMethod("prefix_tuning", _prefix, ("num_virtual_tokens",), ("prompt_encoder",),
               no_merge="prefix tuning adds key/value prefixes, not weight deltas, so it cannot be merged",
               no_packing="the virtual tokens are a KV cache, which disables the per-document attention and "
                          "leaks across documents",
               changes_base_forward=True,
               vllm_refuses="vLLM serves LoRA adapters only, not prefix-tuning key/value prefixes"),
)}
NAMES: Tuple[str, ...] = ("none", *METHODS)  # the valid values of peft.method (none: full fine-tuning)


def method(name: str) -> Optional[PeftMethod]:
    """The table's entry for peft.method=`name`; None for full fine-tuning."""
    if name == "none":
        return None
    if name not in METHODS:
        raise ValueError(f"peft.method={name!r} is not a peft method; choose one of {', '.join(NAMES)}")
    return METHODS[name]


def adapter_weight_markers() -> Tuple[str, ...]:
    return tuple(marker for m in METHODS.values() for marker in m.weight_markers)


def vllm_problem(cfg: PeftConfig) -> Optional[str]:
    """Why vLLM (`--enable-lora`) cannot serve this adapter as exported, or None."""
    entry = method(cfg.method)
    if entry is None:
        return None
    reason = entry.vllm_refuses
    if reason is None and cfg.modules_to_save:
        reason = (f"peft.modules_to_save={list(cfg.modules_to_save)} adds whole trained modules, which vLLM's "
                  "LoRA loader refuses")
    return reason


def _targets(cfg: PeftConfig, family: str):
    if cfg.target_modules == "family":
        from trainer.families import lora_targets

        return lora_targets(family)
    return cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)


def _ia3_targets(cfg: PeftConfig) -> Tuple[List[str], List[str]]:
    """IA3 needs explicit module names (no "all-linear"): the defaults unless a list was given."""
    if isinstance(cfg.target_modules, str):
        return list(IA3_TARGETS), list(IA3_FEEDFORWARD)
    targets = list(cfg.target_modules)
    return targets, [t for t in IA3_FEEDFORWARD if t in targets]


def peft_config(cfg: PeftConfig, family: str):
    """The peft config object for `cfg` (method none has none)."""
    return method(cfg.method).build(cfg, family)


def _register_dora_base_weights(model) -> int:
    """Under ZeRO-3, let each DoRA layer hold its base weight for its whole forward.

    DoRA reads `base_layer.weight` (for the column norm) after the base layer's own forward has
    returned, when ZeRO-3 has already released it: the read would see an empty partition.
    Registering the weight as an external parameter of the LoRA wrapper keeps it gathered.
    """
    import deepspeed

    count = 0
    for module in model.modules():
        if getattr(module, "lora_magnitude_vector", None) and hasattr(module, "base_layer"):
            deepspeed.zero.register_external_parameter(module, module.get_base_layer().weight)
            count += 1
    return count


def _named_targets(cfg: PeftConfig, family: str) -> List[str]:
    """The module names the method will look for, when they are names (not all-linear or a regex)."""
    entry = METHODS.get(cfg.method)  # validation names an unknown method on its own
    return entry.named_targets(cfg, family) if entry is not None and entry.named_targets else []


def target_problem(cfg: PeftConfig, family: str, model_folder, trust_remote_code: bool = False) -> Optional[str]:
    """Before any spawn: a peft method whose target module names match nothing in this architecture
    (peft would fail on every rank after the model loaded). The model is built on the meta device:
    its structure without its weights, in about a second even for 8B."""
    wanted = _named_targets(cfg, family)
    if not wanted:
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - e.g. remote code that computes on tensors while building:
        return None    # this check must never block a run; the worker reports any real problem
    if has_fused_experts(model):
        return None  # peft renames expert projections of fused-MoE models itself: leave it to peft
    names = [name for name, _ in model.named_modules()]
    unmatched = [key for key in wanted if not any(name == key or name.endswith("." + key) for name in names)]
    # A list the user wrote must match in full (a typo would silently adapt less); a default list
    # (a family's, IA3's) is fine as long as part of it matches.
    explicit = not isinstance(cfg.target_modules, str)
    if not unmatched or (not explicit and len(unmatched) < len(wanted)):
        return None
    wanted = unmatched if explicit else wanted
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                     if type(module).__name__ in ("Linear", "Conv1D") and name})
    if cfg.method == "ia3" and isinstance(cfg.target_modules, str):
        origin = "IA3's default targets"
    elif cfg.target_modules == "family":
        origin = f"model.family={family}'s targets"
    else:
        origin = "peft.target_modules"
    return (f"peft={cfg.method}: {origin} {wanted} match no module of {config.model_type} ({model_folder}); its "
            f"linear layers are {linear}: set peft.target_modules=[...] from those" +
            (" or peft.target_modules=all-linear" if method(cfg.method).rank_adapter else ""))


def has_fused_experts(model) -> bool:
    """Whether `model` keeps MoE experts as stacked 3-D parameters (Mixtral, Qwen-MoE, ... in
    transformers 5), which peft adapts with `lora.ParamWrapper` rather than as linear layers."""
    # Under ZeRO-3 a parameter is an empty partition; ds_shape keeps its full shape. The name tells
    # experts from other 3-D weights (convolutions in Mamba-style or LFM2 models).
    return any(len(getattr(param, "ds_shape", param.shape)) >= 3 and "experts" in name
               for name, param in model.named_parameters())


def _restore_linear_dropout(model, dropout: float) -> int:
    """Give every LoRA layer but peft's ParamWrappers dropout `dropout`; returns how many.

    peft refuses any LoRA dropout on a model with fused experts (its ParamWrapper has none), so
    the adapter is built without dropout and the linear layers (attention, dense MLPs) get the
    configured dropout back here: the user's setting holds wherever peft can apply it.
    """
    from torch import nn
    from peft.tuners.lora import LoraLayer

    count = 0
    for module in model.modules():
        if isinstance(module, LoraLayer) and type(module).__name__ != "ParamWrapper":
            for adapter in module.lora_dropout:
                module.lora_dropout[adapter] = nn.Dropout(p=dropout)
                count += 1
    return count


def apply_peft(model, cfg: PeftConfig, family: str, zero3: bool = False):
    """Wrap `model` with the configured peft method; only the method's parameters stay trainable."""
    import dataclasses

    import peft

    if cfg.quantize_4bit:  # validate.py refuses this before launch; a hand-written run dir still hears why
        raise NotImplementedError("peft.quantize_4bit=true (QLoRA) is not implemented yet; use peft=lora")
    entry = method(cfg.method)
    split_dropout = entry.rank_adapter and cfg.dropout > 0 and has_fused_experts(model)
    model = peft.get_peft_model(model, peft_config(dataclasses.replace(cfg, dropout=0.0) if split_dropout else cfg, family))
    if split_dropout:
        import warnings

        restored = _restore_linear_dropout(model, cfg.dropout)
        warnings.warn(f"peft.dropout={cfg.dropout} on {restored} linear LoRA layers; the fused MoE expert "
                      "weights are adapted without dropout (peft supports none there)")
    if zero3 and entry.on_zero3 is not None:
        entry.on_zero3(model)
    return model
