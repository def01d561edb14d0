"""Where metrics go. Rank 0 gets real sinks; every other rank gets one that does nothing.

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
from trainer.wandb_history import last_logged_step

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


class WandbSink:
    """W&B on rank 0. The run id lives in the run directory, so a resumed run logs to the same run.

    Only what the config sets is passed to wandb.init, whose arguments override W&B's environment:
    WANDB_PROJECT, WANDB_ENTITY, WANDB_MODE, WANDB_RUN_GROUP and WANDB_TAGS apply to the rest.
    """

    def __init__(self, cfg: RootConfig, cfg_dict: Dict[str, Any], run_dir: Path):
        import wandb

        id_file = RunDir(run_dir).wandb_run_id
        if id_file.exists():
            run_id = id_file.read_text().strip()
        else:
            from wandb.sdk.lib.runid import generate_id  # wandb.util.generate_id is gone in wandb 0.31

            run_id = generate_id()
            id_file.write_text(run_id)
        # Steps an earlier launch already logged (it may have run past the checkpoint we resumed
        # from) are not logged again, so W&B steps stay strictly increasing, none duplicated. Only
        # steps that reached W&B count: those in the local transaction logs of this run (a killed
        # launch loses what wandb-core had not flushed yet) or on the server (`starting_step`).
        logged_on_disk = last_logged_step(RunDir(run_dir).wandb, run_id)
        self.wandb = wandb
        mode, note = wandb_mode(cfg.logger.mode)
        if note:
            print(note, file=sys.stderr, flush=True)
        # wandb.init's arguments override W&B's environment (WANDB_PROJECT, WANDB_ENTITY, ...): pass
        # only what the config sets (None reads the environment), and our default project last.
        project = cfg.logger.project or (None if wandb.setup().settings.project else DEFAULT_PROJECT)
        self.run = wandb.init(project=project, entity=cfg.logger.entity, group=cfg.logger.group,
                              tags=list(cfg.logger.tags) or None, name=cfg.run.name, id=run_id, resume="allow",
                              dir=str(run_dir), mode=mode, config=public_config(cfg_dict))
        announce_run(self.run, run_dir, run_id)
        self.logged_before = max(logged_on_disk, self.run.starting_step - 1)
        self.skipped = 0
        self._backfill(RunDir(run_dir).metrics)

    def _backfill(self, jsonl: Path) -> None:
        """Log the steps up to the resumed checkpoint that metrics.jsonl holds and W&B lost."""
        if jsonl.exists():
            for line in jsonl.read_text().splitlines():
                if line.strip():
                    self.log(json.loads(line))

    def log(self, record):
        data = {f"{record.get('kind', 'train')}/{k}": v for k, v in record.items() if k not in ("kind", "step")}
        step = record["step"]
        if step <= self.logged_before:
            self.skipped += 1
            return
        self.run.log(data, step=step)

    def log_table(self, name, step, rows):
        if rows and step > self.logged_before:
            table = self.wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])
            self.run.log({name: table}, step=step)

    def close(self):
        self.run.finish()


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
    if not is_main:
        return Sinks([NullSink()])
    sinks: List[MetricSink] = [JsonlSink(RunDir(run_dir).metrics, resume_step),
                               ProgressBar(cfg.train.max_steps, resume_step)]
    if cfg.logger.backend == "wandb" and cfg.logger.mode != "disabled":
        os.environ.setdefault("WANDB_SILENT", "true")
        sinks.append(WandbSink(cfg, cfg_dict, run_dir))  # after JsonlSink: it backfills from metrics.jsonl
    return Sinks(sinks)
