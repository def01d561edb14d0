"""Where metrics go. Rank 0 gets real sinks; every other rank gets one that does nothing.

Rank 0 always writes metrics.jsonl and the progress bar, plus the trackers of logger.backends: W&B,
TensorBoard, MLflow (the last two are optional packages, imported only here). On resume each
tracker ends up holding what metrics.jsonl holds, each step once (see each sink's docstring).

Sinks share one small protocol (`log`, `log_table`, `close`), so the loop never asks which are on.
`metrics.jsonl` holds one JSON object per line: training steps have `"kind": "train"`, evaluations
`"kind": "eval"`; every line has `step`.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Tuple

from trainer.config import RootConfig
from trainer.run_dir import RunDir

SECRET_KEY = re.compile(r"(api[_-]?key|token|secret|password)", re.IGNORECASE)
# Beside wandb_run_id: where this launch's W&B run is (its URL, or its offline folder and the
# `wandb sync` command), for the user and the report. It never holds the API key.
DEFAULT_PROJECT = "shardtune"  # only when neither logger.project nor W&B's settings (WANDB_PROJECT) name one


class MetricSink(Protocol):
    def log(self, record: Dict[str, Any]) -> None: ...
    def log_table(self, name: str, step: int, rows: List[Dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class NullSink:
    def log(self, record): pass
    def log_table(self, name, step, rows): pass
    def close(self): pass


class JsonlSink:
    """Appends to metrics.jsonl; on resume, lines from steps after the checkpoint are dropped first."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        if path.exists():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            path.write_text("".join(line + "\n" for line in kept))
        self.handle = open(path, "a")

    def log(self, record):
        self.handle.write(json.dumps(record) + "\n")
        self.handle.flush()

    def log_table(self, name, step, rows):
        with open(self.path.with_name(f"{name}.jsonl"), "a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")

    def close(self):
        self.handle.close()


class ProgressBar:
    """One line on stderr per logged step: step, loss, tokens/s and ETA."""

    def __init__(self, max_steps: int, start_step: int):
        self.max_steps, self.start_step, self.started = max_steps, start_step, time.time()

    def log(self, record):
        if record.get("kind") != "train":
            if record.get("kind") == "eval":
                parts = [f"{name} loss {record[f'{name}_loss']:.4f} ppl {record[f'{name}_ppl']:.2f}"
                         for name in ("eval", "general") if f"{name}_loss" in record]
                if parts:  # a prompts-only evaluation has no loss to show
                    print(f"[eval step {record['step']}] {', '.join(parts)}", file=sys.stderr, flush=True)
            return
        step = record["step"]
        done = step - self.start_step
        eta = (time.time() - self.started) / max(done, 1) * (self.max_steps - step)
        width = 24
        filled = int(width * step / self.max_steps)
        # A step skipped for a non-finite loss or gradient logs loss None: say so instead of a number.
        loss = "skipped" if record.get("loss") is None else f"{record['loss']:.4f}"
        print(f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.max_steps} loss {loss} "
              f"lr {record['lr']:.2e} {record['tokens_per_s']:.0f} tok/s ETA {eta:.0f}s", file=sys.stderr, flush=True)

    def log_table(self, name, step, rows): pass
    def close(self): pass


def public_config(cfg_dict: Dict[str, Any]) -> Dict[str, Any]:
    """The config without any value whose key looks like a secret (W&B config, logs)."""
    def scrub(node):
        if isinstance(node, dict):
            return {k: ("<redacted>" if SECRET_KEY.search(str(k)) else scrub(v)) for k, v in node.items()}
        if isinstance(node, list):
            return [scrub(v) for v in node]
        return node
    return scrub(cfg_dict)


