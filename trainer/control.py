"""How a run is told to stop, and how it tells the world it is alive.

A stop request arrives as SIGUSR1/SIGTERM to a rank, or as the file `<run.dir>/control/stop`
(which the launcher writes when it is signalled: the `deepspeed` launcher does not forward
SIGUSR1). The request is local; the loop turns it into a collective decision so that every rank
stops at the same step.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Iterable, Optional

from trainer.run_dir import RunDir, write_atomic

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_NONFINITE = 3
EXIT_HUNG = 4  # the launcher's watchdog found a rank that stopped answering, and ended the job
EXIT_RESUME_ME = 75  # EX_TEMPFAIL: stopped cleanly at a checkpoint, resume to continue
# Set by a node launcher for its ranks: the node-local folder they beat into (RunDir.node_heartbeats).
# Unset (a hostfile launch over ssh, workers started by hand): the shared RunDir.heartbeats.
HEARTBEAT_DIR_ENV = "SHARDTUNE_HEARTBEAT_DIR"


def control_dir(run_dir: Path) -> Path:
    return RunDir(run_dir).control


def record_exit(run_dir: Path, code: int, detail: str = "") -> None:
    """control/exit.json: how the run ended, for the launcher (atomic: a reader never sees half of it)."""
    control_dir(run_dir).mkdir(parents=True, exist_ok=True)
    write_atomic(RunDir(run_dir).exit_record, json.dumps({"code": code, "detail": detail}))


def recorded_exit(run_dir: Path) -> Optional[int]:
    """The code in control/exit.json; None if there is none, or it was cut short (a full disk)."""
    try:
        return int(json.loads(RunDir(run_dir).exit_record.read_text())["code"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def record_resume_decision(run_dir: Path, resume_from: Optional[Path], universal: bool, reason: str) -> None:
    """control/resume.json: what the workers of this launch resume from (an absolute checkpoint folder,
    or null for a fresh start). Written by the launcher, the one place that decides; ranks obey it."""
    control_dir(run_dir).mkdir(parents=True, exist_ok=True)
    decision = {"resume_from": str(resume_from) if resume_from else None, "universal": universal,
                "reason": reason, "decided_by": launcher_identity(), "time": time.time()}
    write_atomic(RunDir(run_dir).resume_decision, json.dumps(decision, indent=1) + "\n")


def resume_decision(run_dir: Path) -> Optional[dict]:
    """The launcher's decision for this launch; None if no launcher wrote one."""
    return RunDir(run_dir).read_json(RunDir(run_dir).resume_decision)


def stop_file(run_dir: Path) -> Path:
    return RunDir(run_dir).stop_request


def request_stop(run_dir: Path, reason: str) -> None:
    """Ask every rank of the run to checkpoint and stop (used by launchers and users alike)."""
    control_dir(run_dir).mkdir(parents=True, exist_ok=True)
    stop_file(run_dir).write_text(reason)


# "host:pid" of the shardtune launcher that started this rank (set by launcher/local.py).
LAUNCHER_ENV = "SHARDTUNE_LAUNCHER"


def launcher_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def launcher_gone(identity: Optional[str]) -> bool:
    """Whether the launcher named by `identity` ("host:pid") has died on this host (kill -9, a
    closed terminal). Another host's launcher, or none (a user's own deepspeed/torchrun), is never
    judged gone."""
    host, _, pid = (identity or "").rpartition(":")
    if not pid.isdigit() or host != socket.gethostname():
        return False
    return process_state(int(pid)) in ("gone", "zombie")


class StopRequest:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.signal_name: Optional[str] = None
        self.launcher = os.environ.get(LAUNCHER_ENV)
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name

    def requested(self) -> bool:
        # An orphaned rank would train on unwatched, and race a relaunch for the run directory.
        return self.signal_name is not None or stop_file(self.run_dir).exists() or launcher_gone(self.launcher)

    def reason(self) -> str:
        if self.signal_name:
            return self.signal_name
        path = stop_file(self.run_dir)
        if path.exists():
            return path.read_text().strip()
        if launcher_gone(self.launcher):
            return f"the launcher ({self.launcher}) is gone"
        return "stop requested"


_ACTIVE: list = []  # this process's Heartbeat, once a rank has one (progress() touches it)


def progress() -> None:
    """Still working: called from inside long loops that know nothing of ranks (data preparation per
    chunk, a wait for another node's preparation per poll, a reference pass per batch). A no-op
    outside a rank; cheap inside (the heartbeat's writer thread bounds the file writes)."""
    if _ACTIVE:
        _ACTIVE[-1].touch()


