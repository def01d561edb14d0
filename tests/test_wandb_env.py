"""W&B as its users expect: their WANDB_* environment applies unless the config sets a value, the
mode follows the login, and where the run went is printed once and kept in the run directory.

Real wandb, offline, through the real WandbSink in a child process (wandb reads the environment
once per process), in an isolated home: no key, no ~/.netrc, no W&B settings of the machine's user.
What wandb recorded is read back from the run's own transaction log (`run-<id>.wandb`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import wandb_records  # test-only reader of W&B's offline files
from helpers import REPO, train
from helpers import subprocess_env as child_env  # renamed: pytest would collect subprocess_env
from trainer.metrics import wandb_mode
from trainer.run_dir import RunDir

# One launch: a WandbSink built from a RootConfig whose logger node is given as JSON, one step logged.
LAUNCH = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from trainer.config import RootConfig
    from trainer.metrics import WandbSink

    cfg = RootConfig()
    cfg.run.name = "r"
    for key, value in json.loads(sys.argv[2]).items():
        setattr(cfg.logger, key, value)
    sink = WandbSink(cfg, {}, Path(sys.argv[1]))
    sink.log({"kind": "train", "step": 1, "loss": 1.0})
    sink.close()
""")
ENV = {"WANDB_PROJECT": "env-project", "WANDB_ENTITY": "env-team", "WANDB_RUN_GROUP": "env-group",
       "WANDB_TAGS": "a,b"}


def isolated_env(tmp_path: Path, extra: dict) -> dict:
    """This machine's environment without any WANDB_* variable, in a home of its own, plus `extra`."""
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {k: v for k, v in child_env().items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / ".netrc"), WANDB_CONFIG_DIR=str(home / ".config" / "wandb"),
               WANDB_SILENT="true", **extra)
    return env


def launch(tmp_path: Path, logger: dict, env: dict) -> tuple[str, dict, dict]:
    """(output, the run record wandb wrote, wandb_run.json) of one launch in tmp_path/run."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", LAUNCH, str(run_dir), json.dumps(logger)], cwd=REPO,
                          env=isolated_env(tmp_path, env), capture_output=True, text=True, timeout=180)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    (log,) = wandb_records.run_files(run_dir / "wandb", run_id)
    return output, run_record(log), json.loads(RunDir(run_dir).wandb_run.read_text())


def run_record(path: Path) -> dict:
    from wandb.proto import wandb_internal_pb2

    for raw in wandb_records.raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {"project": run.project, "entity": run.entity, "group": run.run_group, "tags": list(run.tags)}
    raise AssertionError(f"{path} holds no run record")


def test_the_environment_names_project_entity_group_and_tags_of_an_offline_run(tmp_path):
    output, record, where = launch(tmp_path, {}, {**ENV, "WANDB_MODE": "offline"})
    assert record == {"project": "env-project", "entity": "env-team", "group": "env-group", "tags": ["a", "b"]}
    assert where["mode"] == "offline" and where["project"] == "env-project" and where["entity"] == "env-team"
    offline = Path(where["offline_dir"])
    assert offline.parent == tmp_path / "run" / "wandb" and offline.name.startswith("offline-run-")
    assert where["sync_command"] == f"wandb sync {tmp_path}/run/wandb/offline-run-*-{where['run_id']}"
    assert output.count("W&B offline run in") == 1 and where["sync_command"] in output, output
    assert "no API key found" not in output  # WANDB_MODE chose offline: nothing to explain


def test_a_value_in_the_config_wins_over_the_environment(tmp_path):
    logger = {"mode": "offline", "project": "cfg-project", "entity": "cfg-team", "group": "cfg-group", "tags": ["c"]}
    _, record, where = launch(tmp_path, logger, {**ENV, "WANDB_MODE": "online"})  # online would need the network
    assert record == {"project": "cfg-project", "entity": "cfg-team", "group": "cfg-group", "tags": ["c"]}
    assert where["mode"] == "offline"


def test_without_a_key_or_wandb_mode_the_run_is_offline_and_says_how_to_go_online(tmp_path):
    output, record, where = launch(tmp_path, {}, {})
    assert where["mode"] == "offline" and record["project"] == "shardtune"  # our default: nothing named one
    notes = [line for line in output.splitlines() if "W&B: no API key found" in line]
    assert len(notes) == 1 and "logging offline" in notes[0] and "wandb login" in notes[0], output


def test_the_mode_follows_the_config_then_wandb_mode_then_the_login(tmp_path, monkeypatch):
    """In this process, without wandb.init: the decision alone (a key found means online)."""
    for name in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert wandb_mode("offline") == ("offline", None)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == (None, None)  # wandb reads WANDB_MODE itself
    monkeypatch.delenv("WANDB_MODE")
    mode, note = wandb_mode(None)
    assert mode == "offline" and "W&B: no API key found" in note
    key = "k" * 40
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {key}\n")  # `wandb login`
    assert wandb_mode(None) == ("online", None)
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", key)
    assert wandb_mode(None) == ("online", None)
    monkeypatch.setenv("WANDB_API_KEY", "short-secret-value")
    mode, note = wandb_mode(None)
    assert mode == "offline" and "not valid" in note and "short-secret-value" not in note and "secret" not in note


@pytest.mark.distributed
def test_a_training_run_on_two_ranks_follows_the_environment(tmp_path):
    """`shardtune train logger=wandb` with WANDB_MODE/WANDB_PROJECT exported: the launcher passes them
    to the ranks, rank 0 says where the run is once, and the run directory records it."""
    proc = train(tmp_path, "logger=wandb", env={"WANDB_MODE": "offline", "WANDB_PROJECT": "env-project"})
    assert proc.returncode == 0, proc.stdout[-3000:]
    where = json.loads(RunDir(tmp_path).wandb_run.read_text())
    assert where["mode"] == "offline" and where["project"] == "env-project"
    assert proc.stdout.count("W&B offline run in") == 1 and where["sync_command"] in proc.stdout


# Launch FIRST..LAST of one run through the real WandbSink, as build_sinks does after JsonlSink left
# metrics.jsonl with the steps up to the checkpoint; "kill" SIGKILLs its session before run.finish().
STEPS = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from trainer.config import RootConfig
    from trainer.metrics import WandbSink

    run_dir, first, last, end = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    cfg = RootConfig()
    cfg.run.name, cfg.logger.mode = "r", "offline"
    sink = WandbSink(cfg, {}, run_dir)
    for step in range(first, last + 1):
        sink.log({"kind": "train", "step": step, "loss": 10.0 - step})
    if end == "kill":
        os.killpg(0, signal.SIGKILL)  # kill -9 of the job, wandb-core included: W&B never confirms these steps
    sink.close()
""")