def tracker_metrics(record: Dict[str, Any]) -> Dict[str, float]:
    """The numbers of one metrics.jsonl record, named `<kind>/<key>` (train/loss, eval/eval_loss) as the
    trackers show them; a value that is not a number (a skipped step's loss None) is left out."""
    kind = record.get("kind", "train")
    return {f"{kind}/{key}": value for key, value in record.items()  # "time": the trackers keep their own
            if key not in ("kind", "step", "time") and isinstance(value, (int, float)) and not isinstance(value, bool)}


def import_tracker(module: str, tracker: str):
    """Import an optional tracker's package, or say how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise RuntimeError(f"logger.backends has {tracker}, which needs the {module} package ({err}): "
                           "pip install 'shardtune[trackers]'") from None


def init_when_free(wandb, run_id: str, wait_s: float = 90.0, **kwargs):
    """wandb.init, waiting while a killed launch's wandb-core still holds the run ("run ID ... is in use").
    A launch ended with kill -9 (a crash, a preempted node, a requeue) leaves its wandb-core service
    running until it notices its parent is gone; the requeued launch that follows at once must wait for
    it, not fail."""
    deadline, said = time.monotonic() + wait_s, False
    while True:
        try:
            return wandb.init(**kwargs)
        except Exception as err:  # wandb's ServerResponseError, a private class
            if "is in use" not in str(err) or time.monotonic() > deadline:
                raise
            if not said:
                print(f"[shardtune] W&B: run {run_id} is still held by an earlier launch's wandb-core (a killed "
                      f"launch); waiting up to {wait_s:.0f}s for it to exit", file=sys.stderr, flush=True)
                said = True
            time.sleep(2.0)


class WandbSink:
    """W&B on rank 0. The run id lives in the run directory, so a resumed run logs to the same run.

    Only what the config sets is passed to wandb.init, whose arguments override W&B's environment:
    WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_RUN_GROUP and WANDB_TAGS apply to the rest.

    No step reaches the run twice, and none is lost, from our own records alone (RunDir.wandb_steps):
    W&B has a launch's steps for sure only once `run.finish()` returned (wandb-core writes and uploads
    in buffered flushes, and a killed launch loses what it had not flushed). So a launch that finished
    records its last step; a resumed launch logs only later steps, first those of metrics.jsonl (up to
    the checkpoint it resumed from), then the ones it trains. Online, the server's own count
    (`run.starting_step`) also counts. Offline, the folder of a launch that never finished holds an
    unknown part of its steps: it is renamed `interrupted-...` (kept, left out of the sync command) and
    its steps are logged again from metrics.jsonl; an exact resume replays identical values.
    """

    def __init__(self, cfg: RootConfig, cfg_dict: Dict[str, Any], run_dir: Path):
        import wandb

        self.run_dir = RunDir(run_dir)
        run_id = self._run_id()
        confirmed = self._confirmed_step(run_id)
        self.wandb = wandb
        mode, note = wandb_mode(cfg.logger.mode)
        if note:
            print(note, file=sys.stderr, flush=True)
        # wandb.init's arguments override W&B's environment (WANDB_PROJECT, WANDB_ENTITY, ...): pass
        # only what the config sets (None reads the environment), and our default project last.
        project = cfg.logger.project or (None if wandb.setup().settings.project else DEFAULT_PROJECT)
        self.run = init_when_free(wandb, run_id, project=project, entity=cfg.logger.entity, group=cfg.logger.group,
                                  tags=list(cfg.logger.tags) or None, name=cfg.run.name, id=run_id, resume="allow",
                                  dir=str(run_dir), mode=mode, config=public_config(cfg_dict))
        announce_run(self.run, run_dir, run_id)
        self.run_id = run_id
        self.logged_before = max(confirmed, self.run.starting_step - 1)
        self.last_step = self.logged_before
        open_launch = self.run.settings.sync_dir if self.run.offline else None
        self._record(self.logged_before, open_launch)
        self.skipped = 0
        for record in self.run_dir.read_metrics():  # what the checkpoint holds and W&B does not yet
            self.log(record)

    def _run_id(self) -> str:
        id_file = self.run_dir.wandb_run_id
        if id_file.exists():
            return id_file.read_text().strip()
        from wandb.sdk.lib.runid import generate_id  # wandb.util.generate_id is gone in wandb 0.31

        run_id = generate_id()
        id_file.write_text(run_id)
        return run_id

    def _confirmed_step(self, run_id: str) -> int:
        """The last step a finished launch of this run handed to W&B (-1: none); sets aside the
        offline folder of a launch that started after it and never finished."""
        record = self.run_dir.read_json(self.run_dir.wandb_steps) or {}
        if record.get("run_id") != run_id:
            return -1
        interrupted = Path(record["open_launch"]) if record.get("open_launch") else None
        if interrupted is not None and interrupted.is_dir():
            aside = interrupted.with_name(f"interrupted-{interrupted.name}")
            interrupted.rename(aside)
            print(f"[shardtune] W&B: the last launch was interrupted before W&B confirmed its steps; its offline "
                  f"folder is now {aside} (not synced), and its steps after {record['step']} are logged again",
                  file=sys.stderr, flush=True)
        return int(record.get("step", -1))

    def _record(self, step: int, open_launch: Optional[str]) -> None:
        self.run_dir.write_json(self.run_dir.wandb_steps,
                                {"run_id": self.run_id, "step": step, "open_launch": open_launch})

    def log(self, record):
        step = record["step"]
        if step <= self.logged_before:
            self.skipped += 1
            return
        data = {f"{record.get('kind', 'train')}/{k}": v for k, v in record.items() if k not in ("kind", "step")}
        self.run.log(data, step=step)
        self.last_step = max(self.last_step, step)

    def log_table(self, name, step, rows):
        if rows and step > self.logged_before:
            table = self.wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
            self.run.log({name: table}, step=step)

    def close(self):
        self.run.finish()  # returns once W&B wrote (offline) or uploaded (online) every step handed to it
        self._record(self.last_step, None)


class TensorBoardSink:
    """TensorBoard event files in <run.dir>/tensorboard, written through after every record.

    A resumed launch starts with TensorBoard's own restart marker (SummaryWriter's `purge_step`):
    readers drop the earlier launches' events from the step after the checkpoint on, which this
    launch logs again, as metrics.jsonl does.
    """

    def __init__(self, cfg_dict: Dict[str, Any], run_dir: Path, resume_step: int):
        import_tracker("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        folder = RunDir(run_dir).tensorboard
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=resume_step + 1)
        config = json.dumps(public_config(cfg_dict), indent=2)
        self.writer.add_text("config", f"```json\n{config}\n```", global_step=resume_step)
        print(f"[shardtune] TensorBoard: tensorboard --logdir {shlex.quote(str(folder))}", file=sys.stderr, flush=True)

    def log(self, record):
        for tag, value in tracker_metrics(record).items():
            self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # a killed launch keeps every step it logged, as metrics.jsonl does

    def log_table(self, name, step, rows):
        pass  # the generations stay in generations.jsonl (and W&B's table)

    def close(self):
        self.writer.close()


def mlflow_tracking_uri(configured: Optional[str], run_dir: Path) -> str:
    """logger.mlflow_tracking_uri, else MLFLOW_TRACKING_URI, else a file store in the run directory.

    MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set (it wants a database, which
    needs SQLAlchemy); ours is a few small files that only rank 0 writes, so we allow it for ours.
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return RunDir(run_dir).mlflow_store.resolve().as_uri()


