"""Train and export tiny random models of many architectures: does shardtune work beyond Llama?

    .venv/bin/python scripts/check_architectures.py [--types gpt2,mixtral] [--overrides "peft=lora deepspeed=zero2"]

For each transformers model type it writes a ~0.3 M-parameter random model (2 layers, the tokenizer
of builtin:tiny-llama) into --work, runs `shardtune train model=local ...` for 3 steps with a
checkpoint (2 CPU ranks by default), then `shardtune export --merge`, and prints one line per type
with both exit codes and the time. A failing type's log is kept in --work/logs. Not a test: about
25 s per type here.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENIZER = REPO / "trainer" / "builtin" / "tiny-llama"

_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=1024)
_HEAD16 = dict(_DECODER, head_dim=16)
# Keyword arguments of AutoConfig.for_model per type: names differ between architectures.
SHAPES = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=1024),
    "gpt_neox": dict(_DECODER, num_key_value_heads=None),
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                max_position_embeddings=1024, word_embed_proj_dim=64),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4),
    "phi": dict(_DECODER, num_key_value_heads=None),
    "phi3": _DECODER, "qwen2": _DECODER, "stablelm": _DECODER, "olmo2": _DECODER, "granite": _DECODER,
    "starcoder2": _DECODER,
    "mistral": dict(_DECODER, sliding_window=64),
    "qwen3": _HEAD16, "gemma": _HEAD16,
    "gemma2": dict(_HEAD16, sliding_window=64), "gemma3_text": dict(_HEAD16, sliding_window=64),
    "mixtral": dict(_DECODER, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(_HEAD16, moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2),
}


def write_model(model_type: str, folder: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = {k: v for k, v in SHAPES[model_type].items() if v is not None}
    config = AutoConfig.for_model(model_type, vocab_size=2048, bos_token_id=1, eos_token_id=2, pad_token_id=3,
                                  **shape)
    torch.manual_seed(0)
    shutil.rmtree(folder, ignore_errors=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for item in TOKENIZER.glob("*token*"):
        shutil.copy2(item, folder / item.name)


def shardtune(args, log: Path, timeout: int) -> int:
    with log.open("a") as out:
        try:
            return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            return 124


def check(model_type: str, work: Path, overrides) -> str:
    model, run_dir, log = work / "models" / model_type, work / "runs" / model_type, work / "logs" / f"{model_type}.log"
    started = time.time()
    write_model(model_type, model)
    shutil.rmtree(run_dir, ignore_errors=True)
    log.unlink(missing_ok=True)
    trained = shardtune(["train", "model=local", f"model.name_or_path={model}", f"run.dir={run_dir}",
                         "train.max_steps=3", "checkpoint.every_steps=3", *overrides], log, 600)
    exported = shardtune(["export", str(run_dir), "--merge", "--out", str(run_dir / "merged")], log, 300) \
        if trained == 0 else None
    status = "ok" if trained == 0 and exported == 0 else f"FAILED (see {log})"
    return f"| {model_type} | {trained} | {'-' if exported is None else exported} | {time.time() - started:.0f} s | {status} |"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--types", default=",".join(SHAPES), help="comma-separated model types (default: all)")
    parser.add_argument("--overrides", default="", help="shardtune overrides for every run, e.g. 'peft=lora'")
    parser.add_argument("--work", type=Path, default=Path("/tmp/shardtune-architectures"))
    args = parser.parse_args()
    types = [t for t in args.types.split(",") if t]
    unknown = [t for t in types if t not in SHAPES]
    if unknown:
        parser.error(f"unknown --types {unknown}; known: {', '.join(SHAPES)}")
    (args.work / "logs").mkdir(parents=True, exist_ok=True)
    print(f"overrides: {args.overrides or '(none)'}\n| type | train rc | export rc | time | |\n|---|---|---|---|---|",
          flush=True)
    failed = 0
    for model_type in types:
        line = check(model_type, args.work, shlex.split(args.overrides))
        failed += "FAILED" in line
        print(line, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
