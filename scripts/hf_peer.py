"""The HF Trainer side of `shardtune bench --vs hf`: the same run, trained by transformers' Trainer.

    deepspeed --num_gpus W scripts/hf_peer.py --run-dir OURS --out HF_DIR --steps N

Reads OURS/config.yaml and OURS/ds_config.json (the very file our engine gets) and trains the same
model (same random init), on the same samples in the same order (our global batch sampler's
order, fed sequentially: accelerate hands micro-batch k to rank k mod W, as our sampler does),
with the same peft method, sequence length, micro-batch, accumulation, precision, optimizer and
clipping.
Batches are padded to their longest sample with our collate function. Each rank writes
HF_DIR/timing/rank<R>.json in the schema of trainer/timing.py (no phase breakdown: HF Trainer
exposes none).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

if __package__ is None and (Path(__file__).resolve().parent.parent / "trainer").is_dir():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout's scripts/

import torch  # noqa: E402


def ordered_samples(cfg, train_set, world: int, steps: int):
    """Our sampler's global order for `steps` steps, flattened: rank r gets the same micro-batches."""
    from trainer.data.sampler import GlobalBatchSampler

    sampler = GlobalBatchSampler(len(train_set), cfg.train.micro_batch_size, cfg.train.grad_accum, world, 0,
                                 cfg.seed, cfg.data.shuffle)
    return [train_set[i] for step in range(steps) for i in sampler.global_indices(step)]


def make_trainer(cfg, ds_config: dict, out: Path, steps: int, timer):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from trainer.data import build_datasets
    from trainer.data.collate import collate
    from trainer.data.render import IGNORE
    from trainer.model import build_tokenizer, _create, resolve_dtype, weights_dir

    world = int(os.environ.get("WORLD_SIZE", "1"))
    on_gpu = torch.cuda.is_available()
    import deepspeed

    # Without a process group up front, TrainingArguments sees one process (use_cpu) and DeepSpeed's
    # batch check fails; gloo on CPU as in our trainer.
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    precision = "bf16" if ds_config["bf16"]["enabled"] else "fp16" if ds_config["fp16"]["enabled"] else "fp32"
    source = weights_dir(cfg.model, cfg.seed)  # a builtin init is made whole, before zero.Init is on
    # TrainingArguments must exist before the model: it switches on zero.Init for ZeRO-3.
    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=cfg.train.micro_batch_size,
        gradient_accumulation_steps=cfg.train.grad_accum, learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, adam_beta1=cfg.optim.beta1, adam_beta2=cfg.optim.beta2,
        adam_epsilon=cfg.optim.eps, max_grad_norm=cfg.optim.grad_clip, warmup_steps=cfg.optim.warmup_steps,
        lr_scheduler_type="cosine" if cfg.optim.scheduler == "cosine" else cfg.optim.scheduler,
        deepspeed=ds_config, use_cpu=not on_gpu, bf16=precision == "bf16", fp16=precision == "fp16",
        train_sampling_strategy="sequential", dataloader_drop_last=True, remove_unused_columns=False,
        save_strategy="no", report_to=[], logging_steps=10 ** 9, disable_tqdm=True, seed=cfg.seed,
        gradient_checkpointing=cfg.model.activation_checkpointing != "none",
        gradient_checkpointing_kwargs={"use_reentrant": False})
    tokenizer = build_tokenizer(cfg.model)
    cfg.data.packing = False  # HF Trainer's usual setup: one document per row, padded per batch
    if cfg.model.attn_implementation == "flex_attention":
        # HF's flex path on padded batches of changing lengths failed in inductor on an H100
        # (NoValidChoicesError); sdpa is what HF Trainer users run by default.
        cfg.model.attn_implementation = "sdpa"
    train_set, _ = build_datasets(cfg.data, tokenizer)
    model = _create(cfg.model, source, resolve_dtype(cfg.model, on_gpu), cfg.seed, timer.device)
    model.config.use_cache = False
    if cfg.peft.method != "none":  # the same peft method and settings, through peft.get_peft_model
        from trainer.peft_methods import apply_peft

        model = apply_peft(model, cfg.peft, cfg.model.family, zero3=ds_config["zero_optimization"]["stage"] == 3)
    samples = ordered_samples(cfg, train_set, world, steps)
    pad_id = tokenizer.pad_token_id

    class CountingTrainer(Trainer):
        def training_step(self, model, inputs, *rest, **kwargs):
            mask = inputs["attention_mask"]
            timer.count(int((inputs["labels"][:, 1:] != IGNORE).sum()), mask.sum(dim=1).tolist())
            return super().training_step(model, inputs, *rest, **kwargs)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            timer.step_end(state.global_step)

    return CountingTrainer(model=model, args=args, train_dataset=samples, data_collator=lambda b: collate(b, pad_id),
                           callbacks=[StepClock()])


class StepTimer:
    """Wall time between optimizer-step ends, and the tokens each step trained on this rank."""

    def __init__(self, device):
        self.device, self.steps, self.last_end = device, [], time.perf_counter()
        self.trained = self.inputs = 0
        self.squares = 0.0

    def count(self, trained: int, rows) -> None:
        self.trained += trained
        self.inputs += int(sum(rows))
        self.squares += float(sum(r * r for r in rows))

    def step_end(self, step: int) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.steps.append({"step": step - 1, "seconds": now - self.last_end, "local_trained_tokens": self.trained,
                           "local_input_tokens": self.inputs, "local_square_lengths": self.squares, "phases": {}})
        self.trained = self.inputs = 0
        self.squares = 0.0
        self.last_end = now


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="our run directory (config.yaml, ds_config.json)")
    parser.add_argument("--out", required=True, help="where timing/rank<R>.json is written")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # passed by the deepspeed launcher
    args = parser.parse_args()
    from trainer.config import load_run_config
    from trainer.run_dir import RunDir
    from trainer.timing import PhaseTimer

    cfg = load_run_config(args.run_dir)
    ds_config = RunDir(args.run_dir).read_ds_config()
    out = Path(args.out)
    device = torch.device("cuda", args.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    timer = StepTimer(device)
    trainer = make_trainer(cfg, ds_config, out, args.steps, timer)
    timer.last_end = time.perf_counter()
    trainer.train()
    recorder = PhaseTimer(device)  # for its memory facts and file layout
    recorder.steps = timer.steps
    recorder.write(out, int(os.environ.get("RANK", "0")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
