"""shardtune trainer: the worker side. Reads a resolved run directory; never runs Hydra."""
