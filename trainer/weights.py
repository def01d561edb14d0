"""Writing a model's weights as safetensors shards: by this process, whatever its rank.

`transformers`' `save_pretrained` writes weights only on torch.distributed rank 0 (since 5.25), so a
file that one process must write whole (a converted or initialised model in the cache, an export)
is written here instead.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, Tuple

import torch

DEFAULT_SHARD_BYTES = 2 * 1024**3


class ShardWriter:
    """Append tensors; a shard file is written (and freed) each time `max_bytes` would be exceeded."""

    def __init__(self, out_dir: Path, max_bytes: int = DEFAULT_SHARD_BYTES):
        self.out_dir, self.max_bytes = Path(out_dir), max_bytes
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.pending: Dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[Tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.detach().to("cpu").contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        from safetensors.torch import save_file

        if not self.pending:
            return
        name = f"part-{len(self.files) + 1:05d}.safetensors"
        save_file(self.pending, str(self.out_dir / name), metadata={"format": "pt"})
        os.chmod(self.out_dir / name, 0o644)  # safetensors creates 0600; others load exports too
        self.files.append((name, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Give the shards their final names (and an index if more than one); return their paths."""
        self.flush()
        if len(self.files) == 1:
            os.replace(self.out_dir / self.files[0][0], self.out_dir / "model.safetensors")
            return [self.out_dir / "model.safetensors"]
        weight_map, paths = {}, []
        for i, (tmp, names) in enumerate(self.files, 1):
            final = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            os.replace(self.out_dir / tmp, self.out_dir / final)
            weight_map.update({n: final for n in names})
            paths.append(self.out_dir / final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return paths



def save_whole_model(model, folder: Path) -> None:
    """Weights (sharded safetensors with an index past 2 GB), config and generation config of a model
    held whole in this process, written by this process whatever its torch.distributed rank (unlike
    `save_pretrained`, which since transformers 5.25 writes them on rank 0 only)."""
    writer = ShardWriter(folder)
    for name, param in model.named_parameters():  # tied weights appear once, as transformers expects
        writer.add(name, param.data)
    persistent = set(model.state_dict().keys())
    for name, buffer in model.named_buffers():
        if name in persistent:
            writer.add(name, buffer)
    writer.close()
    model.config.save_pretrained(folder)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(folder)