def steps_launch(run_dir: Path, first: int, last: int, end: str, checkpoint: int) -> None:
    rows = [{"kind": "train", "step": s, "loss": 10.0 - s} for s in range(1, checkpoint + 1)]
    RunDir(run_dir).metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))  # as JsonlSink leaves it
    proc = subprocess.run([sys.executable, "-c", STEPS, str(run_dir), str(first), str(last), end], cwd=REPO,
                          env=child_env({"WANDB_MODE": "offline"}), capture_output=True, text=True, timeout=180,
                          start_new_session=True)  # a session of its own: the "kill" ends it whole
    assert proc.returncode == (-9 if end == "kill" else 0), proc.stdout + proc.stderr


def test_a_launch_that_never_finished_is_set_aside_and_its_steps_logged_again_once(tmp_path):
    """Launch 1 finishes steps 1-3; launch 2 logs 4-6 and is killed; launch 3 resumes from the
    checkpoint of step 5: the uploaded folders hold 1-8 once (4-5 from metrics.jsonl, 6-8 trained)."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps_launch(run_dir, 1, 3, "finish", checkpoint=0)
    steps_launch(run_dir, 4, 6, "kill", checkpoint=3)
    assert json.loads(RunDir(run_dir).wandb_steps.read_text())["step"] == 3
    steps_launch(run_dir, 6, 8, "finish", checkpoint=5)
    run_id = RunDir(run_dir).wandb_run_id.read_text().strip()
    (aside,) = RunDir(run_dir).wandb.glob(f"interrupted-offline-run-*-{run_id}")
    assert len(wandb_records.run_files(RunDir(run_dir).wandb, run_id)) == 2
    assert wandb_records.run_history_steps(RunDir(run_dir).wandb, run_id) == list(range(1, 9))
    assert json.loads(RunDir(run_dir).wandb_steps.read_text()) == {"run_id": run_id, "step": 8, "open_launch": None}
