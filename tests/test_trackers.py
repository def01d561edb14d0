"""TensorBoard, MLflow and W&B at once, read back with each tracker's own reader, equal to
metrics.jsonl across a resume that replays steps; and the logs/ folder of a run that failed.

One shared run directory (module fixture), two real 2-rank launches with
logger.backends=[wandb,tensorboard,mlflow] (W&B offline):
  launch 1: 8 steps planned, a checkpoint every 2, a stop request in step 6: steps 1-6 logged, exit 75;
  launch 2: resumes from the checkpoint of step 4 (so steps 5-6 are trained and logged again), logs 7,
            and fails at step 8 (NaN loss on rank 1, train.max_nonfinite_steps=1): exit EXIT_NONFINITE.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import wandb_records
from helpers import train
from trainer import checkpoint
from trainer.control import EXIT_NONFINITE, EXIT_RESUME_ME
from trainer.metrics import tracker_metrics
from trainer.run_dir import RunDir

TRACKERS = ["logger.backends=[wandb,tensorboard,mlflow]", "train.max_steps=8", "checkpoint.every_steps=2",
            "checkpoint.keep_last=0", "eval.max_batches=1"]
ENV = {"WANDB_MODE": "offline"}
# Values an exact resume replays (a step logged again after the resume equals the first one to this);
# the throughput keys (tokens_per_s, step_time_s) are the launch's own.
REPLAYED = ("loss", "lr", "grad_norm", "tokens", "step_tokens", "eval_loss", "eval_ppl")
EXACT = 1e-5


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """(run directory, launch 1, launch 2) as the module docstring says."""
    run_dir = tmp_path_factory.mktemp("trackers") / "run"
    first = train(run_dir, *TRACKERS, "+train.fault_injection.stop_at_step=6", env=ENV)
    assert first.returncode == EXIT_RESUME_ME, first.stdout[-4000:]
    step_4 = checkpoint.checkpoint_root(run_dir) / checkpoint.tag_for(4)
    second = train(run_dir, *TRACKERS, f"resume={step_4}", "train.max_nonfinite_steps=1",
                   "+train.fault_injection.nan_at_step=8", "+train.fault_injection.nan_rank=1", env=ENV)
    assert second.returncode == EXIT_NONFINITE, second.stdout[-4000:]
    assert f"resumed from {step_4} at step 4" in second.stdout
    return run_dir, first, second


def expected(run_dir: Path) -> dict:
    """{(tag, step): value} of metrics.jsonl, named as the trackers name them."""
    return {(tag, record["step"]): value for record in RunDir(run_dir).read_metrics()
            for tag, value in tracker_metrics(record).items()}


def assert_equal(got: dict, want: dict, exact_keys=None, rel=EXACT) -> None:
    """Every (tag, step) once, none missing or extra; values equal (replayed keys to `rel`)."""
    assert sorted(got) == sorted(want), sorted(set(got) ^ set(want))
    for (tag, step), value in want.items():
        if exact_keys is None or tag.split("/", 1)[1] in exact_keys:
            assert math.isclose(got[tag, step], value, rel_tol=rel, abs_tol=1e-12), (tag, step, got[tag, step], value)


def test_the_resume_replays_steps_5_and_6_and_metrics_jsonl_holds_each_step_once(resumed_run):
    run_dir, _, _ = resumed_run
    steps = [r["step"] for r in RunDir(run_dir).read_metrics() if r["kind"] == "train"]
    assert steps == list(range(1, 8))  # the aborted step 8 is not logged


def test_tensorboard_reads_back_what_metrics_jsonl_holds(resumed_run):
    """TensorBoard's own reader: the resumed launch's restart marker hides launch 1's steps 5-6."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _, _ = resumed_run
    events = EventAccumulator(str(RunDir(run_dir).tensorboard), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    got = {}
    for tag in events.Tags()["scalars"]:
        for event in events.Scalars(tag):
            assert (tag, event.step) not in got, f"{tag} step {event.step} twice"
            got[tag, event.step] = event.value
    assert_equal(got, expected(run_dir), rel=1e-6)  # every value, as float32 (the event format's)
    assert "config/text_summary" in events.Tags()["tensors"]
    config = events.Tensors("config/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert '"max_steps": 8' in config and "WANDB" not in config


def test_mlflow_reads_back_what_metrics_jsonl_holds_with_the_config(resumed_run, monkeypatch):
    from mlflow.tracking import MlflowClient

    run_dir, _, _ = resumed_run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only when allowed
    client = MlflowClient(tracking_uri=RunDir(run_dir).mlflow_store.as_uri())
    run = client.get_run(RunDir(run_dir).mlflow_run_id.read_text().strip())
    got = {}
    for key in run.data.metrics:
        for metric in client.get_metric_history(run.info.run_id, key):
            assert (key, metric.step) not in got, f"{key} step {metric.step} twice"
            got[key, metric.step] = metric.value
    assert_equal(got, expected(run_dir), exact_keys=REPLAYED)
    assert run.data.params["train.max_steps"] == "8" and run.data.params["logger.backends"] == str(
        ["wandb", "tensorboard", "mlflow"])
    assert "config.json" in [artifact.path for artifact in client.list_artifacts(run.info.run_id)]


def test_wandb_continues_one_run_and_holds_each_step_once(resumed_run):
    """The offline folders that `wandb sync` uploads (both launches finished: none was set aside)."""
    run_dir, first, second = resumed_run
    run_id = RunDir(run_dir).wandb_run_id.read_text().strip()
    wandb_dir = RunDir(run_dir).wandb
    assert len(wandb_records.run_files(wandb_dir, run_id)) == 2 and not list(wandb_dir.glob("interrupted-*"))
    # Launch 1 logged 1-6; launch 2 skipped its replayed 5-6 and logged 7: strictly increasing, none twice.
    assert wandb_records.run_history_steps(wandb_dir, run_id) == list(range(1, 8))
    assert json.loads(RunDir(run_dir).wandb_steps.read_text()) == {"run_id": run_id, "step": 7, "open_launch": None}


def test_a_failed_run_keeps_its_output_in_logs_and_says_where(resumed_run):
    run_dir, first, second = resumed_run
    logs = RunDir(run_dir).logs
    for launch in (first, second):
        assert launch.stdout.rstrip().splitlines()[-1] == f"[shardtune] logs: {logs}/"
    launcher_log = RunDir(run_dir).launcher_log().read_text()
    # Both launches, appended: what the launcher said (the ranks keep their own logs, written by
    # themselves, so a launcher killed with -9 takes nothing of theirs with it).
    assert launcher_log.count(f"[shardtune] run directory: {run_dir}") == 2
    assert launcher_log.rstrip().endswith(f"[shardtune] logs: {logs}/")
    rank_0 = RunDir(run_dir).rank_log(0).read_text()
    assert "step 6/8" in rank_0 and "step 7/8" in rank_0  # both launches, appended
    assert "aborting: 1 non-finite steps in a row (last step 8)" in rank_0
    assert RunDir(run_dir).rank_log(1).is_file()


def test_the_report_says_where_the_trackers_hold_the_run(resumed_run):
    from helpers import shardtune

    run_dir, _, _ = resumed_run
    shardtune("report", str(run_dir), check=True)
    report = RunDir(run_dir).report_md.read_text()
    run_id = RunDir(run_dir).wandb_run_id.read_text().strip()
    assert f"- **W&B (offline):** `wandb sync {RunDir(run_dir).wandb}/offline-run-*-{run_id}`" in report, report
    assert f"- **TensorBoard:** `tensorboard --logdir {RunDir(run_dir).tensorboard}`" in report
    assert f"- **MLflow:** `mlflow ui --backend-store-uri {RunDir(run_dir).mlflow_store}`" in report
    assert "mlflow ui --backend-store-uri" in RunDir(run_dir).report_html.read_text()
