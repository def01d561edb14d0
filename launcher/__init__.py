"""shardtune launcher: compose a config with Hydra, validate it, write the run directory, spawn workers."""
