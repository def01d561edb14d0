"""cluster=hostfile without ssh: the same command on each "node" (here: twice on this machine), each
with its node rank, forms one world through DeepSpeed's per-node launcher (as its runner's --no_ssh
mode would start it) and trains."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import helpers
from helpers import REPO, TINY, losses
from launcher.local import free_port
from trainer.control import known_heartbeats, processes_of_run
from trainer.run_dir import RunDir

pytestmark = pytest.mark.distributed


def test_two_node_launchers_form_one_world(tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    common = ["train", f"run.dir={run_dir}", *TINY, "train.max_steps=4", "eval.prompts_file=null",
              "eval.general_files=[]", "eval.max_batches=2", "checkpoint.export_final=false",
              "cluster=hostfile", "cluster.no_ssh=true", "cluster.nnodes=2", "cluster.nproc_per_node=1",
              "cluster.master_addr=127.0.0.1", f"cluster.master_port={port}", "cluster.threads_per_rank=1"]

    logs = {rank: tmp_path / f"node{rank}.log" for rank in (0, 1)}

    def start(rank):  # output to a file: a full pipe nobody drains yet would block the node's rank
        with open(logs[rank], "w") as log:
            return subprocess.Popen([sys.executable, "-m", "launcher.cli", *common, f"cluster.node_rank={rank}"],
                                    cwd=REPO, env=helpers.subprocess_env(), stdout=log, stderr=subprocess.STDOUT)

    # Node 1 first, node 0 once node 1's processes run: node 0 must take them for its peers, not
    # for an earlier launch still using run.dir (it once refused to start, in CI, on this order).
    second = start(1)
    deadline = time.time() + 120
    while not processes_of_run(run_dir) and second.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    nodes = [start(0), second]
    for node in nodes:
        node.wait(timeout=600)
    outputs = [logs[rank].read_text() for rank in (0, 1)]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}:\n{out[-3000:]}"
        assert f"node {rank}/2" in out and f"node_rank={rank}" in out, out[-3000:]  # DeepSpeed's per-node launcher
    values = losses(run_dir)
    assert len(values) == 4 and all(v == v for v in values)
    # Both ranks took part: each node launcher's summary holds its rank, done (the ranks beat into
    # node-local storage, removed at the end), and ds_config was written for a world of 2.
    summaries = sorted(p.name for p in RunDir(run_dir).node_summaries())
    assert summaries == ["node-from-rank0.json", "node-from-rank1.json"], summaries
    assert [(b["rank"], b["phase"]) for b in known_heartbeats(run_dir)] == [(0, "done"), (1, "done")]
    assert not RunDir(run_dir).heartbeat_files()  # nothing per rank in the shared run directory
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 2 * 2
