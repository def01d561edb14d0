"""shardtune trainer: the worker side. Reads a resolved run directory; never runs Hydra."""
from trainer.optional_imports import defer_mlflow_for_deepspeed

defer_mlflow_for_deepspeed()  # before anything imports deepspeed: see trainer/optional_imports.py
