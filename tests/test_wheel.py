"""`pip install .` gives a shardtune that runs anywhere: the wheel is built, installed into a fresh
venv, and every command a new user starts with is run from a folder outside the checkout.

The fresh venv sees the locked dependencies of the test venv through a `.pth` line (installing torch
and the rest again would take minutes and test pip, not us); the `.pth` files of that folder are not
processed, so the checkout's editable install stays invisible and only the wheel's code can run.
"""
from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import REPO, TINY, subprocess_env


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of the fresh venv, a working folder outside the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    dist = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist),
                    str(REPO)], check=True, capture_output=True, text=True, timeout=600)
    wheel = next(dist.glob("shardtune-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "locked_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile",
                    "--target", str(site), str(wheel)], check=True, capture_output=True, text=True, timeout=600)
    bin_dir = venv / "bin"
    # --target puts the console script beside the packages; the one a user runs lives in bin/.
    (bin_dir / "shardtune").write_text(f"#!{bin_dir / 'python'}\nimport sys\nfrom launcher.cli import entry\n"
                                       "sys.exit(entry())\n")
    (bin_dir / "shardtune").chmod(0o755)
    work = root / "elsewhere"
    work.mkdir()
    return bin_dir, work


def run(installed, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    bin_dir, work = installed
    env = subprocess_env()
    env.pop("PYTHONPATH", None)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return subprocess.run([str(bin_dir / "shardtune"), *args], cwd=work, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def test_the_wheel_holds_configs_template_and_samples(installed):
    bin_dir, work = installed
    where = subprocess.run([str(bin_dir / "python"), "-c",
                            "import launcher, trainer; from launcher import resources as r; "
                            "print(launcher.__file__, trainer.__file__, r.CONFIG_DIR, r.SLURM_DIR, r.SAMPLES_DIR)"],
                           cwd=work, capture_output=True, text=True, check=True).stdout.split()
    assert all(str(bin_dir.parent) in path for path in where), where  # nothing from the checkout
    assert (Path(where[2]) / "config.yaml").is_file() and (Path(where[3]) / "job.sbatch.j2").is_file()
    assert (Path(where[4]) / "chat" / "train.jsonl").is_file()


def test_version_names_ours_and_the_libraries(installed):
    proc = run(installed, "--version")
    assert proc.returncode == 0 and proc.stdout.startswith("shardtune 0.1.0"), proc.stdout
    for name in ("torch", "deepspeed", "transformers", "peft", "datasets", "hydra-core"):
        assert f"  {name} " in proc.stdout


@pytest.mark.distributed
def test_a_new_user_trains_previews_plans_renders_and_reports_outside_the_checkout(installed):
    bin_dir, work = installed
    job = run(installed, "train", "--cfg", "job", "--resolve")
    assert job.returncode == 0 and "builtin:tiny-llama" in job.stdout, job.stdout[-3000:]
    assert f"{bin_dir.parent}" in job.stdout  # the sample data path points into the installed package

    run_dir = work / "runs" / "first"
    trained = run(installed, "train", f"run.dir={run_dir}", *TINY, "train.max_steps=3")
    assert trained.returncode == 0, trained.stdout[-4000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if r.get("kind") == "train"][-1] == 3
    env = json.loads((run_dir / "env.json").read_text())
    assert env["versions"]["shardtune"] == "0.1.0"

    preflight = run(installed, "preflight")
    assert preflight.returncode == 0, preflight.stdout[-3000:]
    preview = run(installed, "data", "preview", "-n", "1", "--no-color")
    assert preview.returncode == 0 and "train" in preview.stdout.lower(), preview.stdout[-3000:]
    slurm = run(installed, "train", "cluster=slurm", "run.launch=dry_run", f"run.dir={work / 'runs' / 'slurm'}")
    assert slurm.returncode == 0 and "#SBATCH" in slurm.stdout, slurm.stdout[-3000:]
    assert "python -m launcher.node" in slurm.stdout or "launcher.node" in slurm.stdout
    report = run(installed, "report", str(run_dir))
    assert report.returncode == 0, report.stdout[-3000:]
    assert list(run_dir.glob("report*.html")) or list(run_dir.rglob("*.html")), report.stdout
