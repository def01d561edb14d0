"""Sweeps: what each trial records, and `shardtune sweep summary SWEEP_DIR`.

Every trial of `shardtune train -m ...` writes `<trial dir>/trial.json` (overrides, exit code,
status, wall time, the metric the sweep optimises). The summary reads those and each trial's
metrics.jsonl and writes, into the sweep directory:

    summary.md    the table, ranked by the metric, best trial marked
    summary.csv   the same, one row per trial
    summary.png   the metric against each swept parameter
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

from trainer.control import EXIT_RESUME_ME, recorded_exit
from trainer.run_dir import RunDir

TRIAL_FILE = "trial.json"


def read_metrics(run_dir: Path) -> List[dict]:
    return RunDir(run_dir).read_metrics()


def final_value(records: List[dict], key: str) -> Optional[float]:
    """The last finite value of `key` in metrics.jsonl (eval_loss, loss, general_loss, ...)."""
    for record in reversed(records):
        value = record.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            return float(value)
    return None


def record_trial(trial_dir: Path, cfg, code: int, overrides: List[str], wall_s: float) -> float:
    """Write trial.json for one trial of a sweep; return its metric (+inf when it has none)."""
    metric_name = cfg.run.sweep_metric if cfg is not None else "eval_loss"
    submitted = cfg is not None and cfg.cluster.backend == "slurm" and RunDir(trial_dir).slurm_job_id.exists()
    if submitted and code == 0:
        status = "submitted"
    else:
        status = "completed" if code == 0 else "failed"
    metric = final_value(read_metrics(trial_dir), metric_name) if status == "completed" else None
    trial = {"num": int(trial_dir.name.rsplit("-", 1)[-1]) if trial_dir.name[-1:].isdigit() else None,
             "code": code, "status": status, "overrides": overrides, "run_dir": str(trial_dir),
             "wall_s": round(wall_s, 2), "metric": metric_name, "value": metric}
    if submitted:
        trial["job_id"] = RunDir(trial_dir).slurm_job_id.read_text().strip()
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / TRIAL_FILE).write_text(json.dumps(trial) + "\n")
    return metric if metric is not None else math.inf


def current_status(trial: dict, run_dir: Path) -> str:
    """A Slurm trial's status is known only later, from the run's own exit record."""
    if trial["status"] != "submitted":
        return trial["status"]
    if not RunDir(run_dir).exit_record.exists():
        return "running" if RunDir(run_dir).metrics.exists() else "pending"
    code = recorded_exit(run_dir)  # None: cut short (a full disk), counted as failed
    return "completed" if code == 0 else "stopped" if code == EXIT_RESUME_ME else "failed"


def parse_overrides(overrides: List[str]) -> Dict[str, str]:
    """`key=value` overrides as Hydra recorded them (`builtin\\:x` unescaped) -> {key: value}."""
    params = {}
    for item in overrides:
        key, _, value = item.partition("=")
        params[key.lstrip("+~")] = re.sub(r"\\(.)", r"\1", value)
    return params


def trial_row(trial_dir: Path) -> dict:
    trial = json.loads((trial_dir / TRIAL_FILE).read_text())
    records = read_metrics(trial_dir)
    speeds = [r["tokens_per_s"] for r in records if r.get("kind") == "train" and r.get("tokens_per_s")]
    speeds = speeds[1:] or speeds  # the first step pays for warm-up
    return {"trial": trial_dir.name, "params": parse_overrides(trial["overrides"]),
            "status": current_status(trial, trial_dir), "train_loss": final_value(records, "loss"),
            "eval_loss": final_value(records, "eval_loss"),
            "tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
            "wall_s": trial.get("wall_s"), "job_id": trial.get("job_id", "")}


def swept_keys(rows: List[dict]) -> List[str]:
    """Parameters whose value differs between trials (all given ones, for a single trial)."""
    keys = sorted({k for row in rows for k in row["params"]})
    if len(rows) < 2:
        return keys
    return [k for k in keys if len({row["params"].get(k) for row in rows}) > 1]


def rank(rows: List[dict], metric: str) -> None:
    """Sort in place: completed trials by the metric (lowest first), then the rest; mark the best."""
    def key(row):
        value = row.get(metric)
        return (row["status"] != "completed" or value is None, value if value is not None else 0, row["trial"])

    rows.sort(key=key)
    for position, row in enumerate(rows, start=1):
        scored = row["status"] == "completed" and row.get(metric) is not None
        row["rank"] = position if scored else None
        row["best"] = scored and position == 1


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _fmt_rounded(value) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(rows: List[dict], keys: List[str]) -> List[List[str]]:
    header = ["rank", "trial", *keys, "status", "train_loss", "eval_loss", "tokens_per_s", "wall_s", "job_id"]
    lines = [header]
    for row in rows:
        rank_text = ("* " if row["best"] else "") + _fmt(row["rank"])
        lines.append([rank_text, row["trial"], *[row["params"].get(k, "") for k in keys], row["status"],
                      _fmt(row["train_loss"]), _fmt(row["eval_loss"]), _fmt_rounded(row["tokens_per_s"]),
                      _fmt_rounded(row["wall_s"]), row["job_id"]])
    return lines


def markdown(lines: List[List[str]], sweep_dir: Path, metric: str) -> str:
    out = [f"# Sweep {sweep_dir.name}: ranked by final {metric} (lower is better; * marks the best)", "",
           "| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(lines[0])]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out) + "\n"


def plot(rows: List[dict], keys: List[str], metric: str, path: Path) -> Optional[Path]:
    """One panel per swept parameter: the metric of each completed trial against its value."""
    scored = [r for r in rows if r["status"] == "completed" and r.get(metric) is not None]
    if not keys or not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        values = [r["params"].get(key, "") for r in scored]
        try:
            xs = [float(v) for v in values]
            if min(xs) > 0 and max(xs) / min(xs) >= 10:
                ax.set_xscale("log")
        except ValueError:  # categorical values: one position each
            labels = sorted(set(values))
            xs = [labels.index(v) for v in values]
            ax.set_xticks(range(len(labels)), labels, rotation=20)
        ax.scatter(xs, [r[metric] for r in scored], c=["tab:red" if r["best"] else "tab:blue" for r in scored])
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    fig.suptitle(f"final {metric} per trial (red: best)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summarize(sweep_dir: Path, metric: str = "eval_loss") -> dict:
    """Write summary.md/.csv/.png into the sweep directory; returns the rows and the paths."""
    trial_dirs = sorted((p.parent for p in sweep_dir.glob(f"*/{TRIAL_FILE}")),
                        key=lambda p: (len(p.name), p.name))
    if not trial_dirs:
        raise SystemExit(f"{sweep_dir}: no trials found (no */{TRIAL_FILE}); give the directory a "
                         "`shardtune train -m ...` sweep wrote (its path is printed at the start)")
    rows = [trial_row(d) for d in trial_dirs]
    if metric == "eval_loss" and all(r["eval_loss"] is None for r in rows):
        metric = "train_loss"  # runs without eval data: rank by the final train loss
    rank(rows, metric)
    keys = swept_keys(rows)
    lines = table(rows, keys)
    md = markdown(lines, sweep_dir, metric)
    (sweep_dir / "summary.md").write_text(md)
    with open(sweep_dir / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(lines[0] + ["best"])
        for row, line in zip(rows, lines[1:]):
            writer.writerow([_fmt(row["rank"]), *line[1:], int(row["best"])])
    png = plot(rows, keys, metric, sweep_dir / "summary.png")
    return {"rows": rows, "metric": metric, "markdown": md, "csv": sweep_dir / "summary.csv", "png": png}


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardtune sweep", description="Rank the trials of a sweep.")
    sub = parser.add_subparsers(dest="action", required=True)
    summary = sub.add_parser("summary", help="table (markdown + CSV) and plot of a sweep's trials")
    summary.add_argument("sweep_dir", type=Path, help="the sweep directory (e.g. sweeps/20261123-101500)")
    summary.add_argument("--metric", default="eval_loss", choices=("eval_loss", "train_loss"),
                         help="what ranks the trials (default: eval_loss, train_loss when there is no eval)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        print(f"shardtune sweep summary: {args.sweep_dir} is not a directory", file=sys.stderr)
        return 2
    result = summarize(args.sweep_dir, args.metric)
    print(result["markdown"])
    print(f"wrote {args.sweep_dir / 'summary.md'}, {result['csv']}" + (f", {result['png']}" if result["png"] else ""))
    return 0
