"""Write a model folder of a published architecture's shape, without weights, for throughput work.

    python scripts/make_random_model.py llama-1b /tmp/models/llama-1b
    shardtune bench model=local model.name_or_path=/tmp/models/llama-1b model.random_init=true ...

The folder holds the architecture's config.json and the tokenizer of builtin:small-llama (2,048
tokens: every id it makes is valid for the larger vocabulary, and the head still computes all
vocabulary logits, so the FLOPs are the real model's). Train it with model.random_init=true.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer.model import BUILTIN_DIR  # noqa: E402

BUILTIN_TOKENIZER = BUILTIN_DIR / "small-llama"

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
          "rms_norm_eps": 1e-05, "initializer_range": 0.02, "vocab_size": 128256, "rope_theta": 500000.0,
          "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": 3, "use_cache": False, "max_position_embeddings": 8192}
# Shapes of Llama 3.2 1B and Llama 3.1 8B (the rope scaling of the long-context releases left out).
SHAPES = {
    "llama-1b": {**_LLAMA, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "tie_word_embeddings": True},
    "llama-8b": {**_LLAMA, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False},
}


def write(shape: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(SHAPES[shape], indent=2) + "\n")
    for item in BUILTIN_TOKENIZER.iterdir():
        if item.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy2(item, out / item.name)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    print(f"written: {write(args.shape, args.out)} ({args.shape}; train it with model.random_init=true)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
