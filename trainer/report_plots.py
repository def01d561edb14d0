"""PNG plots of a run, drawn with matplotlib's Agg backend (no display needed).

Each plot is drawn only when its metric was logged; `draw_plots` returns what it wrote, and what
it skipped and why, so the report can say "memory: not logged" instead of showing an empty axis.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Tuple

import matplotlib

matplotlib.use("Agg")  # before pyplot: a report is written on headless nodes too
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from trainer.report import RunData  # noqa: E402

COLORS = {"train": "#1f77b4", "eval": "#d62728", "general": "#2ca02c"}


def _points(records: List[Dict[str, Any]], x: str, y: str) -> Tuple[List[float], List[float]]:
    pairs = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def tokens_at_steps(run: RunData) -> Dict[int, int]:
    """Trained tokens seen after each logged step (step 0: none), to place evals on a token axis."""
    table = {0: 0}
    table.update({r["step"]: r["tokens"] for r in run.train if r.get("tokens") is not None})
    return table


def _figure(title: str, xlabel: str, ylabel: str):
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and tokens are whole numbers
    return fig, ax


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _loss_plot(run: RunData, path: Path, axis: str) -> bool:
    """Train loss as a line, eval and general loss as marked lines, against steps or tokens."""
    tokens = tokens_at_steps(run)
    evals = [dict(r, tokens=tokens.get(r["step"])) for r in run.evals]
    x_key = "step" if axis == "steps" else "tokens"
    series = [("train loss", *_points(run.train, x_key, "loss"), COLORS["train"], None),
              ("eval loss", *_points(evals, x_key, "eval_loss"), COLORS["eval"], "o"),
              ("general loss (retention)", *_points(evals, x_key, "general_loss"), COLORS["general"], "s")]
    if not any(xs for _, xs, _, _, _ in series):
        return False
    fig, ax = _figure(f"Loss vs {axis}", "step" if axis == "steps" else "trained tokens", "loss (nats/token)")
    for label, xs, ys, color, marker in series:
        if xs:
            ax.plot(xs, ys, label=label, color=color, marker=marker, markersize=4, linewidth=1.5)
    ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _line_plot(run: RunData, path: Path, keys: List[str], title: str, ylabel: str) -> bool:
    lines = [(key, *_points(run.train, "step", key)) for key in keys]
    lines = [line for line in lines if line[1]]
    if not lines:
        return False
    fig, ax = _figure(title, "step", ylabel)
    for key, xs, ys in lines:
        ax.plot(xs, ys, label=key, linewidth=1.5)
    if len(lines) > 1:
        ax.legend(fontsize=8)
    _save(fig, path)
    return True


def _benchmark_plot(run: RunData, path: Path) -> bool:
    """`shardtune eval`: tuned - baseline on each task's primary metric, with its paired interval."""
    rows = [r for r in (run.benchmarks or {}).get("rows", []) if r.get("primary")]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 0.6 + 0.5 * len(rows)), dpi=100)
    for y, row in enumerate(rows):
        good = row["verdict"] == "better"
        color = COLORS["general"] if good else COLORS["eval"] if row["verdict"] == "worse" else "#555555"
        ax.errorbar(row["diff"], y, xerr=[[row["diff"] - row["ci_low"]], [row["ci_high"] - row["diff"]]],
                    fmt="o", color=color, capsize=4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_yticks(range(len(rows)), [f"{r['task']} ({r['metric']}{'' if r['higher_is_better'] else ', lower is better'})"
                                     for r in rows], fontsize=8)
    level = round(100 * run.benchmarks["settings"]["confidence"])
    ax.set_title(f"tuned - baseline, {level}% paired bootstrap interval", fontsize=11)
    ax.grid(True, axis="x", alpha=0.3)
    _save(fig, path)
    return True


def memory_keys(run: RunData) -> List[str]:
    return sorted({k for r in run.train for k, v in r.items() if k.startswith("mem_") and isinstance(v, (int, float))})


def draw_plots(run: RunData, out_dir: Path) -> Tuple[List[Tuple[str, Path]], List[str]]:
    """Write the PNGs into `out_dir`; returns ([(title, path)], [what was not plotted, and why])."""
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = [
        ("Loss vs steps", "loss_vs_steps.png", lambda p: _loss_plot(run, p, "steps")),
        ("Loss vs tokens", "loss_vs_tokens.png", lambda p: _loss_plot(run, p, "tokens")),
        ("Learning rate", "lr.png", lambda p: _line_plot(run, p, ["lr"], "Learning rate", "lr")),
        ("Throughput", "tokens_per_s.png",
         lambda p: _line_plot(run, p, ["tokens_per_s"], "Throughput (all ranks)", "trained tokens / s")),
        ("Gradient norm", "grad_norm.png", lambda p: _line_plot(run, p, ["grad_norm"], "Gradient norm", "norm")),
        ("Memory", "memory.png", lambda p: _line_plot(run, p, memory_keys(run), "Memory", "as logged (mem_*)")),
    ]
    if any("rewards/margin" in r for r in run.train):  # a preference run (objective=dpo|simpo|kto)
        plots.append(("Preference rewards", "rewards.png", lambda p: _line_plot(
            run, p, ["rewards/accuracy", "rewards/margin"], "Preference rewards (train)", "accuracy / margin")))
    if run.benchmarks:
        plots.append(("Benchmarks (shardtune eval)", "benchmarks.png", lambda p: _benchmark_plot(run, p)))
    written, skipped = [], []
    for title, name, draw in plots:
        path = out_dir / name
        if draw(path):
            written.append((title, path))
        else:
            path.unlink(missing_ok=True)  # a stale plot from an earlier report must not linger
            skipped.append(f"{title}: not logged")
    return written, skipped
