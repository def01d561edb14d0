"""Parameter-efficient methods through peft, built from the `peft` config node."""
from __future__ import annotations

from trainer.config import PeftConfig


def _targets(cfg: PeftConfig, family: str):
    if cfg.target_modules == "family":
        from trainer.families import lora_targets

        return lora_targets(family)
    return cfg.target_modules if isinstance(cfg.target_modules, str) else list(cfg.target_modules)


def peft_config(cfg: PeftConfig, family: str):
    import peft

    common = dict(task_type="CAUSAL_LM", modules_to_save=list(cfg.modules_to_save) or None)
    if cfg.method in ("lora", "dora"):
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                               target_modules=_targets(cfg, family), use_rslora=cfg.use_rslora,
                               use_dora=cfg.method == "dora", **common)
    if cfg.method == "ia3":
        return peft.IA3Config(**common)
    if cfg.method == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens, **common)
    raise ValueError(f"peft.method={cfg.method!r} is not a peft method")


def apply_peft(model, cfg: PeftConfig, family: str):
    import peft

    return peft.get_peft_model(model, peft_config(cfg, family))
