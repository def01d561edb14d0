"""FLOPs per trained token and model FLOPs utilisation (MFU), with the convention stated.

Convention (PaLM / Megatron, as torchtitan computes it), for one token of a sequence of length T:

    full fine-tuning:  6 * N + 12 * L * H * Q * T
    LoRA / frozen:     4 * N + 12 * L * H * Q * T + 6 * N_trainable

N is the parameter count without the input embedding (a tied LM head counts once), L layers,
H attention heads, Q head dim. The attention term counts the full T x T score matrix (not halved
for causal masking), forward (2x) plus backward (4x). Frozen weights need no weight gradient, so
they cost 4 FLOPs per parameter instead of 6. For a batch of documents of different lengths the
attention term uses the token-weighted mean length sum(s^2)/sum(s): a document of length s costs
12*L*H*Q*s per token.

MFU = tokens/s * FLOPs per token / (devices * peak FLOP/s).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional

CONVENTION = ("PaLM/Megatron: 6*N + 12*L*H*Q*T per token (N without input embedding, tied head once; "
              "frozen weights 4*N + 6*N_trainable); T = token-weighted mean document length")

# Dense peak FLOP/s per device by dtype, from the vendors' datasheets (no sparsity).
GPU_PEAKS = {
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},  # fp32 via TF32 tensor cores
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 494.5e12},
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 156e12},
    "L40S": {"bf16": 362e12, "fp16": 362e12, "fp32": 183e12},
}


@dataclass(frozen=True)
class ModelShape:
    """What the FLOPs and memory formulas need to know about a decoder-only transformer."""
    params: int  # all parameters (a tied embedding / LM head counted once)
    embedding_params: int  # the input embedding table
    tied_embeddings: bool
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden: int
    intermediate: int
    vocab: int
    largest_layer_params: int = 0  # one decoder layer (ZeRO-3 gathers about one at a time)

    @property
    def non_embedding_params(self) -> int:
        """N of the convention: the head is kept when tied (it is the embedding, counted once)."""
        return self.params if self.tied_embeddings else self.params - self.embedding_params


def attention_length(lengths: Iterable[int]) -> float:
    """sum(s^2) / sum(s): the T that makes 12*L*H*Q*T per token exact for documents of lengths s."""
    lengths = [int(s) for s in lengths if s > 0]
    total = sum(lengths)
    return sum(s * s for s in lengths) / total if total else 0.0


def flops_per_token(shape: ModelShape, seq_len: float, trainable_params: Optional[int] = None) -> float:
    """Training FLOPs for one token (forward + backward).

    Args:
        shape: the model's shape.
        seq_len: T, the (mean) attended length; see `attention_length`.
        trainable_params: None for full fine-tuning; otherwise the count of trainable parameters
            (LoRA adapters), which switches to the frozen-weights formula.
    """
    n = shape.non_embedding_params
    attention = 12 * shape.layers * shape.heads * shape.head_dim * seq_len
    if trainable_params is None:
        return 6 * n + attention
    return 4 * n + attention + 6 * trainable_params


def peak_flops(device_name: str, precision: str) -> Optional[float]:
    """Datasheet peak FLOP/s of one GPU named like torch.cuda.get_device_name(); None if unknown."""
    for key, peaks in GPU_PEAKS.items():
        if key in device_name.upper():
            return peaks.get(precision)
    return None


def mfu(tokens_per_s: float, flops_token: float, devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation in [0, 1]."""
    return tokens_per_s * flops_token / (devices * peak_per_device)


def measure_cpu_peak(threads: int, size: int = 1024, repeats: int = 5) -> float:
    """Best observed fp32 matmul FLOP/s with `threads` threads: the CPU's practical limit here.

    CPUs have no datasheet number torch reaches; a large matmul is the honest ceiling for a model
    made of matmuls.
    """
    import time

    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        return 2 * size ** 3 / best
    finally:
        torch.set_num_threads(previous)
