"""Turn a run's summary and plots into report.html (self-contained: PNGs inlined) and report.md.

Numbers are printed with 4 decimals from the raw values of metrics.jsonl; the tests compare the
two. Generated text is escaped, and whitespace-only output is shown as such (an untrained model
often answers with nothing but newlines).
"""
from __future__ import annotations

import base64
import datetime
import html
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from trainer.report import RunData

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:24px;
color:#1d2330;background:#fafbfc}
h1{margin:0 0 4px;font-size:26px} h2{margin-top:32px;border-bottom:1px solid #dde1e6;padding-bottom:4px}
.sub{color:#5b6472;margin-bottom:16px;word-break:break-all}
.badge{display:inline-block;padding:2px 10px;border-radius:12px;font-weight:600;font-size:14px;color:#fff}
.finished{background:#2e7d32}.running{background:#1565c0}.stopped{background:#ef6c00}.failed,.unknown{background:#c62828}
.cards{display:flex;gap:16px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:14px 18px;flex:1;min-width:260px}
.card h3{margin:0 0 8px;font-size:15px;color:#5b6472}
.big{font-size:24px;font-weight:600}.good{color:#2e7d32}.bad{color:#c62828}.flag{color:#c62828;font-weight:600}
table{border-collapse:collapse;width:100%;background:#fff;font-size:14px}
th,td{border:1px solid #dde1e6;padding:6px 10px;text-align:left;vertical-align:top}
th{background:#f0f2f5} table.kv th{width:260px}
td.gen{white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px;width:38%}
.muted{color:#8a93a1;font-style:italic}
.plots{display:grid;grid-template-columns:repeat(2,1fr);gap:16px}
.plots figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:8px;padding:8px}
.plots img{width:100%;height:auto}
pre{background:#fff;border:1px solid #dde1e6;padding:12px;overflow:auto;font-size:12px}
.problems{background:#fff8e1;border:1px solid #ffe082;padding:8px 16px;border-radius:8px}
"""


def num(value: Optional[float], digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def pct(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:+.2f}%"


def when(epoch: Optional[float]) -> str:
    return "—" if not epoch else datetime.datetime.fromtimestamp(epoch).strftime("%Y-%m-%d %H:%M:%S")


def duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "—"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


def visible(text: Optional[str]) -> str:
    """Generated text as a reader should see it: empty or whitespace-only output is named."""
    if text is None:
        return "(not generated at this step)"
    if not text:
        return "(empty)"
    # Newlines shown as marks: a run of them would otherwise be a tall blank cell.
    shown = re.sub(r"\n+", lambda m: "⏎" if len(m.group()) == 1 else f"⏎×{len(m.group())} ", text).strip()
    return shown if text.strip() else f"(only whitespace) {shown or repr(text)}"


def _get(config: Dict[str, Any], dotted: str):
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _batch(config: Dict[str, Any], world_size: Optional[int]) -> str:
    micro, accum = _get(config, "train.micro_batch_size"), _get(config, "train.grad_accum")
    if not (micro and accum and world_size):
        return f"micro {micro} x accum {accum}"
    return f"{micro * accum * world_size} samples = micro {micro} x accum {accum} x {world_size} ranks"


def config_facts(run: RunData) -> List[Tuple[str, str]]:
    c, env = run.config, run.env
    peft = _get(c, "peft.method")
    if peft and peft != "none":
        peft = f"{peft} (r={_get(c, 'peft.r')}, alpha={_get(c, 'peft.alpha')})"
    versions = env.get("versions") or {}
    facts = [("model", _get(c, "model.name_or_path")), ("peft", peft), ("DeepSpeed ZeRO stage", _get(c, "deepspeed.stage")),
             ("world size", env.get("world_size")), ("device", env.get("device")),
             ("optimizer", f"{_get(c, 'optim.name')}, lr {_get(c, 'optim.lr')}, {_get(c, 'optim.scheduler')}"),
             ("batch", _batch(c, env.get("world_size"))),
             ("max steps", _get(c, "train.max_steps")), ("train files", _get(c, "data.train_files")),
             ("eval files", _get(c, "data.eval_files")), ("general eval files", _get(c, "eval.general_files")),
             ("seed", _get(c, "seed")), ("git revision", env.get("git_revision")),
             ("versions", ", ".join(f"{k} {v}" for k, v in versions.items() if v))]
    return [(k, ", ".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in facts if v not in (None, "", [])]


def timing_facts(summary: Dict[str, Any]) -> List[Tuple[str, str]]:
    t, tr = summary["timing"], summary["train"]
    return [("started", when(t["started"])), ("last update", when(t["last_update"])),
            ("wall time (launch to last metric)", duration(t["wall_s"])),
            ("time in train steps", duration(t["train_s"])), ("time in evaluation", duration(t["eval_s"])),
            ("steps", f"{tr['steps_done']} / {tr['max_steps']}"), ("trained tokens", f"{tr['tokens']:,}"),
            ("mean throughput", f"{num(tr['mean_tokens_per_s'], 1)} tokens/s"),
            ("skipped (non-finite) steps", str(tr["skipped_steps"]))]


def generation_rows(run: RunData, summary: Dict[str, Any]) -> List[Tuple[str, Optional[str], Optional[str]]]:
    before, after = summary["generations"]["before_step"], summary["generations"]["after_step"]
    prompts = list(dict.fromkeys(p for step in run.generations.values() for p in step))
    return [(p, run.generations.get(before, {}).get(p) if before is not None else None,
             run.generations.get(after, {}).get(p) if after is not None else None) for p in prompts]


def task_sentence(task: Dict[str, Any]) -> str:
    if task["before"] is None:
        return "no step-0 baseline in metrics.jsonl (not logged yet, eval.baseline=false, or no eval split)"
    if task["after"] is None:
        return "only the baseline so far: no evaluation after training yet"
    better = task["change"] < 0
    return (f"eval loss {num(task['before'])} -> {num(task['after'])} at step {task['after_step']} "
            f"({pct(task['change_pct'])}): {'improved' if better else 'did not improve'}")


def retention_sentence(retention: Dict[str, Any]) -> str:
    if retention["before"] is None:
        return "no general eval set (eval.general_files) measured at step 0"
    if retention["after"] is None:
        return "only the baseline so far"
    limit = f"{100 * retention['threshold']:.1f}%"
    verdict = f"WORSE beyond the {limit} threshold" if retention["flagged"] else f"within the {limit} threshold"
    return (f"general loss {num(retention['before'])} -> {num(retention['after'])} "
            f"({pct(retention['change_pct'])}): {verdict}")


def image_data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _relative(first: Optional[float], last: Optional[float]) -> Optional[float]:
    return None if first is None or last is None or not first else 100.0 * (last - first) / first


def _e(value: Any) -> str:
    return html.escape(str(value))


def _table(rows: List[Tuple[str, str]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows) + "</table>"


def _card(title: str, before: Optional[float], after: Optional[float], change_pct: Optional[float],
          sentence: str, bad: bool) -> str:
    css = "muted" if change_pct is None else ("bad" if bad else "good")
    return (f'<div class="card"><h3>{_e(title)}</h3><div class="big">{num(before)} &rarr; {num(after)} '
            f'<span class="{css}">{pct(change_pct)}</span></div><div class="{"flag" if bad else ""}">'
            f"{_e(sentence)}</div></div>")


def _generations_html(rows, summary) -> str:
    if not rows:
        return '<p class="muted">No generations: set eval.prompts or eval.prompts_file.</p>'
    steps = summary["generations"]
    head = (f"<tr><th>prompt</th><th>before (step {_e(steps['before_step'] if steps['before_step'] is not None else '—')})"
            f"</th><th>after (step {_e(steps['after_step'] if steps['after_step'] is not None else '—')})</th></tr>")

    def cell(text):
        return f'<td class="gen{" muted" if not (text or "").strip() else ""}">{_e(visible(text))}</td>'
    return "<table>" + head + "".join(f"<tr><td>{_e(p)}</td>{cell(b)}{cell(a)}</tr>" for p, b, a in rows) + "</table>"


def render_html(run: RunData, summary: Dict[str, Any], plots: List[Tuple[str, Path]], skipped: List[str]) -> str:
    status, task, retention = summary["status"], summary["task"], summary["retention"]
    name = _get(run.config, "run.name") or run.run_dir.name
    figures = "".join(f'<figure><img alt="{_e(t)}" src="{image_data_uri(p)}"></figure>' for t, p in plots)
    problems = summary["problems"] + ([f"rank error: {status['detail']}"] if status.get("detail") else [])
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>shardtune report: {_e(name)}</title>",
        f"<style>{CSS}</style></head><body>",
        f"<h1>{_e(name)} <span class='badge {_e(status['state'])}'>{_e(status['state'])}</span></h1>",
        f"<div class='sub'>{_e(run.run_dir)} &middot; {_e(status['meaning'])}</div>",
        *[f"<div class='sub'>{_e(link)}</div>" for link in summary.get("trackers", [])],
        "<div class='cards'>",
        _card("Task: eval loss before → after", task["before"], task["after"], task["change_pct"],
              task_sentence(task), bad=task["change"] is not None and task["change"] > 0),
        _card("Retention: general loss before → after", retention["before"], retention["after"],
              retention["change_pct"], retention_sentence(retention), bad=retention["flagged"]),
        _card("Train loss first → last", summary["train"]["first_loss"], summary["train"]["last_loss"],
              _relative(summary["train"]["first_loss"], summary["train"]["last_loss"]),
              f"{summary['train']['steps_done']} / {summary['train']['max_steps']} steps, "
              f"{summary['train']['tokens']:,} trained tokens", bad=False),
        "</div>",
    ]
    if problems:
        parts.append("<div class='problems'><b>Notes</b><ul>" + "".join(f"<li>{_e(p)}</li>" for p in problems)
                     + "</ul></div>")
    parts += ["<h2>Plots</h2>", f"<div class='plots'>{figures}</div>" if figures else "<p class='muted'>nothing logged yet</p>"]
    if skipped:
        parts.append("<p class='muted'>" + _e("; ".join(skipped)) + "</p>")
    parts += ["<h2>Generations before and after</h2>", _generations_html(generation_rows(run, summary), summary),
              "<h2>Evaluations</h2>", _evals_html(run), *_benchmarks_html(run), "<h2>Run</h2>", _table(config_facts(run)),
              "<h2>Timing</h2>", _table(timing_facts(summary)),
              f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{_e(run.config_text)}</pre></details>",
              "</body></html>"]
    return "\n".join(parts)


# the last two only in preference runs (objective=dpo|simpo|kto): held-out reward accuracy and margin
EVAL_COLUMNS = ("step", "eval_loss", "eval_ppl", "general_loss", "general_ppl", "eval_rewards/accuracy",
                "eval_rewards/margin")


def _evals_html(run: RunData) -> str:
    if not run.evals:
        return "<p class='muted'>no evaluation logged</p>"
    cols = [c for c in EVAL_COLUMNS if any(c in r for r in run.evals)]
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in cols) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{_cell_value(r.get(c), c)}</td>" for c in cols) + "</tr>" for r in run.evals)
    return f"<table>{head}{body}</table>"


BENCHMARK_HEAD = ("task", "metric", "n", "baseline", "tuned", "difference", "interval", "verdict")


def benchmark_cells(row: Dict[str, Any]) -> List[str]:
    """One row of `shardtune eval`'s paired table, as the report prints it."""
    direction = "" if row["higher_is_better"] else " (lower is better)"
    return [row["task"], row["metric"] + direction, str(row["n"]),
            f"{num(row['base'])} ± {num(row['base_stderr'])}", f"{num(row['tuned'])} ± {num(row['tuned_stderr'])}",
            f"{row['diff']:+.4f}", f"[{row['ci_low']:+.4f}, {row['ci_high']:+.4f}]", row["verdict"]]


def benchmark_intro(bench: Dict[str, Any]) -> str:
    level = round(100 * bench["settings"]["confidence"])
    return (f"{bench['tuned']} against {bench['baseline']} (lm-eval {bench['settings']['lm_eval']}, "
            f"{level}% paired bootstrap intervals). Retention: {bench['retention']['text']}.")


def _benchmarks_html(run: RunData) -> List[str]:
    if not run.benchmarks:
        return []
    head = "<tr>" + "".join(f"<th>{c}</th>" for c in BENCHMARK_HEAD) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in benchmark_cells(r)) + "</tr>"
                   for r in run.benchmarks["rows"])
    return ["<h2>Benchmarks (shardtune eval)</h2>", f"<p>{_e(benchmark_intro(run.benchmarks))}</p>",
            f"<table>{head}{body}</table>"]


def _cell_value(value, column: str) -> str:
    return str(value) if column == "step" else num(value)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "⏎")


def render_markdown(run: RunData, summary: Dict[str, Any], plots: List[Tuple[str, Path]], skipped: List[str]) -> str:
    status, task, retention = summary["status"], summary["task"], summary["retention"]
    name = _get(run.config, "run.name") or run.run_dir.name
    lines = [f"# {name}: {status['state']}", "", f"`{run.run_dir}`: {status['meaning']}", "",
             f"- **Task:** {task_sentence(task)}", f"- **Retention:** {retention_sentence(retention)}",
             f"- **Train loss:** {num(summary['train']['first_loss'])} -> {num(summary['train']['last_loss'])} "
             f"over {summary['train']['steps_done']} / {summary['train']['max_steps']} steps", ""]
    if summary.get("preference"):  # held-out reward accuracy and margin of a preference run
        lines[-1:-1] = [f"- **Held-out reward {key}:** {num(v['before'])} -> {num(v['after'])}"
                        for key, v in summary["preference"].items()]
    lines += [f"- **{link.split(': ', 1)[0]}:** `{link.split(': ', 1)[1]}`" for link in summary.get("trackers", [])]
    lines += [f"- note: {p}" for p in summary["problems"]]
    lines += ["", "## Plots", ""] + [f"![{t}](report/{p.name})" for t, p in plots] + [f"- {s}" for s in skipped]
    lines += ["", "## Evaluations", ""]
    cols = [c for c in EVAL_COLUMNS if any(c in r for r in run.evals)]
    if cols:
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        lines += ["| " + " | ".join(_cell_value(r.get(c), c) for c in cols) + " |" for r in run.evals]
    if run.benchmarks:
        lines += ["", "## Benchmarks (shardtune eval)", "", benchmark_intro(run.benchmarks), "",
                  "| " + " | ".join(BENCHMARK_HEAD) + " |", "|" + "---|" * len(BENCHMARK_HEAD)]
        lines += ["| " + " | ".join(_md_escape(c) for c in benchmark_cells(r)) + " |" for r in run.benchmarks["rows"]]
    rows = generation_rows(run, summary)
    g = summary["generations"]
    lines += ["", "## Generations before and after", ""]
    if rows:
        lines += [f"| prompt | before (step {g['before_step']}) | after (step {g['after_step']}) |", "|---|---|---|"]
        lines += [f"| {_md_escape(p)} | {_md_escape(visible(b))} | {_md_escape(visible(a))} |" for p, b, a in rows]
    lines += ["", "## Run", ""] + [f"- {k}: {v}" for k, v in config_facts(run)]
    lines += ["", "## Timing", ""] + [f"- {k}: {v}" for k, v in timing_facts(summary)]
    return "\n".join(lines) + "\n"
