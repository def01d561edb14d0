"""Read a run directory and answer "did the fine-tuning work?" in numbers.

Everything here is tolerant: a running run has a half-written last line, a failed one may lack
metrics or generations, an old one may lack the general eval set. Whatever is missing is listed
in `RunData.problems` and shown in the report; nothing raises for a missing file.

The numbers in the report are the raw values of metrics.jsonl (never recomputed), so the report
and the file always agree; `summarize` picks them, `trainer/report_render.py` formats them.
"""
from __future__ import annotations

import json
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from trainer.control import known_heartbeats
from trainer.run_dir import RunDir

EXIT_MEANINGS = {0: "finished", 75: "stopped (resumable: train again with the same run.dir)",
                 3: "aborted: too many non-finite steps", 1: "failed", 2: "config error"}


@dataclass
class RunData:
    run_dir: Path
    train: List[Dict[str, Any]] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    generations: Dict[int, Dict[str, str]] = field(default_factory=dict)  # step -> prompt -> text
    config: Dict[str, Any] = field(default_factory=dict)
    config_text: str = ""
    env: Dict[str, Any] = field(default_factory=dict)
    status: Dict[str, Any] = field(default_factory=dict)
    benchmarks: Optional[Dict[str, Any]] = None  # `shardtune eval`'s paired table (benchmarks/results.json)
    problems: List[str] = field(default_factory=list)


