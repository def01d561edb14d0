"""Slurm job environment helpers for the launcher (stdlib only, no project imports).

* ``expand_nodelist("n[001-004]")`` -> ``["n001", "n002", "n003", "n004"]``: Slurm hostlist syntax in
  pure Python (no ``scontrol show hostnames`` needed).
* ``derive_port(job_id)``: a rendezvous port derived from the job id, so two jobs sharing a node
  do not collide.
* ``head_node_address(nodelist)``: an address for ``MASTER_ADDR``: the first node, resolved by DNS /
  /etc/hosts, else its ``NodeAddr`` from ``scontrol show node`` (node names on many clusters, and the
  emulated nodes of a test cluster, do not resolve).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import socket
import subprocess
from typing import Callable, Mapping, Sequence, Union

__all__ = [
    "expand_nodelist",
    "derive_port",
    "port_key_from_env",
    "head_node_address",
    "NodeResolutionError",
]

MAX_HOSTS = 1 << 20  # refuse absurd expansions such as n[1-999999999]

# --------------------------------------------------------------------------------------------
# Hostlists
# --------------------------------------------------------------------------------------------

_RANGE_ITEM = re.compile(r"^(\d+)(?:-(\d+))?$")


def _malformed(s: str, why: str) -> ValueError:
    return ValueError(f"malformed Slurm hostlist {s!r}: {why}")


def _split_top_level(s: str) -> list[str]:
    """Split on commas (and whitespace) that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            if depth:
                raise _malformed(s, "nested '['")
            depth = 1
        elif ch == "]":
            if not depth:
                raise _malformed(s, "']' without '['")
            depth = 0
        if not depth and (ch == "," or ch.isspace()):
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise _malformed(s, "unclosed '['")
    parts.append("".join(cur))
    return parts


def _expand_range(body: str, s: str) -> list[str]:
    """``"001-003,7"`` -> ``["001", "002", "003", "7"]`` (zero padding of the lower bound kept)."""
    if not body.strip():
        raise _malformed(s, "empty brackets '[]'")
    out: list[str] = []
    for item in body.split(","):
        item = item.strip()
        m = _RANGE_ITEM.match(item)
        if not m:
            raise _malformed(s, f"bad range {item!r} in '[{body}]' (expected N or N-M)")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise _malformed(s, f"range {item!r} goes down")
        if hi - lo + 1 > MAX_HOSTS:
            raise _malformed(s, f"range {item!r} is too large")
        # Slurm pads to the width of the lower bound: n[01-10] -> n01..n10, n[1-010] -> n1..n10.
        out.extend(str(i).zfill(len(lo_s)) for i in range(lo, hi + 1))
    return out


def _expand_host(pattern: str, s: str) -> list[str]:
    """One host pattern with zero or more bracket groups: ``rack[1-2]-n[01-02]`` (cartesian)."""
    pieces: list[list[str]] = []
    pos = 0
    for m in re.finditer(r"\[([^\[\]]*)\]", pattern):
        pieces.append([pattern[pos : m.start()]])
        pieces.append(_expand_range(m.group(1), s))
        pos = m.end()
    pieces.append([pattern[pos:]])
    if "[" in pattern[pos:] or "]" in pattern[pos:]:
        raise _malformed(s, f"unbalanced brackets in {pattern!r}")
    total = 1
    for p in pieces:
        total *= len(p)
    if total > MAX_HOSTS:
        raise _malformed(s, "expands to too many hosts")
    names = [""]
    for p in pieces:
        names = [n + x for n in names for x in p]
    return names