class Heartbeat:
    """`rank{r}.json`: the step and phase this rank is in, and when it last moved, in the folder its
    launcher chose: node-local storage under a node launcher of ours (the shared filesystem sees
    none of it; the launcher copies a summary there every 30 s), else `<run.dir>/heartbeats/`.

    `beat` and `touch` only note that in memory: they run per micro-batch, per eval batch, per generated
    token. A writer thread puts it in the file at most every `write_every_s`, and only when it changed
    since the last write. So the shared run directory sees one small write per rank every few seconds at
    most, not three per micro-batch (at 512 ranks and 16 accumulation steps that was ~25,000 renames
    per optimizer step on a filesystem every other job shares); and a rank whose main thread stops (a
    hang, SIGSTOP) still goes silent, since its writer has nothing new to write. The watchdog's limit
    (cluster.heartbeat_timeout_s, minutes) dwarfs the delay."""

    WRITE_EVERY_S = 2.0

    def __init__(self, run_dir: Path, rank: int, write_every_s: float = WRITE_EVERY_S):
        self.path = rank_heartbeat(heartbeat_folder(run_dir), rank)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.step, self.phase, self.time = 0, "start", time.time()
        self._changes = self._written = 0  # beats and touches noted / the count at the last write
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._write()  # the launcher sees this rank from its start
        _ACTIVE[:] = [self]
        threading.Thread(target=self._write_every, args=(write_every_s,), name="heartbeat-writer",
                         daemon=True).start()

    def beat(self, step: int, phase: str) -> None:
        with self._lock:
            self.step, self.phase, self.time = step, phase, time.time()
            self._changes += 1

    def touch(self) -> None:
        """Still alive, same step and phase (inside long phases: evaluation, generation, a save)."""
        with self._lock:
            self.time = time.time()
            self._changes += 1

    def finish(self, step: int) -> None:
        """The last word, written at once: "done" (the launcher's watchdog stops watching this rank)."""
        self.beat(step, "done")
        self._closed.set()
        self.flush()

    def flush(self) -> None:
        """Write what changed since the last write, now."""
        with self._lock:
            if self._changes != self._written:
                self._write()

    def _write(self) -> None:  # with self._lock held (or before the writer starts)
        tmp = self.path.with_suffix(".tmp")
        text = json.dumps({"rank": self.rank, "step": self.step, "phase": self.phase, "time": self.time,
                           "pid": os.getpid()})
        try:
            tmp.write_text(text)
        except FileNotFoundError:  # the folder was cleared (node-local storage, a launcher's cleanup)
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(text)
        os.replace(tmp, self.path)
        self._written = self._changes

    def _write_every(self, interval_s: float) -> None:
        while not self._closed.wait(interval_s):
            try:
                self.flush()
            except OSError:
                pass  # a full or lost disk: the rank's own writes say so; the watchdog sees the silence

    @contextlib.contextmanager
    def keepalive(self, limit_s: float, every_s: float = 1.0):  # a touch is in memory: cheap
        """Touch the heartbeat from a thread while this one runs a long phase that cannot beat
        (a checkpoint save or an export of a large model on slow storage is not a hang), for up
        to `limit_s`; after that the watchdog judges the silence as usual. A rank stuck in a
        collective meanwhile still fails by the collective's own timeout (cluster.timeout_s)."""
        done = threading.Event()

        def touch_until_done():
            end = time.monotonic() + limit_s
            while not done.wait(every_s) and time.monotonic() < end:
                self.touch()

        thread = threading.Thread(target=touch_until_done, name="heartbeat-keepalive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()


def process_state(pid: int) -> str:
    """'running', 'stopped' (SIGSTOP), 'zombie', 'gone' ... from /proc (Linux); '' where unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return "gone" if Path("/proc").is_dir() else ""
    return {"R": "running", "S": "sleeping", "D": "in I/O", "T": "stopped", "t": "stopped (traced)",
            "Z": "zombie"}.get(fields[0], fields[0])


# Set by a no-ssh node launcher on its processes: "ADDR:PORT/NODE_RANK". On one host standing in
# for several nodes, the other node ranks of the same rendezvous are peers, not an earlier launch.
NODE_ENV = "SHARDTUNE_NODE"


def node_identity(addr: str, port: int, node_rank: int) -> str:
    return f"{addr}:{port}/{node_rank}"


def node_of(pid: int) -> Optional[str]:
    """The NODE_ENV value a process was started with, None if none or unreadable."""
    try:
        variables = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    prefix = NODE_ENV + "="
    return next((v[len(prefix):] for v in variables if v.startswith(prefix)), None)


def is_peer_node(pid: int, node: Optional[str]) -> bool:
    """True for a process of another node rank of the rendezvous `node` ("ADDR:PORT/RANK")."""
    if node is None:
        return False
    theirs = node_of(pid)
    if theirs is None:
        return False
    (where, _, rank), (their_where, _, their_rank) = node.rpartition("/"), theirs.rpartition("/")
    return where == their_where and rank != their_rank


def _this_process_and_ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:  # /proc/PID/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_of_run(run_dir: Path, node: Optional[str] = None) -> list[tuple[int, str]]:
    """(pid, command line) of this host's processes started with `--run-dir RUN_DIR` (ranks, and
    the deepspeed launchers between them and us), from /proc; [] where there is no /proc.
    With `node` ("ADDR:PORT/RANK"), the processes of the other node ranks of that rendezvous are left out."""
    wanted = str(Path(run_dir).resolve())
    ours = _this_process_and_ancestors()  # a wrapper that started us with --run-dir is no earlier launch
    found = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit() or int(entry.name) in ours:
            continue
        try:
            args = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(a == "--run-dir" and i + 1 < len(args) and args[i + 1] == wanted for i, a in enumerate(args)) \
                and process_state(int(entry.name)) not in ("gone", "zombie") \
                and not is_peer_node(int(entry.name), node):
            found.append((int(entry.name), " ".join(a for a in args if a)))
    return found


def heartbeat_folder(run_dir: Path) -> Path:
    """Where this process's ranks beat: the folder its launcher named, else the shared one."""
    chosen = os.environ.get(HEARTBEAT_DIR_ENV)
    return Path(chosen) if chosen else RunDir(run_dir).heartbeats