def _last_per_step(records: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One record per step, the last written: a resumed run may have logged a step twice."""
    by_step = {r["step"]: r for r in records if isinstance(r.get("step"), int)}
    return [by_step[s] for s in sorted(by_step)]


def read_generations(paths: RunDir, problems: List[str]) -> Dict[int, Dict[str, str]]:
    table: Dict[int, Dict[str, str]] = {}
    if not paths.generations.is_file():
        return table
    for row in paths.read_table("generations", problems):
        if "prompt" in row and "step" in row:
            table.setdefault(row["step"], {})[row["prompt"]] = row.get("generation", "")
    return dict(sorted(table.items()))


def read_status(run_dir: Path, config: Dict[str, Any]) -> Dict[str, Any]:
    """finished / stopped / failed from control/exit.json; without it, running or silent by heartbeats."""
    exit_file = RunDir(run_dir).exit_record
    if exit_file.is_file():
        try:
            info = json.loads(exit_file.read_text())
            code = int(info.get("code", 1))
            state = "finished" if code == 0 else "stopped" if code == 75 else "failed"
            return {"state": state, "code": code, "meaning": EXIT_MEANINGS.get(code, "failed"),
                    "detail": info.get("detail", "")}
        except (ValueError, TypeError):
            return {"state": "failed", "code": None, "meaning": "unreadable control/exit.json", "detail": ""}
    known = known_heartbeats(run_dir)  # this node's, the shared folder's and the node launchers' summaries
    beats, pids = [b["time"] for b in known], [b.get("pid") for b in known]
    timeout = (config.get("cluster") or {}).get("heartbeat_timeout_s", 120)
    if beats and _ranks_gone(run_dir, config, pids):
        return {"state": "unknown", "code": None, "meaning": "no exit status and no rank process left: the run "
                "was killed (out of memory? check `dmesg`) or its launcher died", "detail": ""}
    if beats and time.time() - max(beats) < timeout:
        return {"state": "running", "code": None, "meaning": "running", "detail": ""}
    if beats:
        ago = time.time() - max(beats)
        return {"state": "unknown", "code": None, "meaning": "no exit status and no heartbeat for "
                f"{ago:.0f}s: the run was killed or its launcher died", "detail": ""}
    return {"state": "unknown", "code": None, "meaning": "no exit status and no heartbeat: not started, "
            "or killed before its first step", "detail": ""}


def _ranks_gone(run_dir: Path, config: Dict[str, Any], pids: List[Any]) -> bool:
    """True when a single-node run written on this host has none of its rank processes alive."""
    try:
        env = json.loads(RunDir(run_dir).env.read_text())
    except (OSError, ValueError):
        return False
    single_node = (config.get("cluster") or {}).get("nnodes", 1) == 1
    if not single_node or env.get("host") != socket.gethostname() or not all(isinstance(p, int) for p in pids):
        return False  # another node's pids mean nothing here
    return not any(Path(f"/proc/{pid}").exists() for pid in pids)


def load_run(run_dir: Path) -> RunData:
    run_dir = Path(run_dir)
    run = RunData(run_dir=run_dir)
    paths = RunDir(run_dir)
    config_path = paths.config
    if config_path.is_file():
        import yaml

        run.config_text = config_path.read_text(encoding="utf-8")
        run.config = yaml.safe_load(run.config_text) or {}
    else:
        run.problems.append("config.yaml: missing (is this a shardtune run directory?)")
    records = paths.read_metrics(run.problems)
    run.train = _last_per_step([r for r in records if r.get("kind") == "train"])
    run.evals = _last_per_step([r for r in records if r.get("kind") == "eval"])
    run.generations = read_generations(paths, run.problems)
    if paths.env.is_file():
        run.env = json.loads(paths.env.read_text())
    run.status = read_status(run_dir, run.config)
    run.benchmarks = paths.read_json(paths.benchmark_results)
    return run


def _before_after(evals: List[Dict[str, Any]], key: str) -> Dict[str, Any]:
    """The step-0 value (the baseline) and the latest value of `key` among eval lines."""
    having = [r for r in evals if r.get(key) is not None]
    before = next((r for r in having if r["step"] == 0), None)
    after = having[-1] if having and having[-1]["step"] > 0 else None
    out = {"before": before[key] if before else None, "after": after[key] if after else None,
           "after_step": after["step"] if after else None, "change": None, "change_pct": None}
    if before and after:
        out["change"] = after[key] - before[key]
        out["change_pct"] = 100.0 * out["change"] / before[key] if before[key] else None
    return out


def _cfg(config: Dict[str, Any], dotted: str, default=None):
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def tracker_links(run_dir: Path) -> List[str]:
    """Where the run's metrics also are: the W&B run (its URL, or how to upload an offline run), the
    TensorBoard events and the MLflow store in the run directory, or the MLflow run on a server."""
    paths, links = RunDir(run_dir), []
    try:
        wandb = json.loads(paths.wandb_run.read_text())
    except (OSError, ValueError):
        wandb = {}
    if wandb.get("url"):
        links.append(f"W&B: {wandb['url']}")
    elif wandb.get("sync_command"):
        links.append(f"W&B (offline): {wandb['sync_command']}")
    if paths.tensorboard.is_dir():
        links.append(f"TensorBoard: tensorboard --logdir {paths.tensorboard}")
    if paths.mlflow_store.is_dir():
        links.append(f"MLflow: mlflow ui --backend-store-uri {paths.mlflow_store}")
    elif paths.mlflow_run_id.is_file():
        links.append(f"MLflow: run {paths.mlflow_run_id.read_text().strip()}")
    return links


def summarize(run: RunData) -> Dict[str, Any]:
    """The figures the report shows, taken verbatim from the run's files."""
    task = _before_after(run.evals, "eval_loss")
    task["ppl"] = _before_after(run.evals, "eval_ppl")
    retention = _before_after(run.evals, "general_loss")
    retention["ppl"] = _before_after(run.evals, "general_ppl")
    threshold = _cfg(run.config, "eval.retention_threshold", 0.05)
    retention["threshold"] = threshold
    retention["flagged"] = (retention["change"] is not None and retention["before"] > 0
                            and retention["change"] / retention["before"] > threshold)
    losses = [r["loss"] for r in run.train if r.get("loss") is not None]
    speeds = [r["tokens_per_s"] for r in run.train if r.get("tokens_per_s")]
    times = [r["time"] for r in run.train + run.evals if r.get("time")]
    started = run.env.get("time")
    train = {"steps_done": run.train[-1]["step"] if run.train else 0, "max_steps": _cfg(run.config, "train.max_steps"),
             "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
             "tokens": run.train[-1]["tokens"] if run.train else 0,
             "mean_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
             "skipped_steps": sum(1 for r in run.train if r.get("skipped"))}
    timing = {"started": started, "last_update": max(times) if times else None,
              "wall_s": max(times) - started if times and started else None,
              "train_s": sum(r.get("step_time_s") or 0.0 for r in run.train),
              "eval_s": sum(r.get("eval_time_s") or 0.0 for r in run.evals)}
    steps = sorted(run.generations)
    generations = {"before_step": steps[0] if steps and steps[0] == 0 else None,
                   "after_step": steps[-1] if steps and steps[-1] > 0 else None}
    # A preference run's held-out reward accuracy and margin, before (step 0) and after.
    preference = {key: _before_after(run.evals, f"eval_rewards/{key}") for key in ("accuracy", "margin")}
    return {"run_dir": str(run.run_dir), "status": run.status, "task": task, "retention": retention,
            "train": train, "timing": timing, "generations": generations,
            "baseline": any(r["step"] == 0 for r in run.evals), "problems": run.problems,
            "trackers": tracker_links(run.run_dir),
            "benchmarks": ({"tuned": run.benchmarks["tuned"], "baseline": run.benchmarks["baseline"],
                            "retention": run.benchmarks["retention"]} if run.benchmarks else None),
            "preference": preference if any(v["after"] is not None for v in preference.values()) else None}
