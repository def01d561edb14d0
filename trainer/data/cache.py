"""The preparation cache: one folder per (source content, tokenizer, settings), prepared by one
process while the others wait on a lock file.

Waiting is a file-system poll, not a collective: a collective would time out on a large dataset
(cluster.timeout_s) and kill the job; a poll waits as long as the preparer makes progress. On a
cache every node shares, the whole job prepares once. The lock names its holder (host, pid) and is
a lease: the holder renews it (its mtime) every LEASE_RENEW_S. A waiter takes it over when the holder
is gone: at once on the holder's own host (its pid is dead), from any other node once the lock has not
changed for LEASE_EXPIRE_S by the waiter's own clock (clocks of nodes need not agree). So a node that
dies while preparing never blocks the job. Waiters poll less often the longer they wait (up to
MAX_POLL_S): 512 ranks waiting cost a few hundred metadata reads a second, not thousands.
A preparer that fails in strict mode writes the error beside the lock, so every waiter fails with
the same file:line message instead of waiting forever.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

from trainer.config import DataConfig
from trainer.control import progress
from trainer.data.errors import DataError

# Bump when the prepared format or the rendering rules change: old entries then miss.
PIPELINE_VERSION = 5
SETTINGS = ("format", "fields", "loss_on", "max_seq_len", "length_policy", "on_error")
LEASE_RENEW_S = 10.0
LEASE_EXPIRE_S = 120.0  # several renewals missed, and a shared filesystem's attribute caching (~60 s)
MAX_POLL_S = 5.0


def default_cache_dir() -> Path:
    return Path(os.environ.get("SHARDTUNE_DATA_CACHE", Path.home() / ".cache" / "shardtune" / "data"))


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update(backend.to_str().encode() if backend is not None else str(tokenizer.get_vocab()).encode())
    for part in (tokenizer.chat_template or "", str(tokenizer.eos_token_id), str(tokenizer.bos_token_id),
                 str(getattr(tokenizer, "add_bos_token", None))):
        digest.update(b"\0" + str(part).encode())
    return digest.hexdigest()


def cache_key(source_fingerprint: str, tokenizer_print: str, cfg: DataConfig) -> str:
    settings = {k: v for k, v in asdict(cfg).items() if k in SETTINGS}
    payload = json.dumps({"v": PIPELINE_VERSION, "data": source_fingerprint, "tokenizer": tokenizer_print,
                          "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _holder() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}


class _LockWatch:
    """A waiter's view of a lock: when it last saw it change (renewed or replaced), by its own clock."""

    def __init__(self, lock: Path, expire_s: float):
        self.lock, self.expire_s = lock, expire_s
        self.seen: Optional[tuple] = None
        self.since = time.monotonic()

    def expired(self) -> bool:
        try:
            stat = self.lock.stat()
        except OSError:
            return False  # released right now: the next poll takes it
        now = (stat.st_ino, stat.st_mtime_ns)
        if now != self.seen:
            self.seen, self.since = now, time.monotonic()
        return time.monotonic() - self.since > self.expire_s


class _Lease(threading.Thread):
    """Renews the lock's mtime while its holder prepares: the sign of life other nodes read."""

    def __init__(self, lock: Path, every_s: float):
        super().__init__(name="data-cache-lease", daemon=True)
        self.lock, self.every_s, self.done = lock, every_s, threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                os.utime(self.lock)
            except OSError:
                return  # taken over (we were judged dead) or removed: nothing left to renew


def _read_holder(lock: Path) -> dict:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return {}


def _holder_dead(lock: Path, watch: Optional[_LockWatch] = None) -> bool:
    holder = _read_holder(lock)
    if not holder:
        return False  # being written right now, or released
    if holder.get("host") != socket.gethostname():  # another node's preparer: judged by its lease
        return watch is not None and watch.expired()
    try:
        os.kill(int(holder["pid"]), 0)
        return False
    except ProcessLookupError:
        return True
    except PermissionError:
        return False


def _try_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(_holder()))
    return True


def _discard(folder: Path, problem: str, log) -> None:
    """Move a damaged entry aside (atomic: of racing processes one wins, the others find it gone)."""
    aside = folder.with_name(f"{folder.name}.damaged-{uuid.uuid4().hex[:12]}")
    try:
        os.replace(folder, aside)
    except OSError as err:
        if folder.exists():  # not a lost race: we cannot move it (a read-only shared cache, ...)
            raise DataError(str(folder), f"a damaged data cache entry ({problem}) cannot be removed ({err}); "
                                         "delete it, or point data.cache_dir at a writable folder") from None
        return
    shutil.rmtree(aside, ignore_errors=True)
    if log:
        log(f"data cache entry damaged ({problem}); preparing it again")


def get_or_prepare(root: Path, key: str, prepare: Callable[[Path], dict], log=None, poll_s: float = 0.5,
                   check: Optional[Callable[[Path], Optional[str]]] = None,
                   lease_s: tuple = (LEASE_RENEW_S, LEASE_EXPIRE_S)) -> tuple[Path, bool]:
    """The ready folder for `key`, prepared by `prepare(tmp_folder)` unless another process does
    it; returns (folder, hit) with hit=True when it was already there or prepared by another.
    `check(folder)` says what is wrong with an existing entry (damaged since): it is made again.
    `lease_s`: (renew, expire) seconds of the lock's lease (see the module's doc)."""
    root.mkdir(parents=True, exist_ok=True)
    final, lock, failed = root / key, root / f"{key}.lock", root / f"{key}.error"
    waited, last_note = False, time.time()
    watch = _LockWatch(lock, lease_s[1])
    while True:
        if (final / "meta.json").is_file():
            problem = check(final) if check else None
            if problem is None:
                return final, True
            _discard(final, problem, log)  # damaged since it was made: prepare it again
            continue
        if waited and failed.is_file():  # preparation is deterministic: the holder's error is ours too
            error = json.loads(failed.read_text())
            raise DataError(error["where"], error["problem"], error["reason"])
        if _try_lock(lock):
            break
        if _holder_dead(lock, watch):
            if log:
                log(f"taking over the preparation of {final}: its holder ({_read_holder(lock)}) is gone")
            lock.unlink(missing_ok=True)
            watch = _LockWatch(lock, lease_s[1])
            continue
        waited = True
        if log and time.time() - last_note > 30:
            log(f"waiting for another process to prepare {final} ({lock} held)")
            waited, last_note = False, time.time()
        progress()  # waiting on a live preparer (its lease is renewed) is not a hang
        time.sleep(poll_s)
        poll_s = min(poll_s * 1.5, max(poll_s, MAX_POLL_S))
    lease = _Lease(lock, lease_s[0])
    lease.start()
    try:
        if (final / "meta.json").is_file():  # finished between our check and our lock
            return final, True
        failed.unlink(missing_ok=True)
        tmp = root / f"{key}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            prepare(tmp)
        except DataError as err:
            failed.write_text(json.dumps({"where": err.where, "problem": err.problem, "reason": err.reason}))
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            os.replace(tmp, final)  # atomic: a reader sees no folder or a complete one
        except OSError:
            if not (final / "meta.json").is_file():
                raise
            # Two waiters judged a dead holder's lock stale at once, and both prepared: the other won.
            shutil.rmtree(tmp, ignore_errors=True)
            return final, True
        return final, False
    finally:
        lease.done.set()
        lock.unlink(missing_ok=True)

