"""Evaluation during training: what the loop calls at step 0 (the baseline), every
`eval.every_steps`, and at the end.

One call measures, on the same weights:
  - the task: exact token-averaged loss and perplexity on the eval split;
  - retention: the same on `eval.general_files` (text the model should not forget);
  - behaviour: greedy generations for the configured prompts.

Losses go to metrics.jsonl as one `"kind": "eval"` line; generations to generations.jsonl and a
W&B table (`sinks.log_table`). Every rank must call the evaluator: under ZeRO-3 each forward
pass gathers parameters collectively, so all ranks run the same passes and rank 0 writes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from trainer.config import RootConfig
from trainer.data.dataset import TokenizedDataset, load_files
from trainer.speed import eager_when_compiled


def load_prompts(cfg: RootConfig) -> List[str]:
    """`eval.prompts` followed by the non-blank lines of `eval.prompts_file`."""
    prompts = [p for p in cfg.eval.prompts if p.strip()]
    if cfg.eval.prompts_file:
        path = Path(os.path.expanduser(cfg.eval.prompts_file))
        if not path.is_file():
            raise FileNotFoundError(f"eval.prompts_file={cfg.eval.prompts_file!r}: no such file")
        prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return prompts


def _first_record(patterns: List[str]) -> Optional[dict]:
    """The first JSON line of the first train file, if it is JSON Lines; None when unknown."""
    from trainer.data.dataset import expand_files

    try:
        first = expand_files(patterns[:1])[0]
        if not first.endswith((".jsonl", ".json")):
            return None
        with open(first, encoding="utf-8") as handle:
            for line in handle:
                if line.strip():
                    return json.loads(line)
    except (OSError, ValueError, IndexError):
        return None
    return None


def resolve_prompt_style(cfg: RootConfig, tokenizer) -> str:
    """`chat` wraps each prompt as a user turn in the chat template; `text` feeds it as is.

    A model fine-tuned on raw text (domain adaptation) is asked to continue text; one tuned on
    conversations is asked as a user would ask it.
    """
    if cfg.eval.prompt_style != "auto":
        return cfg.eval.prompt_style
    if not getattr(tokenizer, "chat_template", None) or cfg.data.format == "text":
        return "text"
    if cfg.data.format != "auto":
        return "chat"
    record = _first_record(list(cfg.data.train_files))
    text_key = cfg.data.fields.get("text", "text")
    messages_key = cfg.data.fields.get("messages", "messages")
    if isinstance(record, dict) and text_key in record and messages_key not in record:
        return "text"
    return "chat"


def encode_prompt(tokenizer, prompt: str, style: str) -> List[int]:
    if style == "chat":
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                               add_generation_prompt=True)
    return tokenizer(prompt, add_special_tokens=False)["input_ids"]


class AlivePerToken(StoppingCriteria):
    """Never stops a generation: it tells the heartbeat at every generated token that this rank is
    alive. Under ZeRO-3 every token gathers the whole model, so a large model's (or a loaded node's)
    generation outlasts the watchdog's silence limit while nothing is stuck; a rank that truly stops
    generating still goes silent. A touch is a note in memory (trainer/control.py Heartbeat)."""

    def __init__(self, heartbeat, delay_s: float = 0.0):
        self.heartbeat, self.delay_s = heartbeat, delay_s  # delay_s: train.fault_injection.token_delay_s

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.heartbeat.touch()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(ctx, prompts: List[str], style: str) -> List[str]:
    """Greedy completions, one prompt at a time (no padding to get wrong), decoded on rank 0.

    Under ZeRO-3 with several ranks `synced_gpus=True` keeps every rank stepping until all are
    done: a rank that stopped early would leave the others waiting in a parameter all-gather.
    """
    model, tokenizer, info = ctx.engine.module, ctx.tokenizer, ctx.info
    synced = info.world_size > 1 and ctx.cfg.deepspeed.stage == 3
    model.eval()
    completions = []
    alive = StoppingCriteriaList([AlivePerToken(ctx.heartbeat, ctx.faults.token_delay_s())])
    for prompt in prompts:
        input_ids = torch.tensor([encode_prompt(tokenizer, prompt, style)], device=info.device)
        with eager_when_compiled(ctx.cfg.model.compile):
            output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                    max_new_tokens=ctx.cfg.eval.max_new_tokens, do_sample=False,
                                    # use_cache: training turns the config's cache off, but generation
                                    # wants it (and peft prefix tuning fails without it)
                                    synced_gpus=synced, use_cache=True, pad_token_id=tokenizer.pad_token_id,
                                    eos_token_id=tokenizer.eos_token_id, stopping_criteria=alive)
        new_tokens = output[0, input_ids.shape[1]:]
        # Kept verbatim (whitespace too): an untrained model often emits only newlines, and the
        # report should show that rather than an empty cell.
        completions.append(tokenizer.decode(new_tokens, skip_special_tokens=True) if info.is_main else "")
        ctx.heartbeat.touch()  # many prompts on a large model are not a hang
    model.train()
    return completions


class Evaluator:
    """Called by the loop as `evaluator(ctx, step)` on every rank."""

    def __init__(self, general_set: Optional[TokenizedDataset], prompts: List[str], prompt_style: str):
        self.general_set = general_set
        self.prompts = prompts
        self.prompt_style = prompt_style

    def __call__(self, ctx, step: int) -> None:
        from trainer.loop import evaluate_loss
        from trainer.objectives import SFT

        started = time.perf_counter()
        record: Dict[str, Any] = {"kind": "eval", "step": step}
        if ctx.eval_set is not None and len(ctx.eval_set):
            ctx.heartbeat.beat(step, "eval")
            result = evaluate_loss(ctx, ctx.eval_set)
            record.update(eval_loss=result["loss"], eval_ppl=result["ppl"], eval_tokens=result["tokens"])
            record.update({f"eval_{k}": v for k, v in result["metrics"].items()})  # rewards/... of preference runs
        if self.general_set is not None and len(self.general_set):
            ctx.heartbeat.beat(step, "eval_general")
            result = evaluate_loss(ctx, self.general_set, SFT(ctx.cfg.model.loss_chunks))  # text, whatever the objective
            record.update(general_loss=result["loss"], general_ppl=result["ppl"], general_tokens=result["tokens"])
        if self.prompts:
            ctx.heartbeat.beat(step, "generate")
            completions = generate(ctx, self.prompts, self.prompt_style)
            rows = [{"prompt": p, "generation": c} for p, c in zip(self.prompts, completions)]
            ctx.sinks.log_table("generations", step, rows)
            record.update(generations=len(rows))  # so a prompts-only evaluation is timed too
        if len(record) > 2:
            record.update(eval_time_s=time.perf_counter() - started, time=time.time())
            ctx.sinks.log(record)


def build_evaluator(cfg: RootConfig, tokenizer, log=print) -> Evaluator:
    """The evaluator for this run: the general eval set tokenized like the data, and the prompts."""
    from dataclasses import replace

    from trainer.data.preference import PREFERENCE_FORMATS

    # The general set is text or chat, read as SFT data even in a preference run.
    # It is small and shipped in any format: prepared into the cache even when the run streams.
    general_data = replace(cfg.data, streaming=False,
                           format="auto" if cfg.data.format in PREFERENCE_FORMATS else cfg.data.format)
    general = load_files(list(cfg.eval.general_files), tokenizer, general_data) if cfg.eval.general_files else None
    prompts = load_prompts(cfg)
    style = resolve_prompt_style(cfg, tokenizer)
    if general is not None or prompts:
        log(f"eval: {len(general) if general else 0} general samples, {len(prompts)} prompts ({style} style)")
    return Evaluator(general, prompts, style)