class MlflowSink:
    """MLflow on rank 0: metrics, the config (params and config.json), the export at the end.

    The run id lives in the run directory, so a resumed run logs to the same MLflow run. MLflow keeps
    every value logged at a step, repeats included; it writes synchronously, so what the store holds
    is what was logged: a resumed launch logs a metric only at steps after the store's last one for
    it, first from metrics.jsonl (up to the checkpoint), then from training.
    """

    def __init__(self, cfg: RootConfig, cfg_dict: Dict[str, Any], run_dir: Path):
        import_tracker("mlflow", "mlflow")
        from mlflow.tracking import MlflowClient

        self.run_dir, self.cfg, self.started = RunDir(run_dir), cfg, time.time()
        uri = mlflow_tracking_uri(cfg.logger.mlflow_tracking_uri, run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        experiment = cfg.logger.project or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_PROJECT
        self.run_id = self._run_id(experiment, cfg.run.name)
        self.last_step = self._last_steps()
        self._log_config(public_config(cfg_dict))
        print(f"[shardtune] MLflow run {self.run_id} (experiment {experiment}) in {uri}", file=sys.stderr, flush=True)
        for record in self.run_dir.read_metrics():  # what the checkpoint holds and the store does not yet
            self.log(record)

    def _run_id(self, experiment_name: str, run_name: str) -> str:
        from mlflow.exceptions import MlflowException

        id_file = self.run_dir.mlflow_run_id
        if id_file.exists():
            run_id = id_file.read_text().strip()
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except MlflowException as err:  # another tracking URI than the earlier launches'
                print(f"[shardtune] MLflow: run {run_id} is not in this store ({err.message}); starting a new run",
                      file=sys.stderr, flush=True)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(experiment_name)
        run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
        id_file.write_text(run_id)
        return run_id

    def _last_steps(self) -> Dict[str, int]:
        """The last step the store holds for each metric of this run (nothing for a new run)."""
        keys = self.client.get_run(self.run_id).data.metrics
        return {key: max(m.step for m in self.client.get_metric_history(self.run_id, key)) for key in keys}

    def _log_config(self, config: Dict[str, Any]) -> None:
        """Params are write-once in MLflow: the first launch's stay, a later launch adds only new keys;
        config.json holds the latest launch's whole config."""
        from mlflow.entities import Param

        known = self.client.get_run(self.run_id).data.params
        params = [Param(key, str(value)[:500]) for key, value in flatten(config).items() if key not in known]
        for first in range(0, len(params), 100):  # MLflow's limit per batch
            self.client.log_batch(self.run_id, params=params[first:first + 100])
        self.client.log_dict(self.run_id, config, "config.json")

    def log(self, record):
        from mlflow.entities import Metric

        step, now = record["step"], int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in tracker_metrics(record).items()
                   if step > self.last_step.get(key, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)
            self.last_step.update({m.key: step for m in metrics})

    def log_table(self, name, step, rows):
        if rows:
            self.client.log_dict(self.run_id, rows, f"{name}/step-{step:08d}.json")

    def close(self):
        export = self.run_dir.export
        written_now = self.run_dir.export_record.is_file() and self.run_dir.export_record.stat().st_mtime >= self.started
        if self.cfg.logger.mlflow_log_model and export.is_dir() and written_now:
            self.client.log_artifacts(self.run_id, str(export), "export")
        self.client.set_terminated(self.run_id, "FINISHED")


def flatten(node: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: the config as MLflow params."""
    flat: Dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def wandb_mode(configured: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """(mode for wandb.init, a note to print or None): logger.mode when set, else WANDB_MODE (wandb
    reads it itself: None), else online when wandb finds an API key, else offline with a note.

    wandb itself would go online and then fail without a key; a run that cannot log online should
    still train, and say how to go online.
    """
    if configured:
        return configured, None
    if os.environ.get("WANDB_MODE"):
        return None, None
    from wandb.errors import AuthenticationError

    try:
        if wandb_logged_in():
            return "online", None
        why = "no API key found (WANDB_API_KEY, ~/.netrc)"
    except AuthenticationError as err:  # a malformed key: wandb's message names the problem, never the key
        why = f"the API key found is not valid ({err})"
    return "offline", (f"[shardtune] W&B: {why}, logging offline; to log online run `wandb login` or set "
                       "WANDB_API_KEY (with WANDB_MODE=offline this note goes)")


def wandb_logged_in() -> bool:
    """Whether wandb has credentials for its host: WANDB_API_KEY, an identity token file, the host's
    ~/.netrc entry (`wandb login`) or its settings file. Local files only: no server, no prompt, and
    the session is left as it was (wandb.init logs in itself)."""
    import wandb

    settings = wandb.setup().settings
    try:
        from wandb.sdk.lib import wbauth
    except ImportError:  # an older wandb, without wbauth: the two usual places, read here
        return _key_in_env_or_netrc(settings.base_url)
    host = wbauth.HostUrl(settings.base_url, app_url=settings.app_url)
    return wbauth.authenticate_session(host=host, source="shardtune", prompt=False, update_session=False) is not None


def _key_in_env_or_netrc(base_url: str) -> bool:
    import netrc
    from urllib.parse import urlsplit

    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        entry = netrc.netrc(os.environ.get("NETRC")).authenticators(urlsplit(base_url).netloc)
    except (OSError, netrc.NetrcParseError):
        return False
    return bool(entry and entry[2])


def announce_run(run, run_dir: Path, run_id: str) -> Dict[str, Any]:
    """Say once where the W&B run is (its URL, or its offline folder and how to upload it) and
    record it in the run directory (RunDir.wandb_run)."""
    facts: Dict[str, Any] = {"run_id": run_id, "mode": str(run.settings.mode), "project": run.project,
                             "entity": run.entity or None, "group": run.group or None, "tags": list(run.tags or ())}
    if run.disabled:
        return facts
    if run.offline:
        # Every launch of a resumed run has a folder of its own: upload them all, oldest first.
        every_launch = f"{shlex.quote(str(RunDir(run_dir).wandb))}/offline-run-*-{run_id}"
        facts.update(offline_dir=run.settings.sync_dir, sync_command=f"wandb sync {every_launch}")
        line = f"[shardtune] W&B offline run in {run.settings.sync_dir}; upload with: {facts['sync_command']}"
    else:
        facts["url"] = run.url
        line = f"[shardtune] W&B run: {run.url}"
    print(line, file=sys.stderr, flush=True)
    RunDir(run_dir).wandb_run.write_text(json.dumps(facts, indent=2) + "\n")
    return facts


class Sinks:
    """Fan out to several sinks."""

    def __init__(self, sinks: List[MetricSink]):
        self.sinks = sinks

    def log(self, record):
        for sink in self.sinks:
            sink.log(record)

    def log_table(self, name, step, rows):
        for sink in self.sinks:
            sink.log_table(name, step, rows)

    def close(self):
        for sink in self.sinks:
            sink.close()


def build_sinks(cfg: RootConfig, cfg_dict: Dict[str, Any], run_dir: Path, is_main: bool, resume_step: int) -> Sinks:
    """Rank 0: metrics.jsonl, the progress bar, then each tracker of logger.backends; other ranks: nothing.
    The trackers come after JsonlSink: it drops the lines after the checkpoint they replay from."""
    if not is_main:
        return Sinks([NullSink()])
    sinks: List[MetricSink] = [JsonlSink(RunDir(run_dir).metrics, resume_step),
                               ProgressBar(cfg.train.max_steps, resume_step)]
    for tracker in cfg.logger.trackers:
        if tracker == "wandb" and cfg.logger.mode != "disabled":
            os.environ.setdefault("WANDB_SILENT", "true")
            sinks.append(WandbSink(cfg, cfg_dict, run_dir))
        elif tracker == "tensorboard":
            sinks.append(TensorBoardSink(cfg_dict, run_dir, resume_step))
        elif tracker == "mlflow":
            sinks.append(MlflowSink(cfg, cfg_dict, run_dir))
    return Sinks(sinks)
