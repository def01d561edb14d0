"""Data: read files, render samples as the model sees them, mask what is not learned, batch.

`build_datasets` is the one entry the trainer calls; everything here is rank-agnostic except the
sampler (trainer/data/sampler.py), which takes the rank and world size explicitly. This package's
own names need no torch (the launcher validates data settings with `packing` and `sources`): the
sampler and the collator, which do, are imported from their modules.
"""
from trainer.data.dataset import TokenizedDataset, build_datasets, load_files

__all__ = ["TokenizedDataset", "build_datasets", "load_files"]
