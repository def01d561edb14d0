"""A real, local Slurm cluster for tests (stdlib only).

``LocalSlurm`` starts munged, slurmctld and two emulated compute nodes (``slurmd -N n1`` and
``slurmd -N n2``, Debian's build has multiple-slurmd support) on this one machine, waits until
both nodes are idle, and stops everything on exit. Facts it relies on are in
``/work/shared/notes/local-slurm.md`` (Debian 12, Slurm 22.05, munge 0.5.15, as root, no systemd,
no cgroups).

Typical use::

    from slurm_harness import LocalSlurm, ensure_slurm_installed

    ensure_slurm_installed()
    with LocalSlurm() as cluster:
        job_id = cluster.sbatch(["-N2", "--ntasks-per-node=1", "job.sh"])
        cluster.wait_job(job_id, "COMPLETED", timeout=30)

Design choices
--------------
* Everything the cluster writes (munge key, socket, pid files, logs, slurm.conf, state and spool
  folders) lives in one state folder the harness owns; it is deleted on exit. The default folder
  is fixed (``<tmp>/shardtune-local-slurm-<uid>``) so that a later session can find and clean up
  what a crashed one left behind.
* An exclusive ``flock`` on ``<state dir>.lock`` is held for the whole life of the cluster. A second
  harness with the same state folder (another engineer's test session on the same machine) waits
  for it instead of killing a live cluster. The kernel drops the lock when its holder dies, so once
  we hold it, any daemon or job process still tied to the state folder (pid files, command lines
  naming the folder, or ``SLURM_CONF=<our slurm.conf>`` in its environment) is a leftover of a
  crashed session and is killed before starting.
* Clients need ``SLURM_CONF``: ``.env`` is a complete environment (a copy of ``os.environ`` without
  inherited ``SLURM_*``/``SBATCH_*``/``SALLOC_*``/``SRUN_*`` variables, plus ``SLURM_CONF``) that can
  be passed as ``env=`` to ``subprocess``; ``.client_env`` holds just the added variables.
* The emulated node names n1 and n2 do not resolve. By default the harness does NOT touch
  ``/etc/hosts``: code that turns a node list into an address (``launcher/slurm_env.py``) must cope
  the way it has to on real clusters where node names are not in DNS, and the tests should exercise
  that path; /etc/hosts is also global state shared with everything else on the machine.
  ``LocalSlurm(add_hosts_entry=True)`` appends ``127.0.0.1 n1 n2`` when /etc/hosts is writable and
  a name is missing, and removes exactly that line on exit.
* Daemons run in their normal daemon mode and are stopped through their pid files (SIGTERM, then
  SIGKILL). A process in state ``Z`` counts as stopped: on this kind of machine pid 1 does not
  always reap orphans promptly.
"""

from __future__ import annotations

import atexit
import errno
import fcntl
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = [
    "SlurmHarnessError",
    "SlurmNotInstalled",
    "LocalSlurm",
    "ensure_slurm_installed",
    "slurm_installed",
    "parse_scontrol_record",
    "TERMINAL_JOB_STATES",
]

APT_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
SBIN_DIRS = ("/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/sbin", "/usr/local/bin")

# Job states from which a job does not move on by itself (a requeue moves it back to PENDING).
TERMINAL_JOB_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "BOOT_FAIL",
        "DEADLINE",
        "PREEMPTED",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


class SlurmHarnessError(RuntimeError):
    """The local cluster could not be started, queried or stopped."""


class SlurmNotInstalled(SlurmHarnessError):
    """Slurm is missing and cannot be installed here (not root)."""


# --------------------------------------------------------------------------------------------
# Installation
# --------------------------------------------------------------------------------------------


def _which(name: str) -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN_DIRS)
    return shutil.which(name, path=path)


