"""Write the report of a run, or of a sweep (one line per trial, each linking its own report).

    RUN_DIR/report.html          self-contained page (PNG plots inlined as base64)
    RUN_DIR/report.md            the same in markdown, linking the PNGs
    RUN_DIR/report/*.png         the plots
    RUN_DIR/report/summary.json  the figures shown, machine-readable

    SWEEP_DIR/report.html, report.md   a table of trials; each trial-*/ gets its own report
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path
from typing import Any, Dict, List

from trainer.report import load_run, summarize
from trainer.report_plots import draw_plots
from trainer.report_render import CSS, num, pct, render_html, render_markdown
from trainer.run_dir import RunDir


def write_run_report(run_dir: Path) -> Dict[str, Any]:
    """Write the report files of one run directory; returns its summary."""
    run_dir = Path(run_dir)
    run = load_run(run_dir)
    paths = RunDir(run_dir)
    plots, skipped = draw_plots(run, paths.report)
    summary = summarize(run)
    summary["plots"] = [str(path.relative_to(run_dir)) for _, path in plots]
    (paths.report / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    paths.report_html.write_text(render_html(run, summary, plots, skipped), encoding="utf-8")
    paths.report_md.write_text(render_markdown(run, summary, plots, skipped), encoding="utf-8")
    return summary


def trial_dirs(folder: Path) -> List[Path]:
    """Sub-folders of a sweep that are trials (they hold trial.json or config.yaml), in trial order."""
    found = [d for d in Path(folder).iterdir() if d.is_dir() and ((d / "trial.json").is_file()
                                                                   or RunDir(d).is_run())]
    return sorted(found, key=lambda d: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", d.name)])


def is_sweep(folder: Path) -> bool:
    return not RunDir(folder).is_run() and bool(trial_dirs(folder))


def _trial_row(trial: Path) -> Dict[str, Any]:
    info = json.loads((trial / "trial.json").read_text()) if (trial / "trial.json").is_file() else {}
    row: Dict[str, Any] = {"trial": trial.name, "overrides": info.get("overrides", []), "summary": None}
    if RunDir(trial).is_run():  # a trial rejected by validation has no run to report
        row["summary"] = write_run_report(trial)
    state = row["summary"]["status"]["state"] if row["summary"] else info.get("status", "failed")
    if row["summary"] is None and info.get("code") == 2:
        state = "config error (see the sweep's console output)"
    row["state"] = state if state != "unknown" else info.get("status", state)
    return row


def _trial_cells(row: Dict[str, Any]) -> List[str]:
    s = row["summary"]
    if s is None:
        return [row["trial"], row["state"], " ".join(row["overrides"]), "—", "—", "—", "—", "—"]
    task, retention = s["task"], s["retention"]
    flag = " (flagged)" if retention["flagged"] else ""
    return [row["trial"], row["state"], " ".join(row["overrides"]), f"{s['train']['steps_done']}",
            num(s["train"]["last_loss"]), f"{num(task['before'])} -> {num(task['after'])}", pct(task["change_pct"]),
            pct(retention["change_pct"]) + flag]


HEADER = ["trial", "status", "overrides", "steps", "last train loss", "eval loss before -> after", "task change",
          "general change"]


def write_sweep_report(sweep_dir: Path) -> List[Dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    rows = [_trial_row(trial) for trial in trial_dirs(sweep_dir)]
    md = [f"# Sweep {sweep_dir.name}: {len(rows)} trials", "", "| " + " | ".join(HEADER) + " | report |",
          "|" + "---|" * (len(HEADER) + 1)]
    body = []
    for row in rows:
        cells = _trial_cells(row)
        link = f"{row['trial']}/report.html" if row["summary"] else None
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + f" | {f'[report]({link})' if link else '—'} |")
        link_html = f"<a href='{html.escape(link)}'>report</a>" if link else "—"
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + f"<td>{link_html}</td></tr>")
    (sweep_dir / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    head = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in HEADER + ["report"]) + "</tr>"
    (sweep_dir / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>sweep {html.escape(sweep_dir.name)}</title>"
        f"<style>{CSS}</style></head><body><h1>Sweep {html.escape(sweep_dir.name)}</h1>"
        f"<div class='sub'>{html.escape(str(sweep_dir))} &middot; {len(rows)} trials</div>"
        f"<table>{head}{''.join(body)}</table></body></html>", encoding="utf-8")
    return rows
