"""Figures for docs/architecture.md, read from the code (issue: one owner for every concept).

    python scripts/architecture_check.py

Prints: import cycles among launcher/ and trainer/ modules (module-level and in-function imports
alike), imports from the launcher into trainer modules, in-function imports, and run-directory file
names written as literals outside their owner, and code that tests for a peft method by name outside
the method table.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("launcher", "trainer")


def modules() -> dict:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "bundled" in path.parts:  # links to scripts/ and data shipped in the wheel
                continue
            found[".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict):
    """(module imported, inside a function?) for every import in `path`; `from pkg import mod` counts
    as an import of pkg.mod (not of the package's __init__)."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f)}
    # `if TYPE_CHECKING:` imports are for annotations only: never run, so never part of a cycle.
    typing_only = {id(n) for f in ast.walk(tree) if isinstance(f, ast.If) and isinstance(f.test, ast.Name)
                   and f.test.id == "TYPE_CHECKING" for n in ast.walk(f)}
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            yield name, id(node) in in_function


def cycles(graph: dict) -> set:
    found = set()

    def walk(start, node, path):
        for dep in graph.get(node, ()):
            if dep == start:
                found.add(tuple(sorted(path)))
            elif dep not in path and len(path) < 8:
                walk(start, dep, path + [dep])
    for module in graph:
        walk(module, module, [module])
    return found


LITERAL = re.compile(r'"(config\.yaml|ds_config\.json|env\.json|launches\.jsonl|metrics\.jsonl|exit\.json|'
                     r'resume\.json|export\.json|export_probe\.pt|generations\.jsonl|job\.sbatch|slurm_job_id|'
                     r'slurm_jobs\.jsonl|wandb_run_id|wandb_run\.json|deepspeed_env)"')


def peft_method_literals(mods: dict) -> list:
    """Code (not docstrings or messages) that names a peft method outside its table: a string constant
    that is exactly a method's name, compared against or looked up."""
    sys.path.insert(0, str(ROOT))
    from trainer.peft_methods import METHODS

    found = []
    for name, path in mods.items():
        if name == "trainer.peft_methods":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                operands = [node.left, *node.comparators]
                constants = [c for o in operands for c in ([o] if not isinstance(o, (ast.Tuple, ast.List, ast.Set))
                                                            else o.elts)]
                if any(isinstance(c, ast.Constant) and c.value in METHODS for c in constants):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def measure() -> dict:
    mods = modules()
    graph, in_function, launcher_to_trainer = {}, 0, []
    for name, path in mods.items():
        deps = set()
        for imported, nested in imports(path, mods):
            if imported.split(".")[0] in PACKAGES:
                deps.add(imported)
                if name.startswith("launcher") and imported.startswith("trainer"):
                    launcher_to_trainer.append((name, imported))
            in_function += nested
        graph[name] = deps & set(mods)
    literals = [f"{path.relative_to(ROOT)}:{number}" for name, path in mods.items() if name != "trainer.run_dir"
                for number, line in enumerate(path.read_text().splitlines(), 1) if LITERAL.search(line)]
    return {"cycles": sorted(cycles(graph)), "in_function_imports": in_function,
            "launcher_to_trainer": launcher_to_trainer, "run_dir_literals": literals,
            "peft_method_literals": peft_method_literals(mods)}


def main() -> int:
    facts = measure()
    print(f"import cycles: {len(facts['cycles'])}")
    for loop in facts["cycles"]:
        print("   ", " <-> ".join(loop))
    print(f"in-function imports: {facts['in_function_imports']}")
    pairs = facts["launcher_to_trainer"]
    print(f"launcher -> trainer imports: {len(pairs)} (of {len({t for _, t in pairs})} trainer modules)")
    print(f"run-directory file names as literals outside trainer/run_dir.py: {len(facts['run_dir_literals'])}")
    for where in facts["run_dir_literals"]:
        print("   ", where)
    print(f"peft method names compared outside trainer/peft_methods.py: {len(facts['peft_method_literals'])}")
    for where in facts["peft_method_literals"]:
        print("   ", where)
    return 0


if __name__ == "__main__":
    sys.exit(main())