def slurm_installed() -> bool:
    """True when the daemons and the client commands this harness uses are all present."""
    return all(_which(n) for n in ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sinfo"))


def ensure_slurm_installed(timeout: float = 900) -> None:
    """Install Debian's Slurm and munge packages when ``slurmctld`` is missing.

    Runs ``apt-get update && apt-get install -y --no-install-recommends slurmctld slurmd
    slurm-client munge`` (non-interactive). Needs root; raises ``SlurmNotInstalled`` otherwise.
    """
    if slurm_installed():
        return
    if os.geteuid() != 0:
        raise SlurmNotInstalled(
            "Slurm is not installed (no slurmctld/slurmd/munged/sbatch on PATH) and this process is "
            "not root, so it cannot install it. Install the Debian packages first: "
            "sudo apt-get install -y --no-install-recommends " + " ".join(APT_PACKAGES)
        )
    apt = _which("apt-get")
    if not apt:
        raise SlurmNotInstalled("Slurm is not installed and apt-get is not available to install it")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in ([apt, "update"], [apt, "install", "-y", "--no-install-recommends", *APT_PACKAGES]):
        proc = subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise SlurmNotInstalled(
                f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n"
                f"{_tail_text(proc.stdout, 20)}\n{_tail_text(proc.stderr, 20)}"
            )
    if not slurm_installed():
        raise SlurmNotInstalled(
            "apt-get installed " + " ".join(APT_PACKAGES) + " but slurmctld/slurmd/munged/sbatch "
            "are still not found on PATH or in " + ", ".join(SBIN_DIRS)
        )


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _tail_text(text: str, lines: int) -> str:
    return "\n".join((text or "").splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 30) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 64 * 1024))
            data = fh.read().decode("utf-8", "replace")
    except OSError as exc:
        return f"<cannot read: {exc}>"
    return _tail_text(data, lines) or "<empty>"


