"""Speed switches of the `model` group that change how the model runs, not what it computes.

activation_checkpointing:
    none       keep every activation (fastest, most memory)
    full       keep only each decoder layer's input; recompute the layer in backward (~30 % slower)
    selective  recompute only the cheap element-wise ops (norms, activations, rotary, residuals) and
               keep the outputs of matmuls and attention, which are the costly ones to redo:
               torch's selective activation checkpointing with a save-the-matmuls policy.
compile:
    torch.compile of the model's forward, in place (parameter names unchanged), before DeepSpeed
    wraps it. It compiles again for every new input shape (the first time with dynamic shapes),
    so data.pad_to=auto pads every batch to max_seq_len under compile. The loop reports any step
    after the first that compiled new code. Generation runs eagerly: its ever-growing cache would
    recompile at each new length.
"""
from __future__ import annotations

import contextlib
import functools

import torch

# The ops whose outputs selective checkpointing keeps: matmuls and attention kernels.
_SAVED_OPS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def _save_matmuls(ctx, op, *args, **kwargs):
    from torch.utils.checkpoint import CheckpointPolicy

    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: str) -> dict:
    """Keyword arguments for torch.utils.checkpoint.checkpoint under `mode` (full or selective)."""
    kwargs = {"use_reentrant": False}  # non-reentrant: works with ZeRO-3's parameter hooks
    if mode == "selective":
        from torch.utils.checkpoint import create_selective_checkpoint_contexts

        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)
    return kwargs


def apply_speed_switches(model, activation_checkpointing: str, compile_model: bool):
    """Turn on checkpointing and compilation on a built (possibly peft-wrapped) model."""
    if activation_checkpointing != "none":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs(activation_checkpointing))
        if hasattr(model, "enable_input_require_grads"):
            # With frozen embeddings (LoRA) the checkpointed layers' inputs need grad for backward to reach them.
            model.enable_input_require_grads()
    if compile_model:
        # The forward only, not the module call: DeepSpeed's engine adds hooks around the call, which
        # dynamo would otherwise trace (and re-trace) as frames of their own.
        model.forward = torch.compile(model.forward)
    return model


def compiled_frames() -> int:
    """How many Python frames torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def eager_when_compiled(compiled: bool):
    """A context that runs a compiled model eagerly (for generation), or a no-op."""
    if compiled and hasattr(torch.compiler, "set_stance"):
        return torch.compiler.set_stance("force_eager")
    return contextlib.nullcontext()