def rank_heartbeat(folder: Path, rank: int) -> Path:
    return Path(folder) / f"rank{rank}.json"


def _read_json_files(paths: Iterable[Path]) -> list:
    found = []
    for path in paths:
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return found


def read_heartbeats(run_dir: Path, ranks: Optional[Iterable[int]] = None, folder: Optional[Path] = None) -> list[dict]:
    """The ranks' last heartbeats in `folder` (default: heartbeat_folder). `ranks`: only these; a node's
    launcher reads its own node's, from node-local storage."""
    folder = heartbeat_folder(run_dir) if folder is None else Path(folder)
    paths = sorted(folder.glob("rank*.json")) if ranks is None else [rank_heartbeat(folder, r) for r in ranks]
    return _read_json_files(paths)


def known_heartbeats(run_dir: Path) -> list[dict]:
    """Everything known of every rank from here, newest per rank: this process's folder, the shared
    one, this machine's node-local one, and the node launchers' summaries (for other nodes' ranks)."""
    rd = RunDir(run_dir)
    beats = _read_json_files(rd.node_summaries())
    beats = [b for summary in beats for b in summary.get("ranks", [])]
    for folder in {heartbeat_folder(run_dir), rd.heartbeats, rd.node_heartbeats}:
        beats += read_heartbeats(run_dir, folder=folder)
    newest: dict = {}
    for beat in beats:
        if "rank" in beat and "time" in beat and beat["time"] >= newest.get(beat["rank"], {}).get("time", -1):
            newest[beat["rank"]] = beat
    return [newest[r] for r in sorted(newest)]


def write_node_summary(run_dir: Path, folder: Path, first_rank: int, ranks: Optional[Iterable[int]] = None) -> None:
    """Copy a node's heartbeats (node-local) into the shared run directory, as one small file."""
    beats = read_heartbeats(run_dir, ranks, folder)
    path = RunDir(run_dir).node_summary(first_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps({"host": socket.gethostname(), "time": time.time(), "ranks": beats}))


def stale_ranks(run_dir: Path, timeout_s: float, now: Optional[float] = None,
                ranks: Optional[Iterable[int]] = None, folder: Optional[Path] = None) -> list[dict]:
    """Heartbeats of live ranks silent for more than `timeout_s`, oldest first (finished ranks excluded)."""
    now = time.time() if now is None else now
    silent = [b for b in read_heartbeats(run_dir, ranks, folder)
              if b.get("phase") != "done" and now - b["time"] > timeout_s and process_state(b["pid"]) != "gone"]
    return sorted(silent, key=lambda b: (b["step"], b["time"]))


def describe_rank(beat: dict, now: float) -> str:
    state = process_state(beat["pid"])
    return (f"rank {beat['rank']} (pid {beat['pid']}{', ' + state if state else ''}): last heartbeat "
            f"{now - beat['time']:.0f}s ago at step {beat['step']}, phase {beat['phase']}")


def likely_stuck(beats: list[dict]) -> list[dict]:
    """The culprits among `beats`: stopped processes for certain, else the ranks furthest behind,
    else the one silent the longest (ranks waiting in a collective for it have beaten since)."""
    if not beats:
        return []
    stopped = [b for b in beats if process_state(b["pid"]).startswith("stopped")]
    behind = [b for b in beats if b["step"] < max(x["step"] for x in beats)]
    return stopped or behind or [min(beats, key=lambda b: (b["step"], b["time"]))]


def describe_stragglers(run_dir: Path) -> str:
    """Name the ranks that are behind or silent: the likely culprits of a collective timeout."""
    beats = known_heartbeats(run_dir)
    if not beats:
        return "no heartbeats found"
    now = time.time()
    names = "; ".join(describe_rank(b, now) for b in likely_stuck(beats))
    return f"likely stuck: {names}\nall ranks:\n" + "\n".join("  " + describe_rank(b, now) for b in beats)
