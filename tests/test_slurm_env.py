"""Unit tests for launcher/slurm_env.py (fast; no Slurm cluster needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from launcher.slurm_env import (  # noqa: E402
    NodeResolutionError,
    derive_port,
    expand_nodelist,
    head_node_address,
    port_key_from_env,
)

# (hostlist, expected expansion)
CASES = [
    ("n[001-004]", ["n001", "n002", "n003", "n004"]),
    ("a[1,3],b7", ["a1", "a3", "b7"]),
    ("node1", ["node1"]),
    ("x[01-02],y[3-4]", ["x01", "x02", "y3", "y4"]),
    ("a[1-2,5],b[7,9-10]", ["a1", "a2", "a5", "b7", "b9", "b10"]),
    ("n[8-10]", ["n8", "n9", "n10"]),
    ("n[08-10]", ["n08", "n09", "n10"]),
    ("n[1-010]", ["n1", "n2", "n3", "n4", "n5", "n6", "n7", "n8", "n9", "n10"]),
    ("n[001-4]", ["n001", "n002", "n003", "n004"]),
    ("n[007]", ["n007"]),
    ("a[1-2]b[3-4]", ["a1b3", "a1b4", "a2b3", "a2b4"]),
    ("n1,n[2-3],n1", ["n1", "n2", "n3", "n1"]),
    ("n1 n2", ["n1", "n2"]),
    ("a,,b,", ["a", "b"]),
    ("node-1.ib,node-2.ib", ["node-1.ib", "node-2.ib"]),
]
# Accepted here, rejected by Slurm 22.05's scontrol (suffix after the last bracket).
SUFFIX_CASES = [
    ("gpu[1-2,5]-ib", ["gpu1-ib", "gpu2-ib", "gpu5-ib"]),
    ("r[1-2]n[01-02]-ib", ["r1n01-ib", "r1n02-ib", "r2n01-ib", "r2n02-ib"]),
]
MALFORMED = ["", "   ", ",", "n[3-1]", "n[]", "n[1-2", "n1-2]", "n[1-2]]", "n[[1-2]]", "n[a-b]",
             "n[1-]", "n[-2]", "[1-2]", "n[1--2]", "n[1-2,]"]


@pytest.mark.parametrize("hostlist,expected", CASES + SUFFIX_CASES)
def test_expand_nodelist(hostlist, expected):
    assert expand_nodelist(hostlist) == expected


def test_t11_cases():
    assert expand_nodelist("n[001-004]") == ["n001", "n002", "n003", "n004"]
    assert expand_nodelist("a[1,3],b7") == ["a1", "a3", "b7"]


@pytest.mark.parametrize("bad", MALFORMED)
def test_expand_nodelist_malformed_names_input(bad):
    with pytest.raises(ValueError) as info:
        expand_nodelist(bad)
    assert repr(bad) in str(info.value)


def test_expand_nodelist_refuses_huge_range():
    with pytest.raises(ValueError, match="too"):
        expand_nodelist("n[1-999999999]")


def test_expand_nodelist_type_error():
    with pytest.raises(TypeError):
        expand_nodelist(["n1"])  # type: ignore[arg-type]


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="Slurm's scontrol is not installed")
def test_matches_scontrol_show_hostnames(tmp_path):
    # scontrol needs some configuration source even for `show hostnames` (no daemon is contacted).
    conf = tmp_path / "slurm.conf"
    conf.write_text(
        "ClusterName=x\nSlurmctldHost=localhost\nNodeName=dummy CPUs=1\nPartitionName=p Nodes=dummy\n"
    )
    env = {"SLURM_CONF": str(conf), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
    for hostlist, _ in CASES:
        proc = subprocess.run(
            ["scontrol", "show", "hostnames", hostlist], env=env, capture_output=True, text=True, timeout=20
        )
        assert proc.returncode == 0, (hostlist, proc.stderr)
        assert expand_nodelist(hostlist) == proc.stdout.split(), hostlist


# ---- ports ------------------------------------------------------------------------------------


def test_two_jobs_on_one_node_get_different_ports():
    assert derive_port(1234) != derive_port(1235)
    assert derive_port("1234") == derive_port(1234)
    ports = {derive_port(j) for j in range(5000, 5100)}
    assert len(ports) == 100


def test_derive_port_deterministic_and_in_range():
    for key in (0, 1, 19999, 20000, 123456789, "abc", "777_3", (777, 3)):
        p = derive_port(key)
        assert p == derive_port(key)
        assert 20000 <= p < 40000
    assert derive_port(7, base=30000, span=10) == 30007
    assert derive_port(17, base=30000, span=10) == 30007


def test_derive_port_array_tasks():
    assert derive_port("777_3") == derive_port((777, 3)) == derive_port(("777", "3"))
    tasks = {derive_port(f"777_{t}") for t in range(64)}
    assert len(tasks) == 64
    assert derive_port("777_0") != derive_port("778_0")
    assert derive_port("777_1") != derive_port("778_0")


@pytest.mark.parametrize(
    "bad", [dict(base=0), dict(span=0), dict(base=60000, span=10000), dict(base=-1)]
)
def test_derive_port_bad_range(bad):
    with pytest.raises(ValueError):
        derive_port(1, **bad)


def test_derive_port_bad_keys():
    for key in ("", -1):
        with pytest.raises(ValueError):
            derive_port(key)
    for key in (None, 1.5, True):
        with pytest.raises(TypeError):
            derive_port(key)  # type: ignore[arg-type]


def test_port_key_from_env():
    assert port_key_from_env({"SLURM_JOB_ID": "42", "SLURM_ARRAY_JOB_ID": "40"}) == "42"
    assert port_key_from_env({"SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2"}) == "40_2"
    with pytest.raises(KeyError):
        port_key_from_env({})


# ---- head node ----------------------------------------------------------------------------------

UNRESOLVABLE = "shardtune-no-such-node.invalid"


def test_head_node_resolves_by_dns():
    assert head_node_address("localhost,n[1-2]", scontrol=False) == "127.0.0.1"
    assert head_node_address(["localhost"], scontrol=False) == "127.0.0.1"


def test_head_node_falls_back_to_scontrol_nodeaddr():
    seen = []

    def fake_scontrol(name):
        seen.append(name)
        return f"NodeName={name} Arch=x86_64 CoresPerSocket=1 NodeAddr=127.0.0.1 NodeHostName=vm Port=17001"

    assert head_node_address(f"{UNRESOLVABLE},other", scontrol=fake_scontrol) == "127.0.0.1"
    assert seen == [UNRESOLVABLE]


def test_head_node_unresolvable_raises_naming_node():
    with pytest.raises(NodeResolutionError, match=UNRESOLVABLE):
        head_node_address(UNRESOLVABLE, scontrol=False)
    # NodeAddr defaults to the node name: no help
    with pytest.raises(NodeResolutionError, match=UNRESOLVABLE):
        head_node_address(UNRESOLVABLE, scontrol=lambda n: f"NodeName={n} NodeAddr={n} NodeHostName={n}")
    with pytest.raises(NodeResolutionError, match=UNRESOLVABLE):
        head_node_address(UNRESOLVABLE, scontrol="shardtune-no-such-scontrol")


def test_head_node_bad_list():
    with pytest.raises(ValueError):
        head_node_address("n[1-")
