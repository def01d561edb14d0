"""Data: read files, render samples as the model sees them, mask what is not learned, batch.

`build_datasets` is the one entry the trainer calls; everything here is rank-agnostic except the
sampler, which takes the rank and world size explicitly.
"""
from trainer.data.dataset import TokenizedDataset, build_datasets, load_files
from trainer.data.sampler import GlobalBatchSampler
from trainer.data.collate import collate

__all__ = ["TokenizedDataset", "build_datasets", "load_files", "GlobalBatchSampler", "collate"]
