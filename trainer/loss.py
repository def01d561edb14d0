"""The training loss: the sum of next-token cross-entropy over the label tokens of a micro-batch.

Two ways to compute the same number (model.loss_chunks):

    1 (default)  the model's own forward: the output head makes B x S x V logits, then one
                 cross-entropy. Those logits (and their log-softmax and gradient, in fp32) are the
                 largest activation at long sequences and large vocabularies: 6 GB per 4k-token row
                 at a 128k vocabulary.
    N > 1        only positions that carry a label (not padding, not masked prompt tokens) go
                 through the head, in N pieces, each under activation checkpointing: one piece's
                 logits exist at a time, in forward and in backward. Costs one more pass of the
                 head over the label tokens in backward; saves the head's FLOPs on masked ones.

Every rank runs N pieces, some possibly empty, whatever its data: the same pattern on every rank.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from trainer.data.render import IGNORE

# Config keys of architectures that transform the head's logits before the loss (Gemma 2's
# soft-capping, Cohere's and Granite's scaling). The chunked path applies the bare head, so it
# refuses these rather than compute a different loss.
LOGIT_TRANSFORM_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """Each position's next-token label. Shifting the labels, not the logits: slicing logits[:, :-1]
    would copy the whole B x S x V tensor. The last position gets no target."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def sum_cross_entropy(engine, batch: Dict[str, torch.Tensor], chunks: int = 1) -> torch.Tensor:
    """Sum (not mean) of the next-token loss over the label tokens of a micro-batch, in fp32.

    `engine` is the DeepSpeed engine (or a bare model); `chunks` is model.loss_chunks.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    targets = shifted_targets(batch["labels"]).reshape(-1)
    if chunks <= 1:
        logits = engine(**inputs, use_cache=False).logits.float()  # no copy when already fp32
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets, ignore_index=IGNORE, reduction="sum")
    keep = targets != IGNORE
    with _head_computes_the_loss(output_head(engine), targets[keep], keep, chunks):
        # The model's forward applies its head once, as always; within this block that one call
        # returns the summed loss in place of the logits.
        return engine(**inputs, use_cache=False).logits


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")


class _head_computes_the_loss:
    """Within the block, the head's forward takes the final hidden states and returns the summed loss of
    the label positions (`keep`), in `chunks` checkpointed pieces.

    It stays one call of the head module, so ZeRO-3 gathers the head's weight once in forward (its
    pre-forward hook) and once in backward (its pre-backward hook on the returned loss); the chunks'
    recomputation in backward uses that gathered weight through F.linear, not module calls.
    """

    def __init__(self, head: torch.nn.Module, targets: torch.Tensor, keep: torch.Tensor, chunks: int):
        self.head, self.targets, self.keep, self.chunks = head, targets, keep, chunks

    # Eager under model.compile: the number of label tokens changes every batch, and the chunk sizes
    # it splits into would recompile the graph at every new count.
    @torch.compiler.disable
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if hidden.shape[:-1].numel() != self.keep.numel():
            raise ValueError(f"model.loss_chunks > 1: the output head saw {hidden.shape[:-1].numel()} positions for "
                             f"{self.keep.numel()} labels (a method that adds virtual tokens?); set model.loss_chunks=1")
        hidden = hidden.reshape(-1, hidden.size(-1))[self.keep]
        total = hidden.new_zeros((), dtype=torch.float32)
        # Every rank runs `chunks` pieces (some maybe empty): the same work pattern on every rank.
        for part, part_targets in zip(hidden.tensor_split(self.chunks), self.targets.tensor_split(self.chunks)):
            total = total + checkpoint(_chunk_loss, part, part_targets, self.head.weight, self.head.bias,
                                       use_reentrant=False)
        return total

    def __enter__(self) -> None:
        self.head.forward = self.forward  # an instance attribute: the module's hooks still run around it

    def __exit__(self, *exc) -> None:
        del self.head.forward  # back to the class's forward


def output_head(engine) -> torch.nn.Module:
    """The model's output head (lm_head), through the DeepSpeed engine and a peft wrapper."""
    model = getattr(engine, "module", engine)
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:  # None, or wrapped (e.g. LoRA on lm_head): F.linear would skip it
        raise ValueError(f"model.loss_chunks > 1 needs a plain Linear output head; {type(model).__name__}'s is "
                         f"{type(head).__name__}: set model.loss_chunks=1")
    return head


def logit_transform_problem(config: dict) -> Optional[str]:
    """Why model.loss_chunks > 1 cannot train this model (a config.json as a dict), or None."""
    for scope in (config, config.get("text_config") or {}):
        for key in LOGIT_TRANSFORM_KEYS:
            if scope.get(key) not in (None, 1, 1.0):
                return (f"model.loss_chunks={{chunks}}: this {config.get('model_type', 'model')} applies {key}="
                        f"{scope[key]} to its logits after the output head, which the chunked loss does not "
                        "reproduce; set model.loss_chunks=1")
    return None


def check_chunked_loss_supported(model_config, chunks: int) -> None:
    """Refuse model.loss_chunks > 1 for a model that transforms its logits after the head."""
    problem = logit_transform_problem(model_config.to_dict())
    if problem:
        raise ValueError(problem.format(chunks=chunks))
