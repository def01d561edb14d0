"""Ask a model questions with greedy decoding, using only transformers and peft (no shardtune code).

    python scripts/ask.py --base BASE_DIR [--adapter ADAPTER_DIR] "question" ["question" ...]

Prints one JSON object: {"answers": {question: answer}, "seconds": ...}. The demo and the
real-model test use it to show what a fine-tuned adapter changed, loading it the way any user
would: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), ADAPTER)`.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def load(base: str, adapter: str | None):
    tokenizer = AutoTokenizer.from_pretrained(adapter or base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    return tokenizer, model.eval()


@torch.no_grad()
def answer(tokenizer, model, question: str, max_new_tokens: int = 24) -> str:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, use_cache=True, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("questions", nargs="+")
    args = parser.parse_args()
    started = time.perf_counter()
    tokenizer, model = load(args.base, args.adapter)
    answers = {q: answer(tokenizer, model, q, args.max_new_tokens) for q in args.questions}
    print(json.dumps({"answers": answers, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