def expand_nodelist(s: str) -> list[str]:
    """Expand a Slurm hostlist (``SLURM_JOB_NODELIST``) into node names, in order.

    ``n[001-004]`` -> n001..n004, ``a[1,3],b7`` -> a1, a3, b7, ``gpu[1-2,5]-ib`` -> gpu1-ib,
    gpu2-ib, gpu5-ib, ``x[01-02],y[3-4]`` -> x01, x02, y3, y4, ``a[1-2]b[3-4]`` -> a1b3, a1b4,
    a2b3, a2b4. Names may be separated by commas or whitespace; duplicates are kept, empty elements
    (``a,,b``) skipped. Zero padding follows the lower bound: ``n[08-10]`` -> n08, n09, n10;
    ``n[8-10]`` -> n8, n9, n10.

    Raises ``ValueError`` naming the input when it is empty or malformed (unbalanced or nested
    brackets, empty brackets, a range that is not ``N`` or ``N-M`` or goes down, a bracket with no
    name before it).

    Differences from Slurm 22.05's ``scontrol show hostnames``: a suffix after the last bracket
    (``gpu[1-2]-ib``) is accepted here but rejected there; a bare ``[1-2]`` is an error here.
    """
    if not isinstance(s, str):
        raise TypeError(f"expand_nodelist expects a string, got {type(s).__name__}: {s!r}")
    if not s.strip():
        raise _malformed(s, "empty")
    hosts: list[str] = []
    for part in _split_top_level(s.strip()):
        if not part:  # "a,,b" or a trailing comma: ignored, as Slurm does
            continue
        if part.startswith("["):
            raise _malformed(s, f"{part!r} has no host name before '['")
        hosts.extend(_expand_host(part, s))
        if len(hosts) > MAX_HOSTS:
            raise _malformed(s, "expands to too many hosts")
    if not hosts:
        raise _malformed(s, "no host names")
    for h in hosts:
        if not h or any(c.isspace() for c in h):
            raise _malformed(s, f"bad host name {h!r}")
    return hosts


# --------------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------------

PortKey = Union[int, str, Sequence[Union[int, str]]]

_ARRAY_KEY = re.compile(r"^\s*(\d+)\s*[_:/.\-]\s*(\d+)\s*$")
_ARRAY_STRIDE = 7919  # a prime: tasks of one array get consecutive ports, arrays are spread apart


def derive_port(job_id: PortKey, base: int = 20000, span: int = 20000) -> int:
    """A port in ``[base, base + span)`` derived deterministically from the job.

    * an int, or a string of digits (``SLURM_JOB_ID``): ``base + job_id % span``; consecutive job ids
      get consecutive ports, so jobs sharing a node differ unless their ids are ``span`` apart.
    * an array task, as ``"ARRAYJOBID_TASKID"`` (``SLURM_ARRAY_JOB_ID``/``SLURM_ARRAY_TASK_ID``) or a
      ``(array_job_id, task_id)`` pair: ``base + (array_job_id * 7919 + task_id) % span``; tasks of
      one array get consecutive ports. (Each array task also has its own ``SLURM_JOB_ID``, which
      is the simplest unique key: see ``port_key_from_env``.)
    * any other string: a stable hash (sha256) of it.

    Note that ports from 32768 up may clash with Linux's ephemeral port range: choose
    ``base``/``span`` below it where that matters.
    """
    base, span = int(base), int(span)
    if span < 1:
        raise ValueError(f"derive_port: span must be >= 1, got {span}")
    if not 1 <= base or base + span - 1 > 65535:
        raise ValueError(f"derive_port: ports [{base}, {base + span - 1}] are outside 1..65535")
    if isinstance(job_id, bool):
        raise TypeError(f"derive_port: job id must be an int or str, got {job_id!r}")
    if isinstance(job_id, (tuple, list)):
        if len(job_id) != 2:
            raise ValueError(f"derive_port: expected (array_job_id, task_id), got {job_id!r}")
        array_id, task_id = (int(str(x).strip()) for x in job_id)
        return base + (array_id * _ARRAY_STRIDE + task_id) % span
    if isinstance(job_id, int):
        if job_id < 0:
            raise ValueError(f"derive_port: negative job id {job_id}")
        return base + job_id % span
    if isinstance(job_id, str):
        key = job_id.strip()
        if not key:
            raise ValueError("derive_port: empty job id")
        if key.isdigit():
            return base + int(key) % span
        m = _ARRAY_KEY.match(key)
        if m:
            return base + (int(m.group(1)) * _ARRAY_STRIDE + int(m.group(2))) % span
        digest = hashlib.sha256(key.encode()).digest()
        return base + int.from_bytes(digest[:8], "big") % span
    raise TypeError(f"derive_port: job id must be an int or str, got {type(job_id).__name__}")


