"""What the one training loop minimises: `objective=sft|dpo|simpo|kto` (configs/objective/).

An objective owns, for the loop (trainer/loop.py) and the evaluation:
    units(dataset, indices)       what the global batch's loss is averaged over: trained tokens
                                  (sft) or rows (a pair, a KTO example)
    collate(rows, pad_id, width)  a micro-batch; preference rows put both sequences of every row
                                  into one batch of 2B sequences: one forward pass, not two
    micro_loss(engine, batch)     (the SUM of the loss over the micro-batch, {metric: (sum, count)})
    summarise(totals)             the metrics of a step, from the totals of every rank

The pure loss formulas are in trainer/objectives/losses.py; the precomputed reference of full
fine-tuning in trainer/objectives/reference.py.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from trainer.config import ObjectiveConfig, RootConfig
from trainer.data.collate import collate
from trainer.data.preference import KTO, PAIRS, collate_rows
from trainer.data.render import IGNORE
from trainer.loss import shifted_targets, sum_cross_entropy
from trainer.objectives import losses

OBJECTIVES = ("sft", "dpo", "simpo", "kto")
DATA_FORMAT = {"sft": None, "dpo": PAIRS, "simpo": PAIRS, "kto": KTO}  # the data.format each one reads
REFERENCE_FREE = ("sft", "simpo")
REFERENCES = ("auto", "adapters_off", "precomputed", "none")
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")

Totals = Dict[str, Tuple[float, float]]  # metric -> (sum, count) over a micro-batch, then over ranks


def resolve_reference(cfg: RootConfig) -> str:
    """adapters_off | precomputed | none: objective.reference with `auto` decided."""
    chosen = cfg.objective.reference
    if chosen != "auto":
        return chosen
    if cfg.objective.name in REFERENCE_FREE:
        return "none"
    return "adapters_off" if cfg.peft.method != "none" else "precomputed"


def sequence_logps(model, batch: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each sequence's label tokens, number of those tokens), each (rows,), fp32."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits.float()
    targets = shifted_targets(batch["labels"])
    token_logps = -F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE,
                                   reduction="none").view(targets.shape)
    keep = targets != IGNORE
    return (token_logps * keep).sum(dim=1), keep.sum(dim=1).to(token_logps.dtype)


def unwrap(engine):
    """The model inside a DeepSpeed engine (or the model itself)."""
    return getattr(engine, "module", engine)


@contextlib.contextmanager
def reference_mode(engine):
    """The policy as the reference: peft adapters disabled, eval mode (no dropout), no graph."""
    model = unwrap(engine)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            yield
    finally:
        model.train(was_training)


class SFT:
    name = "sft"
    reference = "none"

    def __init__(self, chunks: int = 1):
        self.chunks = chunks

    def units(self, dataset, indices: List[int]) -> int:
        return sum(dataset.label_tokens(i) for i in indices)

    def collate(self, rows, pad_id: int, width: Optional[int]):
        return collate(rows, pad_id, width)

    def micro_loss(self, engine, batch, live: bool = True) -> Tuple[torch.Tensor, Totals]:
        return sum_cross_entropy(engine, batch, self.chunks), {}

    def summarise(self, totals: Totals) -> Dict[str, float]:
        return {}


class Preference:
    """DPO, SimPO and KTO: the same batch layout and reference handling, their own loss formula."""

    def __init__(self, cfg: ObjectiveConfig, reference: str):
        self.cfg, self.name, self.reference = cfg, cfg.name, reference

    def units(self, dataset, indices: List[int]) -> int:
        return len(indices)

    def collate(self, rows, pad_id: int, width: Optional[int]):
        return collate_rows(rows, pad_id, width)

    def reference_logps(self, engine, batch) -> Optional[torch.Tensor]:
        """(rows x 2) reference log-probs of the first and second sequences, or None (reference-free)."""
        if self.reference == "precomputed":
            if "reference" not in batch:
                raise RuntimeError("objective.reference=precomputed but the batch carries no reference log-probs")
            return batch["reference"].float()
        if self.reference == "adapters_off":
            with reference_mode(engine):
                logps, _ = sequence_logps(engine, batch)
            return torch.stack(logps.chunk(2), dim=1)
        return None

    def micro_loss(self, engine, batch, live: bool = True) -> Tuple[torch.Tensor, Totals]:
        reference = self.reference_logps(engine, batch)
        logps, counts = sequence_logps(engine, batch)
        first, second = logps.chunk(2)
        first_len, second_len = counts.chunk(2)
        if self.name == "kto":
            return self._kto(first, second, reference, batch["desirable"], live)
        if self.name == "simpo":
            per_row, chosen, rejected = losses.simpo_losses(first, second, first_len, second_len, self.cfg.beta,
                                                            self.cfg.gamma)
        else:
            per_row, chosen, rejected = losses.dpo_losses(first, second, reference[:, 0], reference[:, 1],
                                                          self.cfg.beta, self.cfg.loss_type, self.cfg.label_smoothing)
        if self.cfg.sft_weight:
            per_row = per_row + self.cfg.sft_weight * (-first / first_len)  # RPO: mean NLL per chosen token
        rows = float(len(per_row))
        totals = {"rewards/chosen": (float(chosen.sum()), rows), "rewards/rejected": (float(rejected.sum()), rows),
                  "rewards/margin": (float((chosen - rejected).sum()), rows),
                  "rewards/accuracy": (float((chosen > rejected).float().sum()), rows),
                  "logps/chosen": (float(first.detach().sum()), rows),
                  "logps/rejected": (float(second.detach().sum()), rows)}
        return per_row.sum(), totals

    def _kto(self, logps, kl_logps, reference, desirable, live: bool) -> Tuple[torch.Tensor, Totals]:
        kl_sum, kl_count = losses.kto_reference_point(kl_logps, reference[:, 1])
        if not live:  # a throwaway batch of an evaluation: counts for nothing, here either
            kl_sum, kl_count = 0.0, 0
        kl_sum, kl_count = _sum_over_ranks([kl_sum, float(kl_count)], logps.device)
        z0 = max(0.0, kl_sum / kl_count) if kl_count else 0.0
        per_row, rewards = losses.kto_losses(logps, reference[:, 0], desirable, z0, self.cfg.beta,
                                             self.cfg.desirable_weight, self.cfg.undesirable_weight)
        good, bad = desirable, ~desirable
        totals = {"rewards/chosen": (float(rewards[good].sum()), float(good.sum())),
                  "rewards/rejected": (float(rewards[bad].sum()), float(bad.sum())),
                  "logps/chosen": (float(logps.detach()[good].sum()), float(good.sum())),
                  "logps/rejected": (float(logps.detach()[bad].sum()), float(bad.sum())),
                  "kl": (z0 * len(per_row), float(len(per_row)))}
        return per_row.sum(), totals

    def summarise(self, totals: Totals) -> Dict[str, float]:
        out = {name: (s / c if c else None) for name, (s, c) in totals.items()}
        if self.name == "kto" and out.get("rewards/chosen") is not None and out.get("rewards/rejected") is not None:
            out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
        return out


def _sum_over_ranks(values: List[float], device) -> List[float]:
    import torch.distributed as dist

    if not dist.is_initialized():
        return values
    from trainer.distributed import sum_across_ranks

    return sum_across_ranks(values, device)


def build_objective(cfg: RootConfig):
    """The objective the loop calls, from objective.* (validated before launch)."""
    if cfg.objective.name == "sft":
        return SFT(cfg.model.loss_chunks)
    return Preference(cfg.objective, resolve_reference(cfg))


def build_datasets(cfg: RootConfig, tokenizer, log=None):
    """The train and eval splits in the shape the objective reads."""
    kind = DATA_FORMAT[cfg.objective.name]
    if kind is None:
        from trainer.data import build_datasets as build_sft

        return build_sft(cfg.data, tokenizer, log=log)
    from trainer.data.preference import build_preference_datasets

    return build_preference_datasets(cfg.data, kind, tokenizer, log=log)
