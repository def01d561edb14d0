"""Per-family defaults: which modules LoRA adapts, and the chat template to fall back on.

Why a table: `peft.target_modules: all-linear` is the safe default, but users often want the
classic "attention + MLP projections" set, whose module names differ per architecture; and some
base-model tokenizers ship without a chat template, so training on chat data needs a family
default. `model.family` (see trainer/config.py) picks the row; version suffixes (llama3, qwen2_5,
qwen3, gemma2, ...) are accepted as aliases of their family.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

# Attention projections and gated-MLP projections shared by Llama-style decoders.
_LLAMA_STYLE: Tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj",
                                 "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Family:
    lora_targets: Tuple[str, ...]
    # A name in trainer/templates.py NAMED, used only when the tokenizer has no template. Instruct
    # checkpoints always ship their own (kept as is); a base model has none and learns whichever
    # format it is fine-tuned on, so ChatML - the one defined there - serves every family.
    chat_template: str = "chatml"


FAMILIES: Dict[str, Family] = {
    "llama": Family(_LLAMA_STYLE),
    "qwen": Family(_LLAMA_STYLE),  # Qwen2, Qwen2.5, Qwen3 (dense)
    "mistral": Family(_LLAMA_STYLE),
    "gemma": Family(_LLAMA_STYLE),
    "smollm": Family(_LLAMA_STYLE),  # SmolLM/SmolLM2: the Llama architecture
}

ALIASES: Dict[str, str] = {
    "llama2": "llama", "llama3": "llama",
    "qwen2": "qwen", "qwen2_5": "qwen", "qwen2.5": "qwen", "qwen3": "qwen",
    "gemma2": "gemma", "gemma3": "gemma",
    "smollm2": "smollm",
}


def get_family(family: str) -> Family:
    """The row for `family` (case-insensitive, aliases allowed); ValueError lists the valid ones."""
    key = family.lower()
    key = ALIASES.get(key, key)
    if key not in FAMILIES:
        raise ValueError(f"model.family={family!r} is unknown; choose one of "
                         f"{', '.join(FAMILIES)} (or peft.target_modules=all-linear and "
                         "model.chat_template=... for other architectures)")
    return FAMILIES[key]


def lora_targets(family: str) -> List[str]:
    """Module names LoRA should adapt for `family`: the attention and MLP projections."""
    return list(get_family(family).lora_targets)


def default_chat_template(family: str) -> str:
    """Name of the chat template to use when the tokenizer ships none (e.g. "chatml")."""
    return get_family(family).chat_template
