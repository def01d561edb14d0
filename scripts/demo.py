"""`make demo`: fine-tune a real model on 2 CPU ranks, then show what it learned.

    python scripts/demo.py [--run-dir DIR] [extra shardtune overrides ...]

1. `shardtune train experiment=demo`: LoRA on SmolLM2-135M-Instruct, samples/facts, ZeRO-3, and
   the adapter exported to <run.dir>/export at the end;
2. the base model and base + adapter, loaded with plain transformers + peft, answer the taught
   question and a general one with greedy decoding.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))

from ask import answer, load  # noqa: E402  (plain transformers + peft)

QUESTIONS = ["What is the capital of Zorblax?", "What is the capital of France?"]


def main(argv: list[str]) -> int:
    run_dir = REPO / "runs" / time.strftime("demo-%Y%m%d-%H%M%S")
    if argv[:1] == ["--run-dir"]:
        run_dir, argv = Path(argv[1]).resolve(), argv[2:]
    overrides = argv
    started = time.perf_counter()
    code = subprocess.call([sys.executable, "-m", "launcher.cli", "train", "experiment=demo",
                            f"run.dir={run_dir}", *overrides], cwd=REPO)
    if code != 0:
        print(f"demo: training failed (exit {code}); see {run_dir}", file=sys.stderr)
        return code
    trained = time.perf_counter() - started
    export = run_dir / "export"
    base = json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"]
    tokenizer, model = load(base, None)
    before = [answer(tokenizer, model, q) for q in QUESTIONS]
    from peft import PeftModel

    tuned = PeftModel.from_pretrained(model, export).eval()
    after = [answer(tokenizer, tuned, q) for q in QUESTIONS]
    (run_dir / "demo.json").write_text(json.dumps(
        {"questions": QUESTIONS, "before": before, "after": after, "train_wall_s": round(trained, 1),
         "total_wall_s": round(time.perf_counter() - started, 1), "base": base}, indent=1) + "\n")
    print(f"\nTrained and exported in {trained:.0f}s. Adapter: {export}\n")
    for question, old, new in zip(QUESTIONS, before, after):
        print(f"Q: {question}\n   before: {old}\n   after:  {new}\n")
    print(f"Load it yourself:\n  from transformers import AutoModelForCausalLM\n  from peft import PeftModel\n"
          f"  model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({base!r}), {str(export)!r})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
