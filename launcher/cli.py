"""The `shardtune` command: one subcommand per workflow, each in its own module."""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

# name -> (module:function, one-line help). Each function takes the remaining argv, returns an exit code.
COMMANDS = {
    "train": ("launcher.app:train_main", "compose a config with Hydra, write the run directory, launch workers"),
    "export": ("launcher.export_cmd:main", "write a Hugging Face model or adapter from a run's checkpoint"),
    "preflight": ("launcher.preflight_cmd:main", "estimate memory and FLOPs per rank before launching"),
    "bench": ("launcher.bench_cmd:main", "measure step time, tokens/s, MFU and memory (optionally vs HF Trainer)"),
    "data": ("launcher.data_cmd:main", "`data preview`: render samples as the model sees them, with statistics"),
    "report": ("launcher.report_cmd:main", "write an HTML/markdown report of a run or a sweep"),
    "sweep": ("launcher.sweep_cmd:main", "`sweep summary SWEEP_DIR`: rank the trials of a sweep"),
    "eval": ("launcher.eval_cmd:main", "base and fine-tuned model on the same lm-eval tasks, paired, with intervals"),
    "verify": ("launcher.verify_cmd:main", "check a run's checkpoints against their manifests, content included"),
    "stop": ("launcher.stop_cmd:main", "ask a running run to checkpoint and stop: shardtune stop RUN_DIR"),
    "config": ("launcher.config_cmd:main", "what a setting does: `shardtune config optim.lr`, `shardtune config peft`"),
}

USAGE = """usage: shardtune <command> [args]

Fine-tune language models with DeepSpeed ZeRO, locally, on a hostfile cluster or on Slurm.

commands:
{commands}

`shardtune train --help` shows the config groups and options, `shardtune config KEY` what one does;
`shardtune <command> --help` the rest;
`shardtune --version` our version and those of torch, deepspeed, transformers, peft, datasets, hydra.
Examples:
  shardtune train                                   # the embedded demo: tiny Llama, 2 CPU ranks, ZeRO-3
  shardtune train peft=lora deepspeed=zero2 optim.lr=1e-4
  shardtune train model=smollm2_135m peft=lora data.train_files=[my.jsonl]
  shardtune train -m optim.lr=1e-4,3e-4 peft.r=8,16  # a sweep
"""


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    return USAGE.format(commands="\n".join(lines))


def version_text() -> str:
    """Our version and those of the libraries a run depends on, as installed here (no torch import)."""
    from launcher.rundir import package_versions

    versions = package_versions()
    ours = versions.pop("shardtune") or "unknown (not installed)"
    return f"shardtune {ours}\n" + "\n".join(f"  {name} {version or 'not installed'}" for name, version in versions.items())


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version", "version"):
        print(version_text())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"shardtune: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[name][0].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            print(f"shardtune {name}: not available in this version", file=sys.stderr)
            return 2
        raise
    return getattr(module, function_name)(rest) or 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
