"""The gpu tier: the same paths as the CPU tests, on a CUDA GPU (skipped where there is none; CI has
none, so these run in the sessions lent a GPU: `pytest -m gpu tests/gpu`).

Each is a short real run through `shardtune train` (bf16, the GPU defaults), checked for finite,
falling loss and a clean exit: a 2-step LoRA + ZeRO-3 run, and a packed run with flex attention
(the attention that keeps packed documents apart on the GPU).
"""
from __future__ import annotations

import math

import pytest

from helpers import TINY, losses, train

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _gpus() -> int:
    return torch.cuda.device_count()


def test_lora_zero3_two_steps_on_the_gpu(tmp_path):
    ranks = min(2, _gpus())
    proc = train(tmp_path / "run", *TINY, "train.max_steps=2", "peft=lora", "deepspeed=zero3",
                 "cluster.device=cuda", f"cluster.nproc_per_node={ranks}", "checkpoint.export_final=true")
    assert proc.returncode == 0, proc.stdout[-4000:]
    curve = losses(tmp_path / "run")
    assert len(curve) == 2 and all(math.isfinite(x) for x in curve), curve
    assert (tmp_path / "run" / "export" / "adapter_model.safetensors").is_file()


def test_packed_rows_with_flex_attention_on_the_gpu(tmp_path):
    proc = train(tmp_path / "run", *TINY, "train.max_steps=4", "data.packing=true", "model.attn_implementation=flex_attention",
                 "cluster.device=cuda", "cluster.nproc_per_node=1", "deepspeed=zero0", "optim.lr=1e-3")
    assert proc.returncode == 0, proc.stdout[-4000:]
    curve = losses(tmp_path / "run")
    assert len(curve) == 4 and all(math.isfinite(x) for x in curve), curve
    assert curve[-1] < curve[0], curve
