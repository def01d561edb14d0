"""Evaluation during training and `shardtune report`.

Unit tests work on a copy of tests/fixtures/report/run (a real 4-step run's metrics, hand-written
generations) and bend it into a running, failed, empty or swept run. One distributed test trains
a tiny model with the baseline, the general set and prompts, then reports on it.
"""
from __future__ import annotations

import json
import shutil
import struct
import time
import zlib
from pathlib import Path

import pytest

from helpers import REPO, metrics, shardtune, train
from trainer.report_build import write_run_report

FIXTURE = REPO / "tests" / "fixtures" / "report" / "run"
PLOTS = ["loss_vs_steps.png", "loss_vs_tokens.png", "lr.png", "tokens_per_s.png", "grad_norm.png"]


def assert_valid_png(path: Path) -> None:
    """A PNG that decodes: signature, an IHDR with a real size, every chunk's CRC, image data."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path}: not a PNG"
    offset, kinds = 8, []
    while offset < len(data):
        length, kind = struct.unpack(">I4s", data[offset:offset + 8])
        body = data[offset + 8:offset + 8 + length]
        crc, = struct.unpack(">I", data[offset + 8 + length:offset + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"{path}: bad CRC in {kind!r}"
        kinds.append(kind)
        if kind == b"IHDR":
            width, height = struct.unpack(">II", body[:8])
            assert width > 100 and height > 100, f"{path}: {width}x{height}"
        offset += 12 + length
    assert kinds[0] == b"IHDR" and b"IDAT" in kinds and kinds[-1] == b"IEND"


def fixture_run(tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(FIXTURE, run_dir)
    return run_dir


def eval_lines(run_dir: Path):
    return metrics(run_dir, "eval")


def test_report_numbers_equal_metrics(tmp_path):
    run_dir = fixture_run(tmp_path)
    summary = write_run_report(run_dir)
    evals, trains = eval_lines(run_dir), metrics(run_dir)
    first, last = evals[0], evals[-1]
    assert first["step"] == 0 and summary["baseline"]
    assert summary["task"]["before"] == first["eval_loss"] and summary["task"]["after"] == last["eval_loss"]
    assert summary["retention"]["before"] == first["general_loss"]
    assert summary["retention"]["after"] == last["general_loss"]
    assert summary["train"]["first_loss"] == trains[0]["loss"] and summary["train"]["last_loss"] == trains[-1]["loss"]
    assert summary["train"]["tokens"] == trains[-1]["tokens"] == 295
    assert summary["status"]["state"] == "finished"
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    for record in evals:  # every eval figure, as printed, in both files
        for key in ("eval_loss", "eval_ppl", "general_loss", "general_ppl"):
            assert f"{record[key]:.4f}" in md and f"{record[key]:.4f}" in page, (key, record[key])
    assert "eval loss 7.6521 -> 7.4969 at step 4 (-2.03%): improved" in md
    assert "within the 5.0% threshold" in md
    for name in PLOTS:
        assert_valid_png(run_dir / "report" / name)
        assert f"](report/{name})" in md
    assert page.count("data:image/png;base64,") == len(PLOTS)  # self-contained
    assert "Memory: not logged" in md


def test_generations_before_and_after_side_by_side(tmp_path):
    run_dir = fixture_run(tmp_path)
    write_run_report(run_dir)
    md = (run_dir / "report.md").read_text()
    page = (run_dir / "report.html").read_text()
    assert "| prompt | before (step 0) | after (step 4) |" in md
    assert "| Convert 7 kilometers to meters. | (only whitespace) ⏎×4 | 7 kilometers is 7000 meters. |" in md
    assert "| Spell the word \"garden\" backwards. | (empty) | nedrag |" in md
    assert "The capital of Peru is &lt;Lima&gt; | ok" in page  # escaped, not markup
    assert "The capital of Peru is <Lima> \\| ok" in md


def test_retention_flagged_beyond_threshold_and_memory_plotted(tmp_path):
    run_dir = fixture_run(tmp_path)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for record in lines:
        if record["kind"] == "eval" and record["step"] == 4:
            record["general_loss"] = 7.6603104874894425 * 1.10  # 10% worse, threshold 5%
        if record["kind"] == "train":
            record["mem_allocated_gb"] = 1.0 + record["step"] / 10
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = write_run_report(run_dir)
    assert summary["retention"]["flagged"]
    assert summary["retention"]["change_pct"] == pytest.approx(10.0)
    assert "(+10.00%): WORSE beyond the 5.0% threshold" in (run_dir / "report.md").read_text()
    assert_valid_png(run_dir / "report" / "memory.png")


def test_running_run_with_half_written_line(tmp_path):
    run_dir = fixture_run(tmp_path)
    (run_dir / "control" / "exit.json").unlink()
    (run_dir / "heartbeats").mkdir()
    (run_dir / "heartbeats" / "rank0.json").write_text(json.dumps({"rank": 0, "step": 4, "time": time.time()}))
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 5, "lo')
    summary = write_run_report(run_dir)
    assert summary["status"]["state"] == "running"
    assert summary["train"]["steps_done"] == 4
    assert any("metrics.jsonl:8: unreadable line" in p for p in summary["problems"])
    assert "badge running" in (run_dir / "report.html").read_text()


def test_killed_run_whose_ranks_are_gone(tmp_path):
    """No exit.json, fresh heartbeats, but the rank processes no longer exist (e.g. OOM-killed)."""
    import socket
    import subprocess

    run_dir = fixture_run(tmp_path)
    (run_dir / "control" / "exit.json").unlink()
    env = json.loads((run_dir / "env.json").read_text())
    (run_dir / "env.json").write_text(json.dumps(dict(env, host=socket.gethostname())))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run_dir / "heartbeats").mkdir()
    (run_dir / "heartbeats" / "rank0.json").write_text(json.dumps({"rank": 0, "step": 4, "time": time.time(),
                                                                   "pid": dead.pid}))
    summary = write_run_report(run_dir)
    assert summary["status"]["state"] == "unknown" and "killed" in summary["status"]["meaning"]


def test_failed_run_without_generations_or_evals(tmp_path):
    run_dir = fixture_run(tmp_path)
    (run_dir / "control" / "exit.json").write_text(json.dumps({"code": 1, "detail": "rank 1: RuntimeError: boom"}))
    (run_dir / "generations.jsonl").unlink()
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    (run_dir / "metrics.jsonl").write_text("\n".join(kept[:2]) + "\n")
    summary = write_run_report(run_dir)
    assert summary["status"]["state"] == "failed" and not summary["baseline"]
    page = (run_dir / "report.html").read_text()
    assert "rank 1: RuntimeError: boom" in page and "No generations" in page
    assert "no step-0 baseline" in (run_dir / "report.md").read_text()
    assert not (run_dir / "report" / "memory.png").exists()


def test_run_killed_before_any_metric(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(FIXTURE / "config.yaml", run_dir)
    summary = write_run_report(run_dir)
    assert summary["status"]["state"] == "unknown" and summary["plots"] == []
    assert "metrics.jsonl: not written (yet)" in (run_dir / "report.md").read_text()


def test_sweep_report_one_line_per_trial(tmp_path):
    sweep = tmp_path / "sweep"
    for num in (0, 2, 10):
        shutil.copytree(FIXTURE, sweep / f"trial-{num}")
        (sweep / f"trial-{num}" / "trial.json").write_text(json.dumps(
            {"code": 0, "status": "completed", "overrides": [f"optim.lr={num}e-4"]}))
    (sweep / "trial-1").mkdir()  # rejected by validation: no run directory content
    (sweep / "trial-1" / "trial.json").write_text(json.dumps({"code": 2, "status": "failed", "overrides": ["x=1"]}))
    proc = shardtune("report", str(sweep), check=True)
    assert "4 trials" in proc.stdout
    md = (sweep / "report.md").read_text().splitlines()
    rows = [line for line in md if line.startswith("| trial-")]
    assert [r.split(" | ")[0] for r in rows] == ["| trial-0", "| trial-1", "| trial-2", "| trial-10"]
    assert "[report](trial-10/report.html)" in rows[3] and "7.6521 -> 7.4969" in rows[3]
    assert "| trial-1 | config error (see the sweep's console output) | x=1 |" in rows[1]
    assert (sweep / "trial-2" / "report.html").is_file()
    assert "href='trial-0/report.html'" in (sweep / "report.html").read_text()


def test_prompts_and_prompt_style(tmp_path):
    from launcher.compose import compose
    from trainer.evaluation import encode_prompt, load_prompts, resolve_prompt_style
    from trainer.model import build_tokenizer

    chat = compose([])
    text = compose(["data=sample_text"])
    tokenizer = build_tokenizer(chat.model)
    assert load_prompts(chat) == (REPO / "samples/chat/prompts.txt").read_text().split("\n")[:3]
    assert len(load_prompts(text)) == 3 and chat.eval.general_files == text.eval.general_files
    assert resolve_prompt_style(chat, tokenizer) == "chat" and resolve_prompt_style(text, tokenizer) == "text"
    ids = encode_prompt(tokenizer, "Hi", "chat")
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(encode_prompt(tokenizer, "Hi", "text")) == "Hi"


def test_missing_prompts_file_is_a_config_error():
    from launcher.compose import compose
    from trainer.config import ConfigError

    with pytest.raises(ConfigError, match="eval.prompts_file='/nope.txt' is not a file"):
        compose(["eval.prompts_file=/nope.txt"])


@pytest.mark.distributed
def test_tiny_run_evaluates_and_reports(tmp_path):
    """2 ranks, ZeRO-3: baseline + every 3 steps, general set and generations; then the report."""
    run_dir = tmp_path / "run"
    proc = train(run_dir, "eval.baseline=true", "eval.every_steps=3", "eval.max_new_tokens=6",
                 "eval.max_batches=2", timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    evals = eval_lines(run_dir)
    assert [e["step"] for e in evals] == [0, 3, 6]
    assert all(e["eval_tokens"] > 0 and e["general_tokens"] > 0 for e in evals)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # the task improved
    prompts = (REPO / "samples/chat/prompts.txt").read_text().split("\n")[:3]
    rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(s, p) for s in (0, 3, 6) for p in prompts]
    report = shardtune("report", str(run_dir), check=True)
    assert "task: eval loss" in report.stdout
    summary = json.loads((run_dir / "report" / "summary.json").read_text())
    assert summary["task"]["before"] == evals[0]["eval_loss"] and summary["task"]["after"] == evals[-1]["eval_loss"]
    assert summary["retention"]["before"] == evals[0]["general_loss"]
    assert summary["train"]["last_loss"] == metrics(run_dir)[-1]["loss"]
    for name in PLOTS:
        assert_valid_png(run_dir / "report" / name)
    md = (run_dir / "report.md").read_text()
    assert f"| 0 | {evals[0]['eval_loss']:.4f} |" in md
    assert "| prompt | before (step 0) | after (step 6) |" in md
    assert all(p in md for p in prompts)