def port_key_from_env(env: Mapping[str, str] | None = None) -> str:
    """The key for ``derive_port`` from a job's environment.

    ``SLURM_JOB_ID`` (unique per running job, array tasks included); else
    ``"SLURM_ARRAY_JOB_ID_SLURM_ARRAY_TASK_ID"``; raises ``KeyError`` outside a Slurm job.
    """
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID", "").strip():
        return env["SLURM_JOB_ID"].strip()
    if env.get("SLURM_ARRAY_JOB_ID", "").strip() and env.get("SLURM_ARRAY_TASK_ID", "").strip():
        return f"{env['SLURM_ARRAY_JOB_ID'].strip()}_{env['SLURM_ARRAY_TASK_ID'].strip()}"
    raise KeyError("neither SLURM_JOB_ID nor SLURM_ARRAY_JOB_ID/SLURM_ARRAY_TASK_ID is set")


# --------------------------------------------------------------------------------------------
# Head node address
# --------------------------------------------------------------------------------------------


class NodeResolutionError(LookupError):
    """No address could be found for a node."""


ScontrolArg = Union[None, bool, str, Callable[[str], str]]


def _scontrol_node_text(node: str, scontrol: ScontrolArg, env: Mapping[str, str] | None, timeout: float) -> str | None:
    """``scontrol -o show node NODE`` output, or None when scontrol is unavailable."""
    if scontrol is False:
        return None
    if callable(scontrol):
        return scontrol(node)
    exe = shutil.which(scontrol or "scontrol")
    if not exe:
        return None
    proc = subprocess.run(
        [exe, "-o", "show", "node", node],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise NodeResolutionError(
            f"node {node!r} does not resolve and `scontrol show node {node}` failed "
            f"(exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def _node_addr_from_text(text: str) -> str | None:
    m = re.search(r"(?:^|\s)NodeAddr=(\S+)", text or "")
    return m.group(1) if m else None


def head_node_address(
    nodelist: str | Sequence[str],
    scontrol: ScontrolArg = None,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 15.0,
) -> str:
    """An IP address (or resolvable name) for the first node of ``nodelist``.

    The first node is resolved with ``socket.gethostbyname``. When that fails, its ``NodeAddr`` from
    ``scontrol show node NAME`` is used (resolved too when it is a name). ``scontrol`` is the
    command (None: ``scontrol`` from PATH, skipped when absent; False: never), or a callable
    ``name -> scontrol show node text`` (for tests). ``env`` is passed to scontrol (e.g. with
    ``SLURM_CONF``). Raises ``NodeResolutionError`` naming the node.
    """
    nodes = expand_nodelist(nodelist) if isinstance(nodelist, str) else list(nodelist)
    if not nodes:
        raise ValueError(f"head_node_address: empty node list {nodelist!r}")
    node = nodes[0]
    try:
        return socket.gethostbyname(node)
    except (OSError, UnicodeError) as exc:
        dns_error = exc
    text = _scontrol_node_text(node, scontrol, env, timeout)
    if text is None:
        raise NodeResolutionError(
            f"head node {node!r} (first of {nodelist!r}) does not resolve ({dns_error}) and scontrol "
            f"is not available to look up its NodeAddr"
        )
    addr = _node_addr_from_text(text)
    if not addr or addr == node:
        raise NodeResolutionError(
            f"head node {node!r} (first of {nodelist!r}) does not resolve ({dns_error}) and "
            f"`scontrol show node {node}` gives no usable NodeAddr ({addr!r})"
        )
    try:
        return socket.gethostbyname(addr)
    except (OSError, UnicodeError) as exc:
        raise NodeResolutionError(
            f"head node {node!r}: NodeAddr {addr!r} from scontrol does not resolve either ({exc})"
        ) from exc