def _proc_state(pid: int) -> str | None:
    """The one-letter state of a process, or None when it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read().decode("utf-8", "replace")
    except (FileNotFoundError, ProcessLookupError):
        return None
    except OSError:
        return None
    # "pid (comm) S ..." where comm may itself contain spaces or parentheses.
    try:
        return data[data.rindex(")") + 2]
    except (ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """Running (exists and is not a zombie)."""
    state = _proc_state(pid)
    return state is not None and state not in ("Z", "X")


def _proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _proc_environ(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/environ", "rb") as fh:
            return fh.read().split(b"\0")
    except OSError:
        return []


def _ancestors(pid: int) -> set[int]:
    seen = set()
    while pid > 1 and pid not in seen:
        seen.add(pid)
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                data = fh.read().decode("utf-8", "replace")
            pid = int(data[data.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return seen


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
    except PermissionError:
        pass


def _stop_pids(pids: Iterable[int], term_wait: float = 10.0, kill_wait: float = 5.0) -> list[int]:
    """SIGTERM, wait, SIGKILL, wait. Returns the pids still running afterwards (zombies count as stopped)."""
    pids = [p for p in set(pids) if p > 1 and p != os.getpid()]
    live = [p for p in pids if _alive(p)]
    for sig, wait in ((signal.SIGTERM, term_wait), (signal.SIGKILL, kill_wait)):
        for p in live:
            _signal(p, sig)
        deadline = time.monotonic() + wait
        while live and time.monotonic() < deadline:
            time.sleep(0.05)
            live = [p for p in live if _alive(p)]
        if not live:
            break
    return live


def _read_pid_file(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        pid = int(text.split()[0])
    except (ValueError, IndexError):
        return None
    return pid if pid > 1 else None


def _port_in_use(port: int) -> bool:
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET, "127.0.0.1")):
        s = socket.socket(family, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((addr, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
        finally:
            s.close()
    return False


_RECORD_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w/:.\-]*)=")


def parse_scontrol_record(text: str) -> dict[str, str]:
    """Parse one ``scontrol show ... -o`` record (``Key=Value Key=Value ...``) into a dict.

    Values may contain ``=`` (``TRES=cpu=2,node=2``); a new key starts only after whitespace.
    Multi-line (non ``-o``) output works as well.
    """
    text = text.strip()
    matches = list(_RECORD_KEY.finditer(text))
    out: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        out[m.group(1)] = text[m.end() : end].strip()
    return out


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


class LocalSlurm:
    """A real Slurm cluster on this machine: munged, slurmctld and one slurmd per emulated node.

    Parameters
    ----------
    state_dir: folder the harness owns (deleted and recreated on start, deleted on exit unless
        ``keep_state``). Default ``<tmp>/shardtune-local-slurm-<uid>`` (fixed, so leftovers of a
        crashed session are found and killed).
    nodes: emulated node names; each gets ``cpus_per_node`` CPUs (``config_overrides``).
    ctld_port: slurmctld port; node i listens on ``ctld_port + 1 + i``.
    start_timeout: seconds to wait for all nodes to be idle.
    lock_timeout: seconds to wait for another live harness using the same state folder.
    add_hosts_entry: append ``127.0.0.1 <nodes>`` to /etc/hosts if writable and missing (off by default).
    extra_conf: extra ``slurm.conf`` lines (appended, so they may override the defaults).
    install: call ``ensure_slurm_installed()`` on start.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike | None = None,
        *,
        nodes: Sequence[str] = ("n1", "n2"),
        cpus_per_node: int = 2,
        partition: str = "debug",
        cluster_name: str = "shardtune",
        ctld_port: int = 16817,
        start_timeout: float = 60.0,
        lock_timeout: float = 600.0,
        add_hosts_entry: bool = False,
        keep_state: bool = False,
        extra_conf: Sequence[str] = (),
        install: bool = True,
        debug_level: str = "info",
    ) -> None:
        if state_dir is None:
            state_dir = Path(tempfile.gettempdir()) / f"shardtune-local-slurm-{os.geteuid()}"
        self.state_dir = Path(state_dir).absolute()
        self.nodes = list(nodes)
        if not self.nodes:
            raise ValueError("LocalSlurm needs at least one node")
        self.cpus_per_node = int(cpus_per_node)
        self.partition = partition
        self.cluster_name = cluster_name
        self.ctld_port = int(ctld_port)
        self.node_ports = {n: self.ctld_port + 1 + i for i, n in enumerate(self.nodes)}
        self.start_timeout = float(start_timeout)
        self.lock_timeout = float(lock_timeout)
        self.add_hosts_entry = add_hosts_entry
        self.keep_state = keep_state
        self.extra_conf = list(extra_conf)
        self.install = install
        self.debug_level = debug_level

        d = self.state_dir
        self.conf_path = d / "etc" / "slurm.conf"
        self.munge_dir = d / "munge"
        self.munge_key = self.munge_dir / "munge.key"
        self.munge_socket = self.munge_dir / "munge.socket.2"
        self.munge_pid_file = self.munge_dir / "munged.pid"
        self.munge_log = d / "log" / "munged.log"
        self.munge_seed = self.munge_dir / "munged.seed"
        self.ctld_pid_file = d / "run" / "slurmctld.pid"
        self.ctld_log = d / "log" / "slurmctld.log"
        self.lock_path = d.with_name(d.name + ".lock")

        self.env: dict[str, str] = {}
        self.client_env: dict[str, str] = {}
        self.timings: dict[str, float] = {}
        self._lock_fd: int | None = None
        self._hosts_line: str | None = None
        self._started = False
        self._atexit_registered = False

    # ---- paths -------------------------------------------------------------------------

    def slurmd_pid_file(self, node: str) -> Path:
        return self.state_dir / "run" / f"slurmd-{node}.pid"

    def slurmd_log(self, node: str) -> Path:
        return self.state_dir / "log" / f"slurmd-{node}.log"

    @property
    def log_files(self) -> dict[str, Path]:
        logs = {"munged": self.munge_log, "slurmctld": self.ctld_log}
        logs.update({f"slurmd-{n}": self.slurmd_log(n) for n in self.nodes})
        for p in sorted((self.state_dir / "log").glob("*.stdout")):
            logs[p.name] = p
        return logs

    def log_tails(self, lines: int = 25) -> str:
        parts = []
        for name, path in self.log_files.items():
            parts.append(f"----- {name} ({path}) -----\n{_tail_file(path, lines)}")
        return "\n".join(parts)

    # ---- context manager ---------------------------------------------------------------

    def __enter__(self) -> "LocalSlurm":
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> "LocalSlurm":
        if self._started:
            return self
        t0 = time.monotonic()
        if self.install:
            ensure_slurm_installed()
        self.timings["install_s"] = time.monotonic() - t0
        if not slurm_installed():
            raise SlurmNotInstalled("Slurm is not installed (slurmctld/slurmd/munged/sbatch missing)")
        self._acquire_lock()
        try:
            t1 = time.monotonic()
            self._cleanup_leftovers()
            self.timings["cleanup_s"] = time.monotonic() - t1
            t_start = time.monotonic()
            self._prepare_state_dir()
            self._make_env()
            self._check_ports()
            if not self._atexit_registered:
                atexit.register(self.stop)
                self._atexit_registered = True
            self._started = True
            self._start_munged()
            self._write_conf()
            self._start_slurmctld()
            for node in self.nodes:
                self._start_slurmd(node)
            self._maybe_add_hosts_entry()
            self._wait_nodes_idle()
            self.timings["start_to_idle_s"] = time.monotonic() - t_start
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons through their pid files, remove the state folder."""
        if self._atexit_registered:
            try:
                atexit.unregister(self.stop)
            except Exception:
                pass
            self._atexit_registered = False
        if not self._started and self._lock_fd is None:
            return
        t0 = time.monotonic()
        try:
            if self._started:
                self._cancel_all_jobs()
                self._stop_daemons()
                self._kill_strays()
                self._remove_hosts_entry()
                if not self.keep_state:
                    shutil.rmtree(self.state_dir, ignore_errors=True)
        finally:
            self._started = False
            self._release_lock()
            self.timings["stop_s"] = time.monotonic() - t0

    # ---- locking and leftovers ----------------------------------------------------------

    def _acquire_lock(self) -> None:
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise SlurmHarnessError(
                        f"another live LocalSlurm holds {self.lock_path} (state folder "
                        f"{self.state_dir}) for more than {self.lock_timeout:.0f} s; pass a "
                        f"different state_dir and ctld_port to run a second cluster"
                    )
                time.sleep(0.5)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            finally:
                os.close(self._lock_fd)
                self._lock_fd = None

    def _pid_files(self) -> list[tuple[Path, str]]:
        files = [(self.slurmd_pid_file(n), "slurmd") for n in self.nodes]
        run = self.state_dir / "run"
        if run.is_dir():  # also nodes of an earlier harness with other node names
            for p in run.glob("slurmd-*.pid"):
                if (p, "slurmd") not in files:
                    files.append((p, "slurmd"))
        files += [(self.ctld_pid_file, "slurmctld"), (self.munge_pid_file, "munged")]
        return files

    def _owned_processes(self) -> list[int]:
        """Pids tied to our state folder.

        Daemons (munged, slurmctld, slurmd, slurmstepd) whose command line names the folder, and job
        processes: environment has ``SLURM_CONF=<our slurm.conf>`` and a ``SLURM_JOB_ID``. A user's
        shell or ``tail -f`` of a log is left alone.
        """
        me = _ancestors(os.getpid())
        needle_dir = str(self.state_dir) + "/"
        needle_env = f"SLURM_CONF={self.conf_path}".encode()
        daemons = {"munged", "slurmctld", "slurmd", "slurmstepd"}
        pids = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            if pid in me or pid <= 1 or not _alive(pid):
                continue
            cmdline = _proc_cmdline(pid)
            argv0 = os.path.basename(cmdline.split(" ", 1)[0]) if cmdline else ""
            environ = _proc_environ(pid)
            if argv0.rstrip(":") in daemons and (needle_dir in cmdline + " " or needle_env in environ):
                pids.append(pid)
                continue
            if needle_env in environ and any(e.startswith(b"SLURM_JOB_ID=") for e in environ):
                pids.append(pid)
        return pids

    def _cleanup_leftovers(self) -> None:
        """Kill daemons and job processes of an earlier (crashed) harness with this state folder."""
        pids = []
        for path, name in self._pid_files():
            pid = _read_pid_file(path)
            # A stale pid file may name a pid reused by an unrelated process: check the name.
            if pid and _alive(pid) and name in _proc_cmdline(pid):
                pids.append(pid)
        # Daemons first (so that slurmd does not restart steps), then anything else of ours.
        survivors = _stop_pids(pids)
        survivors += _stop_pids(self._owned_processes(), term_wait=0.5)
        if survivors:
            raise SlurmHarnessError(
                f"could not stop leftover processes of an earlier cluster in {self.state_dir}: "
                + ", ".join(f"{p} ({_proc_cmdline(p)})" for p in survivors)
            )

    def _kill_strays(self) -> None:
        left = _stop_pids(self._owned_processes(), term_wait=0.5)
        if left:  # do not fail the test session for this, but make it visible
            print(f"slurm_harness: processes still running after stop: {left}")

    # ---- set-up -------------------------------------------------------------------------

    def _check_parent_dirs(self) -> None:
        # munged refuses a socket below a folder that is not searchable ("x") by everyone
        # (pytest's tmp_path folders are 0700, for example).
        for parent in self.state_dir.parents:
            try:
                mode = parent.stat().st_mode
            except FileNotFoundError:
                continue
            if not mode & 0o001:
                raise SlurmHarnessError(
                    f"state folder {self.state_dir} is below {parent} (mode {oct(mode & 0o7777)}), "
                    f"which is not searchable by everyone; munged refuses such a socket path. Use "
                    f"another folder, or chmod o+x the folders above it (pytest's tmp_path and "
                    f"tempfile.mkdtemp() folders are 0700)"
                )

    def _prepare_state_dir(self) -> None:
        self._check_parent_dirs()
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        for sub in ("etc", "run", "log", "ctld", "spool", "munge", "jobs"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o755)
        # munged insists that the socket's folder is not writable by group/other.
        os.chmod(self.munge_dir, 0o755)

    def _make_env(self) -> None:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_"))
        }
        path = env.get("PATH", "")
        extra = [d for d in SBIN_DIRS if d not in path.split(os.pathsep)]
        env["PATH"] = os.pathsep.join([p for p in [path, *extra] if p])
        self.client_env = {"SLURM_CONF": str(self.conf_path)}
        env.update(self.client_env)
        self.env = env

    def _check_ports(self) -> None:
        busy = [p for p in [self.ctld_port, *self.node_ports.values()] if _port_in_use(p)]
        if busy:
            raise SlurmHarnessError(
                f"TCP port(s) {busy} needed by the local Slurm cluster are in use by another "
                f"process; pass LocalSlurm(ctld_port=...) to use other ports"
            )

    def _user(self) -> str:
        return pwd.getpwuid(os.geteuid()).pw_name

    def _spawn_daemon(self, name: str, argv: list[str], pid_file: Path, timeout: float = 30.0) -> int:
        """Run a daemonising command, wait for its launcher to exit and its pid file to appear."""
        out = self.state_dir / "log" / f"{name}.stdout"
        with open(out, "ab") as fh:
            proc = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.state_dir,
                start_new_session=True,
            )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise SlurmHarnessError(
                f"{name} did not daemonise within {timeout:.0f} s: {shlex.join(argv)}\n{self.log_tails()}"
            )
        if rc != 0:
            raise SlurmHarnessError(
                f"{name} exited with code {rc}: {shlex.join(argv)}\n{self.log_tails()}"
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pid = _read_pid_file(pid_file)
            if pid and _alive(pid):
                return pid
            time.sleep(0.05)
        raise SlurmHarnessError(
            f"{name} wrote no live pid to {pid_file} within {timeout:.0f} s\n{self.log_tails()}"
        )

    def _start_munged(self) -> None:
        with open(self.munge_key, "wb") as fh:
            fh.write(os.urandom(1024))
        os.chmod(self.munge_key, 0o400)
        munged = _which("munged")
        argv = [
            munged,
            f"--socket={self.munge_socket}",
            f"--key-file={self.munge_key}",
            f"--pid-file={self.munge_pid_file}",
            f"--log-file={self.munge_log}",
            f"--seed-file={self.munge_seed}",
        ]
        self._spawn_daemon("munged", argv, self.munge_pid_file)
        deadline = time.monotonic() + 10
        while not self.munge_socket.exists():
            if time.monotonic() > deadline:
                raise SlurmHarnessError(f"munged made no socket {self.munge_socket}\n{self.log_tails()}")
            time.sleep(0.05)

    def conf_text(self) -> str:
        d = self.state_dir
        host = socket.gethostname().split(".")[0]
        user = self._user()
        lines = [
            "# Written by tests/slurm/slurm_harness.py (LocalSlurm); removed when the cluster stops.",
            f"ClusterName={self.cluster_name}",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={self.ctld_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # cred_expire takes effect only on daemon start: it shortens the BeginTime hold of
            # requeued jobs from about 2 minutes to about 12 s (see the note).
            f"AuthInfo=socket={self.munge_socket},cred_expire=10",
            f"StateSaveLocation={d / 'ctld'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={self.ctld_pid_file}",
            f"SlurmdPidFile={d / 'run'}/slurmd-%n.pid",
            f"SlurmctldLogFile={self.ctld_log}",
            f"SlurmdLogFile={d / 'log'}/slurmd-%n.log",
            f"SlurmctldDebug={self.debug_level}",
            f"SlurmdDebug={self.debug_level}",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "MpiDefault=none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            "AccountingStorageType=accounting_storage/none",
            "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "MinJobAge=300",
            "SlurmdParameters=config_overrides",
            "SchedulerParameters=sched_interval=2,bf_interval=1",
            "KillWait=5",
            "InactiveLimit=0",
        ]
        for node in self.nodes:
            lines.append(
                f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 "
                f"Port={self.node_ports[node]} CPUs={self.cpus_per_node} State=UNKNOWN"
            )
        lines.append(
            f"PartitionName={self.partition} Nodes={','.join(self.nodes)} Default=YES "
            f"MaxTime=INFINITE State=UP"
        )
        lines.extend(self.extra_conf)
        return "\n".join(lines) + "\n"

    def _write_conf(self) -> None:
        self.conf_path.write_text(self.conf_text())
        os.chmod(self.conf_path, 0o644)

    def _start_slurmctld(self) -> None:
        argv = [_which("slurmctld"), "-c", "-f", str(self.conf_path)]
        self._spawn_daemon("slurmctld", argv, self.ctld_pid_file)

    def _start_slurmd(self, node: str) -> None:
        argv = [_which("slurmd"), "-N", node, "-f", str(self.conf_path)]
        self._spawn_daemon(f"slurmd-{node}", argv, self.slurmd_pid_file(node))

    def _wait_nodes_idle(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last = ""
        while True:
            proc = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=15)
            last = (proc.stdout + proc.stderr).strip()
            states = {}
            for line in proc.stdout.splitlines():
                parts = line.split()
                if len(parts) == 2:
                    states[parts[0]] = parts[1]
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in self.nodes):
                return
            for name, pid_file in [("slurmctld", self.ctld_pid_file)] + [
                (f"slurmd-{n}", self.slurmd_pid_file(n)) for n in self.nodes
            ]:
                pid = _read_pid_file(pid_file)
                if not pid or not _alive(pid):
                    raise SlurmHarnessError(
                        f"{name} died while waiting for the nodes to become idle; sinfo said:\n"
                        f"{last}\n{self.log_tails()}"
                    )
            if time.monotonic() > deadline:
                raise SlurmHarnessError(
                    f"nodes {self.nodes} not idle after {self.start_timeout:.0f} s; last sinfo:\n"
                    f"{last}\n{self.log_tails()}"
                )
            time.sleep(0.25)

    # ---- /etc/hosts (opt-in) -----------------------------------------------------------

    def _maybe_add_hosts_entry(self) -> None:
        if not self.add_hosts_entry:
            return
        hosts = Path("/etc/hosts")
        if not os.access(hosts, os.W_OK):
            return
        missing = []
        for n in self.nodes:
            try:
                socket.gethostbyname(n)
            except OSError:
                missing.append(n)
        if not missing:
            return
        line = "127.0.0.1 " + " ".join(missing) + "  # shardtune LocalSlurm\n"
        text = hosts.read_text()
        with open(hosts, "a") as fh:
            if text and not text.endswith("\n"):
                fh.write("\n")
            fh.write(line)
        self._hosts_line = line

    def _remove_hosts_entry(self) -> None:
        if not self._hosts_line:
            return
        hosts = Path("/etc/hosts")
        try:
            lines = hosts.read_text().splitlines(keepends=True)
            if self._hosts_line in lines:
                lines.remove(self._hosts_line)
                hosts.write_text("".join(lines))
        except OSError:
            pass
        self._hosts_line = None

    # ---- stopping -----------------------------------------------------------------------

    def _cancel_all_jobs(self, wait: float = 15.0) -> None:
        # Without a slurm.conf, client commands retry for 60 s; without slurmctld they time out.
        ctld = _read_pid_file(self.ctld_pid_file)
        if not self.conf_path.exists() or not ctld or not _alive(ctld):
            return
        proc = self.run(["squeue", "-h", "-o", "%A"], check=False, timeout=15)
        ids = proc.stdout.split()
        if ids:
            self.run(["scancel", *ids], check=False, timeout=15)
        # Wait until nothing is left running, so that no job process outlives slurmd.
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc = self.run(["squeue", "-h", "-t", "R,CG,S,CF", "-o", "%A"], check=False, timeout=15)
            if proc.returncode != 0 or not proc.stdout.strip():
                break
            time.sleep(0.25)

    def _stop_daemons(self) -> None:
        # compute nodes first, then the controller, munged last (the others talk to it).
        for group in (
            [(self.slurmd_pid_file(n), "slurmd") for n in self.nodes],
            [(self.ctld_pid_file, "slurmctld")],
            [(self.munge_pid_file, "munged")],
        ):
            pids = []
            for path, name in group:
                pid = _read_pid_file(path)
                if pid and _alive(pid) and name in _proc_cmdline(pid):
                    pids.append(pid)
            left = _stop_pids(pids)
            if left:
                print(f"slurm_harness: could not stop {left}")

    # ---- client helpers ---------------------------------------------------------------

    def run(
        self,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a command (a list, or a string split with shlex) with the cluster's environment."""
        argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
        full_env = dict(self.env or os.environ)
        if env:
            full_env.update(env)
        proc = subprocess.run(
            argv,
            env=full_env,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
        )
        if check and proc.returncode != 0:
            raise SlurmHarnessError(
                f"{shlex.join(argv)} exited with code {proc.returncode}\n"
                f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    def sbatch(
        self,
        args: str | Sequence[str],
        script: str | None = None,
        *,
        cwd: str | os.PathLike | None = None,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Submit with ``sbatch --parsable ARGS`` (script text on stdin when given); returns the job id."""
        argv = shlex.split(args) if isinstance(args, str) else [str(a) for a in args]
        proc = self.run(["sbatch", "--parsable", *argv], input=script, cwd=cwd, env=env)
        first = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        try:
            return int(first.split(";")[0])
        except ValueError:
            raise SlurmHarnessError(f"cannot read a job id from sbatch output {proc.stdout!r}")

    def scontrol_show_job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol -o show job JOB_ID`` as a dict (empty when the job is unknown)."""
        proc = self.run(["scontrol", "-o", "show", "job", str(job_id)], check=False, timeout=15)
        if proc.returncode != 0:
            if "Invalid job id" in proc.stderr:
                return {}
            raise SlurmHarnessError(f"scontrol show job {job_id} failed: {proc.stderr.strip()}")
        line = proc.stdout.strip().splitlines()[0] if proc.stdout.strip() else ""
        return parse_scontrol_record(line)

    def job_state(self, job_id: int | str) -> str | None:
        """The job's state (``PENDING``, ``RUNNING``, ``COMPLETED``, ...), None when unknown."""
        info = self.scontrol_show_job(job_id)
        state = info.get("JobState")
        return state.split()[0] if state else None

    def wait_job(
        self,
        job_id: int | str,
        states: str | Iterable[str] = ("COMPLETED",),
        timeout: float = 60.0,
        *,
        poll: float = 0.2,
        fail_on_other_terminal: bool = True,
    ) -> str:
        """Wait until the job's state is one of ``states``; returns that state.

        Raises ``SlurmHarnessError`` early when the job ends in another terminal state (unless
        ``fail_on_other_terminal=False``) and ``TimeoutError`` after ``timeout`` seconds.
        """
        wanted = {states} if isinstance(states, str) else set(states)
        wanted = {s.upper() for s in wanted}
        deadline = time.monotonic() + timeout
        state = None
        while True:
            state = self.job_state(job_id)
            if state in wanted:
                return state
            if fail_on_other_terminal and state in TERMINAL_JOB_STATES:
                raise SlurmHarnessError(
                    f"job {job_id} ended {state}, expected {sorted(wanted)}:\n"
                    f"{self.scontrol_show_job(job_id)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout:.0f} s, expected {sorted(wanted)}:\n"
                    f"{self.scontrol_show_job(job_id)}\n{self.log_tails(10)}"
                )
            time.sleep(poll)

    def node_addr(self, name: str) -> str:
        """The NodeAddr of a node as ``scontrol show node`` reports it (n1 -> 127.0.0.1)."""
        proc = self.run(["scontrol", "-o", "show", "node", name], timeout=15)
        addr = parse_scontrol_record(proc.stdout).get("NodeAddr")
        if not addr:
            raise SlurmHarnessError(f"scontrol show node {name} has no NodeAddr:\n{proc.stdout}")
        return addr

    def squeue(self) -> list[dict[str, str]]:
        proc = self.run(["squeue", "-h", "-o", "%A|%T|%j|%N"], timeout=15)
        rows = []
        for line in proc.stdout.splitlines():
            jid, state, name, nodes = (line.split("|") + ["", "", "", ""])[:4]
            rows.append({"job_id": jid, "state": state, "name": name, "nodes": nodes})
        return rows

    def __repr__(self) -> str:
        return f"LocalSlurm(state_dir={str(self.state_dir)!r}, nodes={self.nodes}, started={self._started})"
