"""Write what a run trained as folders that plain transformers / peft load.

Two sources, one set of writers:
- live, at the end of a run (`export_final`, every rank calls it): ZeRO-3 keeps each parameter
  partitioned over the ranks, so parameters are gathered (`GatheredParameters`) before rank 0
  writes them - a plain `save_pretrained` would write empty tensors. A full model is gathered
  and written one shard at a time, so no rank ever holds the whole model.
- offline, from a checkpoint (launcher/export_cmd.py), through DeepSpeed's zero_to_fp32.

Layouts: a full model is `model.safetensors` (or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`), `config.json`, `generation_config.json` and the tokenizer; an
adapter is `adapter_config.json` + `adapter_model.safetensors` (+ tokenizer). A builtin model's
random base weights exist nowhere else, so its adapter export also writes them under `base/`.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Dict, Iterable, Optional, Tuple

import torch

from trainer.peft_methods import adapter_weight_markers, vllm_problem
from trainer.run_dir import RunDir
from trainer.weights import DEFAULT_SHARD_BYTES, ShardWriter



def _gathered(params):
    import deepspeed

    # modifier_rank=None: every rank gets the full tensors (read only); a no-op for unpartitioned ones.
    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)


def _fresh_dir(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    return out_dir


def write_model_files(model_config, generation_config, tokenizer, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json (with the KV cache back on for inference), generation_config.json, tokenizer."""
    config = copy.deepcopy(model_config)
    config.use_cache = True  # training turns it off; generation wants it
    config.dtype = dtype
    config.save_pretrained(out_dir)
    if generation_config is not None:
        generation_config.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------- live export (all ranks)
def stream_full_model(model, out_dir: Path, is_main: bool, max_bytes: int = DEFAULT_SHARD_BYTES) -> Optional[list]:
    """Gather parameters a shard's worth at a time; rank 0 writes each shard before the next."""
    writer = ShardWriter(out_dir, max_bytes) if is_main else None
    batch, batch_bytes = [], 0
    named = list(model.named_parameters())  # tied weights appear once, as transformers expects

    def write_batch():
        with _gathered(p for _, p in batch):
            if writer is not None:
                for name, param in batch:
                    writer.add(name, param.data)
        if writer is not None:
            writer.flush()  # this shard's tensors leave memory before the next gather

    for name, param in named:
        numel = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
        size = numel * param.element_size()
        if batch and batch_bytes + size > max_bytes:
            write_batch()
            batch, batch_bytes = [], 0
        batch.append((name, param))
        batch_bytes += size
    if batch:
        write_batch()
    persistent = set(model.state_dict().keys())
    if writer is not None:
        for name, buffer in model.named_buffers():
            if name in persistent:
                writer.add(name, buffer)
        return writer.close()
    return None


