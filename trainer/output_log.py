"""Keep what a process prints in the run directory's logs/ while it still reaches the terminal.

Two users, one bounded file writer:
  * the launcher (`tee_output`): what it prints itself, copied into logs/launcher.log;
  * every rank (`tee_rank_output`): its stdout and stderr copied into logs/rank-<N>.log by a small
    helper process, which outlives the rank: a rank that fails ends with os._exit, and its last
    lines (the traceback) must still reach the file.
A file is capped (LIMIT_BYTES): past the cap it becomes `<name>.1` and a new one starts, so a run
keeps at most twice the cap per file, however long it runs and however many ranks it has.

Torch-free: the launcher imports it.
"""
from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator

LIMIT_BYTES = 16 * 1024 * 1024
CHUNK = 64 * 1024


class BoundedLog:
    """Appends bytes to `path`; past `limit` bytes the file is renamed `<path>.1` and started anew."""

    def __init__(self, path: Path, limit: int = LIMIT_BYTES):
        self.path, self.limit = Path(path), limit
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "ab")
        self.lock = threading.Lock()

    def write(self, data: bytes) -> None:
        with self.lock:
            if self.handle.tell() + len(data) > self.limit and self.handle.tell() > 0:
                self.handle.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self.handle = open(self.path, "ab")
            self.handle.write(data)
            self.handle.flush()  # a killed process keeps every line it printed

    def close(self) -> None:
        with self.lock:
            self.handle.close()


def _write_all(fd: int, data: bytes) -> None:
    """Write to the terminal (or whatever fd is); a reader that went away must not stop the copy."""
    try:
        while data:
            data = data[os.write(fd, data):]
    except OSError:
        pass


def _copy(source: int, terminal: int, log: BoundedLog) -> None:
    while True:
        try:
            data = os.read(source, CHUNK)
        except OSError:
            break
        if not data:
            break
        _write_all(terminal, data)
        log.write(data)
    os.close(source)


class _TeeStream:
    """A text stream that writes to `stream` and to `log`; everything else (fileno, isatty, encoding)
    is the stream's own, so child processes inherit the real terminal, not a pipe into this process."""

    def __init__(self, stream, log: BoundedLog):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        written = self._stream.write(text)
        self._log.write(text.encode("utf-8", "replace"))
        return written

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def tee_output(path: Path) -> Iterator[None]:
    """Copy what this process prints (sys.stdout and sys.stderr) into `path` (appended) while it still
    goes where it went. Only this process's own output: its children (the ranks, which keep their own
    logs/rank-<N>.log) write to the terminal directly, so they never depend on this process staying
    alive to read a pipe (a launcher killed with -9 must not take its orphaned ranks' output with it)."""
    log = BoundedLog(path)
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _TeeStream(sys.stdout, log), _TeeStream(sys.stderr, log)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved
        log.close()


def tee_rank_output(path: Path) -> None:
    """From now on, this process's stdout and stderr also go to `path` (appended, bounded), through a
    helper process that drains them to the end, whatever way this process ends."""
    sys.stdout.flush()
    sys.stderr.flush()
    pipes = [os.pipe(), os.pipe()]
    subprocess.Popen([sys.executable, "-m", "trainer.output_log", str(path),
                      str(pipes[0][0]), str(pipes[1][0])],
                     pass_fds=(pipes[0][0], pipes[1][0]), stdin=subprocess.DEVNULL)
    for fd, (read_end, write_end) in zip((1, 2), pipes):
        os.close(read_end)
        os.dup2(write_end, fd)
        os.close(write_end)
    sys.stdout.reconfigure(line_buffering=True)  # a pipe now: lines must not wait in a block buffer


def _helper(path: str, stdout_source: int, stderr_source: int) -> None:
    """The rank's helper: copy each source to our stdout/stderr (the rank's originals) and the log,
    until the rank has closed both (it exited, however)."""
    for name in ("SIGINT", "SIGTERM", "SIGUSR1", "SIGHUP"):  # the rank handles these; we drain to the end
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    log = BoundedLog(Path(path))
    selector = selectors.DefaultSelector()
    selector.register(stdout_source, selectors.EVENT_READ, 1)
    selector.register(stderr_source, selectors.EVENT_READ, 2)
    while selector.get_map():
        for key, _ in selector.select():
            data = os.read(key.fd, CHUNK)
            if not data:
                selector.unregister(key.fd)
                continue
            _write_all(key.data, data)
            log.write(data)
    log.close()


if __name__ == "__main__":
    _helper(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
