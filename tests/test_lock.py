"""The lock and what it promises: every package the code imports is in it, the versions it pins are
inside pyproject.toml's ranges, and the README's "Tested with" line is read from it."""
from __future__ import annotations

import re
import tomllib

import pytest
from packaging.requirements import Requirement

from helpers import REPO

LOCKS = ("cpu", "cuda")


def locked(variant: str) -> dict:
    pins = {}
    for line in (REPO / "requirements" / f"lock-{variant}.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def declared() -> list:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    return [Requirement(r) for r in project["dependencies"] + [r for extra in extras.values() for r in extra]]


@pytest.mark.parametrize("variant", LOCKS)
def test_every_declared_package_is_locked_inside_its_range(variant):
    pins = locked(variant)
    for requirement in declared():
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is declared but not in lock-{variant}.txt: run make lock"
        assert requirement.specifier.contains(pins[name], prereleases=True), \
            f"lock-{variant}.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"


def test_the_locks_differ_only_in_the_torch_build():
    cpu, cuda = locked("cpu"), locked("cuda")
    assert cpu["torch"].endswith("+cpu") and cuda["torch"] == cpu["torch"].removesuffix("+cpu")
    cuda_only = {name for name in cuda if name not in cpu}
    assert all(n.startswith(("nvidia-", "cuda-", "triton")) for n in cuda_only), cuda_only
    assert {n: v for n, v in cpu.items() if n != "torch"} == {n: cuda[n] for n in cpu if n != "torch"}


def test_every_third_party_import_is_declared():
    import ast
    import sys

    modules = set()
    for path in list((REPO / "launcher").rglob("*.py")) + list((REPO / "trainer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                modules.add(node.module.split(".")[0])
            elif isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}

    third_party = {m for m in modules if m not in sys.stdlib_module_names and m not in ("launcher", "trainer")}
    import_names = {"yaml": "pyyaml", "hydra": "hydra-core", "huggingface_hub": "huggingface-hub",
                    "mlflow": "mlflow-skinny"}
    names = {r.name.lower() for r in declared()}
    missing = {m for m in third_party if import_names.get(m, m).replace("_", "-") not in names}
    assert not missing, f"imported but not declared in pyproject.toml: {sorted(missing)}"


def test_the_readme_says_what_the_lock_holds():
    pins = locked("cpu")
    line = re.search(r"Tested with \(the lock\):([^\n]*\n[^\n]*)", (REPO / "README.md").read_text()).group(1)
    for name in ("deepspeed", "transformers", "peft", "datasets", "hydra-core", "wandb"):
        assert f"{name} {pins[name]}" in line, f"README's 'Tested with' line: {name} should be {pins[name]}"
    assert f"torch {pins['torch'].removesuffix('+cpu')}" in line
