"""`shardtune export RUN_DIR [--step N] [--merge] [--gguf [--quant Q]] --out DIR`: a Hugging Face folder from a checkpoint.

Offline, one process, no DeepSpeed engine: the sharded ZeRO checkpoint is consolidated with
DeepSpeed's zero_to_fp32 (lazily: each tensor is assembled from the ranks' partitions only when
it is written). Full fine-tuning gives a model folder written shard by shard; a peft run gives an
adapter folder, or with --merge a merged model, checked numerically against base + adapter. With
--gguf the (merged) model folder also gets `model.gguf` and an Ollama `Modelfile` (trainer/gguf_export.py).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from trainer.gguf_export import QUANTS as GGUF_QUANTS
from trainer.gguf_export import SUPPORTED as GGUF_SUPPORTED
from trainer.gguf_export import GGUFExportError
from trainer.peft_methods import method as peft_method
from trainer.peft_methods import vllm_problem
from trainer.run_dir import RunDir
from trainer.train_state import TrainState

PROBE_TEXT = "The capital of France is Paris. Water boils at 100 degrees Celsius at sea level."
MERGE_TOLERANCE = 1e-4  # max |logit difference|, merged vs base + adapter, in fp32


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit) and upper[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(upper[:-len(unit)]) * units[unit])
    if upper.isdigit():
        return int(upper)
    raise argparse.ArgumentTypeError(f"--max-shard-size {text!r}: give a size such as 500MB or 2GB")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardtune export", description=__doc__.split("\n")[0])
    p.add_argument("run_dir", type=Path, help="a shardtune run directory")
    p.add_argument("--out", type=Path, required=True, help="folder to write (replaced if it exists)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest committed)")
    p.add_argument("--merge", action="store_true", help="peft runs: merge the adapter into a full model")
    p.add_argument("--max-shard-size", type=parse_size, default="2GB", help="largest safetensors shard (default 2GB)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="dtype of the written weights; auto (default): the dtype the model trained in (bf16 on "
                        "GPU runs, model.dtype when set), else the one the base model was published in")
    p.add_argument("--gguf", action="store_true",
                   help="also write DIR/model.gguf (llama.cpp, Ollama) and DIR/Modelfile; peft runs are merged "
                        "first. Architectures: " + ", ".join(sorted(GGUF_SUPPORTED)))
    p.add_argument("--quant", choices=GGUF_QUANTS, default=None,
                   help="with --gguf: the type of the GGUF's weight matrices (default f16; norms stay f32)")
    return p


def find_checkpoint(run_dir: Path, step: Optional[int]) -> Path:
    from trainer import checkpoint

    root = checkpoint.checkpoint_root(run_dir)
    if step is None:
        folder = checkpoint.find_resume_checkpoint(root, log=lambda m: print(f"[export] {m}", file=sys.stderr))
        if folder is None:
            raise SystemExit(f"{root}: no committed checkpoint to export (set checkpoint.every_steps or "
                             "checkpoint.save_final=true when training)")
        return folder
    folder = root / checkpoint.tag_for(step)
    problem = checkpoint.verify(folder, deep=False)  # content: checkpoint_tensors
    if problem:
        have = ", ".join(str(int(t.split("-")[1])) for t in checkpoint.committed_tags(root)) or "none"
        raise SystemExit(f"--step {step}: {problem}; committed steps: {have}")
    return folder


def checkpoint_tensors(folder: Path, stage: int) -> Dict[str, object]:
    """name -> tensor (ZeRO-0) or a lazy tensor that `.contiguous()` assembles (ZeRO 1-3)."""
    from trainer.checkpoint import preverify_loadable, safe_load

    # Every file against its checksum, every pickle safe-loaded: DeepSpeed's reader unpickles with
    # weights_only=False, so bad files are refused before it opens them.
    preverify_loadable(folder)
    if stage == 0:
        return dict(safe_load(folder / "mp_rank_00_model_states.pt", map_location="cpu")["module"])
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(folder.parent), tag=folder.name, lazy_mode=True)


def materialize(tensors: Dict[str, object], dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    out = {}
    for name, lazy in tensors.items():
        tensor = lazy.contiguous() if not isinstance(lazy, torch.Tensor) else lazy
        out[name] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    return out


def export_full(cfg, tensors, out: Path, dtype: torch.dtype, max_bytes: int) -> List[Path]:
    """Stream the consolidated weights into shards: one tensor assembled at a time."""
    from transformers import AutoConfig, GenerationConfig

    from trainer.export import ShardWriter, write_model_files
    from trainer.model import build_tokenizer, model_dir

    source = model_dir(cfg.model)
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.model.trust_remote_code)
    tied = getattr(config, "tie_word_embeddings", False)
    writer = ShardWriter(out, max_bytes)
    for name, lazy in tensors.items():
        if tied and name == "lm_head.weight":
            continue  # the same tensor as the input embedding; transformers ties it on load
        tensor = lazy.contiguous() if not isinstance(lazy, torch.Tensor) else lazy
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    shards = writer.close()
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        generation = GenerationConfig.from_model_config(config)
    write_model_files(config, generation, build_tokenizer(cfg.model), out, dtype)
    return shards


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def load_into(model, tensors, saved_base: Optional[dict]) -> None:
    """The checkpoint's tensors into the rebuilt model. An adapter checkpoint (`saved_base` set) lacks
    the frozen base weights, which the model already holds from its source: exactly those may be missing."""
    result = model.load_state_dict(materialize(tensors, torch.float32), strict=saved_base is None)
    frozen = {name for name, param in model.named_parameters(remove_duplicate=False)  # a tied head too
              if not param.requires_grad}
    unexplained = sorted(set(result.missing_keys) - frozen) + sorted(result.unexpected_keys)
    if unexplained:
        raise SystemExit(f"[export] the checkpoint does not fit the model this run builds: missing or unexpected "
                         f"{unexplained[:8]}")


def trained_model(cfg, tensors, saved_base: Optional[dict], who: str):
    """The run's model rebuilt on CPU (peft applied) with the checkpoint's tensors loaded, in eval mode.
    An adapter checkpoint (`saved_base` set) is first checked against the base it was trained on;
    `who` prefixes the refusal ("[export]", "shardtune eval:")."""
    from trainer.model import base_problem, base_record, build_model

    if saved_base is not None:
        problem = base_problem(saved_base, base_record(cfg.model, cfg.seed), "the checkpoint")
        if problem:
            raise SystemExit(f"{who} {problem}")
    model = build_model(cfg.model, cfg.peft, {"zero_optimization": {"stage": 0}},
                        device=torch.device("cpu"), seed=cfg.seed)
    load_into(model, tensors, saved_base)
    return model.eval()


def export_peft(cfg, tensors, out: Path, dtype: torch.dtype, max_bytes: int, merge: bool,
                saved_base: Optional[dict] = None) -> dict:
    """Rebuild the peft model on CPU, load the checkpoint into it, write the adapter or merged model."""
    from trainer.model import build_tokenizer, model_dir

    if merge and peft_method(cfg.peft.method).no_merge:
        raise SystemExit(f"--merge: {peft_method(cfg.peft.method).no_merge}; export the adapter (without --merge)")
    model = trained_model(cfg, tensors, saved_base, "[export]")
    tokenizer = build_tokenizer(cfg.model)
    facts: dict = {}
    if merge:
        ids = tokenizer(PROBE_TEXT, return_tensors="pt").input_ids
        before = _logits(model, ids)
        merged = model.merge_and_unload()
        diff = (_logits(merged, ids) - before).abs().max().item()
        if diff > MERGE_TOLERANCE:
            raise SystemExit(f"--merge: merged logits differ from base + adapter by {diff:.2e} "
                             f"(tolerance {MERGE_TOLERANCE:g}); not writing {out}")
        merged.config.use_cache = True
        merged.to(dtype).save_pretrained(out, max_shard_size=max_bytes)
        tokenizer.save_pretrained(out)
        return {"merged": True, "merge_max_logit_diff": diff}
    from trainer.pretrained import base_model_reference

    base_path = base_model_reference(cfg.model.name_or_path, model_dir(cfg.model))
    model.peft_config["default"].base_model_name_or_path = base_path
    if cfg.model.name_or_path.startswith("builtin:"):  # no published base to point at: write it beside
        base_path = str(out / "base")
        model.peft_config["default"].base_model_name_or_path = base_path
        model.save_pretrained(out)
        base = model.unload()
        base.config.use_cache = True
        base.to(dtype).save_pretrained(base_path, max_shard_size=max_bytes)
        tokenizer.save_pretrained(base_path)
    else:
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return facts


def saved_zero_stage(run_dir: Path, folder: Path) -> int:
    """The ZeRO stage the checkpoint's shards were written with: its own record (the run's current
    ds_config.json may belong to a later launch on another stage); older checkpoints lack it."""
    stage = TrainState.read(folder).zero_stage if TrainState.exists(folder) else None
    return stage if stage is not None else RunDir(run_dir).read_ds_config()["zero_optimization"]["stage"]


def export_dtype(cfg, run_dir: Path, asked: str) -> str:
    """`--dtype auto`: what servers expect back, not the fp32 master copy: the dtype the model trained
    in (model.dtype, or bf16 on a GPU run), else the base model's published dtype (config.json)."""
    if asked != "auto":
        return asked
    if cfg.model.dtype != "auto":
        return cfg.model.dtype
    facts = RunDir(run_dir).read_json(RunDir(run_dir).env) or {}
    if facts.get("device") == "cuda":
        return "bfloat16"
    from trainer.model_source import model_dir

    try:
        published = json.loads((model_dir(cfg.model) / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    name = str(published.get("dtype") or published.get("torch_dtype") or "float32").removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def refuse_unsupported_gguf(cfg) -> None:
    """Before any work: the GGUF layout of the run's architecture must be known (the error names it)."""
    from trainer.gguf_export import layout_for
    from trainer.model_source import model_dir

    config = json.loads((model_dir(cfg.model) / "config.json").read_text())
    layout_for(config.get("model_type", "?"))


def add_gguf(out: Path, quant: str, facts: dict) -> None:
    """`out/model.gguf` and `out/Modelfile` from the model folder just written to `out`."""
    from trainer.gguf_export import export_folder

    started = time.perf_counter()
    gguf = export_folder(out, out, quant, name=Path(facts["run_dir"]).name)
    facts["gguf"] = {**gguf, "seconds": round(time.perf_counter() - started, 2)}


def export_run(run_dir: Path, out: Path, step: Optional[int] = None, merge: bool = False,
               dtype: str = "auto", max_bytes: int = 2 * 10**9, gguf: Optional[str] = None) -> dict:
    """Write `out` from a checkpoint of `run_dir`; returns what was done (also saved in out).

    `gguf` ("f16", "bf16", "q8_0"): also write `out/model.gguf` and `out/Modelfile`; a peft run is
    merged first (a GGUF holds one plain model)."""
    import shutil

    from trainer.config import load_run_config

    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation needs no accelerator
    started = time.perf_counter()
    run_dir = Path(run_dir).resolve()
    cfg = load_run_config(run_dir)
    if gguf:
        refuse_unsupported_gguf(cfg)
        merge = cfg.peft.method != "none"
    folder = find_checkpoint(run_dir, step)
    stage = saved_zero_stage(run_dir, folder)
    dtype = export_dtype(cfg, run_dir, dtype)
    torch_dtype = getattr(torch, dtype)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    tensors = checkpoint_tensors(folder, stage)
    if cfg.peft.method == "none":
        if merge:
            print("[export] --merge ignored: a full fine-tuning run has no adapter", file=sys.stderr)
        export_full(cfg, tensors, out, torch_dtype, max_bytes)
        facts = {"merged": False}
    else:
        facts = export_peft(cfg, tensors, out, torch_dtype, max_bytes, merge,
                            TrainState.read(folder).base if TrainState.exists(folder) else None)
        facts["vllm_problem"] = None if facts.get("merged") else vllm_problem(cfg.peft)
        if facts["vllm_problem"]:
            print(f"[export] warning: vLLM cannot serve this adapter: {facts['vllm_problem']}. Export with --merge "
                  "for a plain model that vLLM (and every server) loads, or serve the adapter with "
                  "transformers + peft", file=sys.stderr)
    facts.update({"run_dir": str(run_dir), "checkpoint": folder.name, "method": cfg.peft.method, "dtype": dtype,
                  "weights_bytes": sum(f.stat().st_size for f in out.glob("*.safetensors"))})
    if gguf:
        add_gguf(out, gguf, facts)
    facts["seconds"] = round(time.perf_counter() - started, 2)
    (out / "shardtune_export.json").write_text(json.dumps(facts, indent=1) + "\n")
    return facts


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    if not RunDir(args.run_dir).is_run():
        print(f"shardtune export: {args.run_dir} is not a shardtune run directory (no config.yaml)", file=sys.stderr)
        return 2
    if args.quant and not args.gguf:
        print("shardtune export: --quant applies to the GGUF file: add --gguf", file=sys.stderr)
        return 2
    try:
        facts = export_run(args.run_dir, args.out, args.step, args.merge, args.dtype, args.max_shard_size,
                           gguf=(args.quant or "f16") if args.gguf else None)
    except GGUFExportError as err:
        print(f"shardtune export --gguf: {err}", file=sys.stderr)
        return 2
    kind = "merged model" if facts.get("merged") else ("model" if facts["method"] == "none" else "adapter")
    extra = f", merged logits within {facts['merge_max_logit_diff']:.1e}" if facts.get("merged") else ""
    print(f"exported {kind} from {facts['checkpoint']} to {args.out} ({facts['weights_bytes'] / 1e6:.2f} MB "
          f"of weights, {facts['seconds']:.1f}s{extra})")
    if "gguf" in facts:
        print(f"  + {args.out / 'model.gguf'} ({facts['gguf']['quant']}, {facts['gguf']['gguf_bytes'] / 1e6:.2f} MB) "
              f"and {args.out / 'Modelfile'}: `llama-cli -m {args.out / 'model.gguf'}`, or "
              f"`ollama create NAME -f {args.out / 'Modelfile'}`")
    return 0