def adapter_state_dict(peft_model, trainable: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The tensors peft would save, computed from full (gathered) copies of the trainable params."""
    from peft import get_peft_model_state_dict

    config = peft_model.active_peft_config
    if config.is_prompt_learning:
        # The saved prompt embedding is the encoder's output for tokens 0..n-1; without a projection
        # (the prefix tuning default) that is simply the first n rows of its embedding table.
        if getattr(config, "prefix_projection", False):
            raise NotImplementedError("prefix tuning with prefix_projection=true cannot be exported live")
        weight = next(t for n, t in trainable.items() if n.endswith("embedding.weight"))
        return {"prompt_embeddings": weight[:config.num_virtual_tokens].clone()}
    return get_peft_model_state_dict(peft_model, state_dict=trainable)


def write_adapter(peft_model, state: Dict[str, torch.Tensor], out_dir: Path, base_path: str) -> Path:
    from safetensors.torch import save_file

    config = copy.deepcopy(peft_model.active_peft_config)
    config.inference_mode = True
    config.base_model_name_or_path = base_path
    config.save_pretrained(str(out_dir))
    path = Path(out_dir) / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)
    return path


def export_adapter_live(peft_model, out_dir: Path, is_main: bool, base_path: str) -> Optional[Path]:
    trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
    with _gathered(p for _, p in trainable):
        copies = {n: p.data.detach().to("cpu").clone() for n, p in trainable} if is_main else {}
    if not is_main:
        return None
    empty = [n for n, t in copies.items() if t.numel() == 0]
    if empty:  # the bug this module exists to prevent: never write an empty adapter
        raise RuntimeError(f"adapter parameters still partitioned after gathering: {empty[:3]}")
    return write_adapter(peft_model, adapter_state_dict(peft_model, copies), out_dir, base_path)


@torch.no_grad()
def probe_logits(ctx, length: int = 48) -> Tuple[torch.Tensor, torch.Tensor]:
    """The trainer's logits on a fixed input (the start of the first train sample), all ranks."""
    ids = torch.tensor([ctx.train_set[0]["input_ids"][:length]], device=ctx.info.device)
    ctx.engine.eval()
    logits = ctx.engine(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
    ctx.engine.train()
    return ids.cpu(), logits.float().cpu()


def export_final(ctx) -> None:
    """The end-of-run export to `<run.dir>/export` (checkpoint.export_final); every rank calls it."""
    from trainer.distributed import barrier
    from trainer.model import model_dir

    cfg, info = ctx.cfg, ctx.info
    started = time.perf_counter()
    out = RunDir(ctx.run_dir).export
    if info.is_main:
        _fresh_dir(out)
    barrier()
    model = ctx.engine.module
    dtype = next(model.parameters()).dtype
    if cfg.peft.method == "none":
        stream_full_model(model, out, info.is_main)
        base_config, generation = model.config, model.generation_config
    else:
        base = model.get_base_model()
        base_config, generation = base.config, base.generation_config
        from trainer.pretrained import base_model_reference

        base_path = base_model_reference(cfg.model.name_or_path, model_dir(cfg.model))
        if cfg.model.name_or_path.startswith("builtin:"):  # random base weights: ship them
            base_path = str(out / "base")
            # get_base_model() still holds the adapter layers; write the base's own tensors only.
            stream_base_weights(model, out / "base", info.is_main)
            if info.is_main:
                write_model_files(base_config, generation, ctx.tokenizer, out / "base", dtype)
        export_adapter_live(model, out, info.is_main, base_path)
    ids, logits = probe_logits(ctx)
    if info.is_main:
        if cfg.peft.method == "none":
            write_model_files(base_config, generation, ctx.tokenizer, out, dtype)
        else:
            ctx.tokenizer.save_pretrained(out)  # so the adapter folder alone can chat
        torch.save({"input_ids": ids, "logits": logits}, RunDir(ctx.run_dir).export_probe)
        size = sum(f.stat().st_size for f in out.rglob("*.safetensors") if "base" not in f.parts)
        ctx.log(f"exported {'model' if cfg.peft.method == 'none' else 'adapter'} to {out} "
                f"({size / 1e6:.2f} MB of weights) in {time.perf_counter() - started:.1f}s")
        problem = vllm_problem(cfg.peft)
        if problem:
            ctx.log(f"warning: vLLM cannot serve this adapter: {problem}; `shardtune export {ctx.run_dir} --merge "
                    "--out DIR` writes a plain model every server loads")
        RunDir(ctx.run_dir).export_record.write_text(json.dumps(
            {"dir": str(out), "method": cfg.peft.method, "weights_bytes": size,
             "seconds": round(time.perf_counter() - started, 2)}) + "\n")
    barrier()


def base_weight_names(peft_model) -> Iterable[Tuple[str, str, torch.nn.Parameter]]:
    """(peft name, plain HF name, param) for the base model's own weights under a peft wrapper."""
    prefix = "base_model.model."
    for name, param in peft_model.named_parameters():
        if param.requires_grad or any(marker in name for marker in adapter_weight_markers()):
            continue
        plain = name[len(prefix):] if name.startswith(prefix) else name
        yield name, plain.replace(".base_layer.", ".").replace(".original_module.", "."), param


def stream_base_weights(peft_model, out_dir: Path, is_main: bool, max_bytes: int = DEFAULT_SHARD_BYTES) -> None:
    writer = ShardWriter(out_dir, max_bytes) if is_main else None
    for _, plain, param in base_weight_names(peft_model):
        with _gathered([param]):
            if writer is not None:
                writer.add(plain, param.data)
    if writer is not None:
        writer.close()
