"""`shardtune config [KEY ...]`: what each setting does, read from the schema itself.

The schema (trainer/config.py) is the one place a setting is described: its type and default are the
dataclass field's, its description the comment written beside (or just above) the field, its valid
values those written beside it with `one_of` (validation enforces them), and a config group's presets the
files of configs/<group>/. Nothing here is a second copy that could drift from them.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Dict, List, Optional

from launcher.resources import CONFIG_DIR
from trainer.config import RootConfig


@dataclasses.dataclass
class Setting:
    key: str  # dotted: optim.lr
    type: str
    default: str
    description: str
    choices: Optional[tuple] = None


def field_comments(schema: type) -> Dict[str, str]:
    """Field name -> its comment in the schema's source: the comment lines just above the field and the
    comment after it on its own line, joined."""
    source = inspect.getsource(schema)
    comments: Dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    lines = source.splitlines()
    found = {}
    for number, line in enumerate(lines, start=1):
        name = line.strip().split(":", 1)[0]
        if not name.isidentifier() or line.strip().startswith(("#", "def ", "class ", "@")) or ":" not in line:
            continue
        above, previous = [], number - 1
        while previous in comments and lines[previous - 1].strip().startswith("#"):
            above.insert(0, comments[previous])
            previous -= 1
        found[name] = " ".join(above + ([comments[number]] if number in comments else []))
    return found


def _type_name(hint) -> str:
    text = getattr(hint, "__name__", None) if not typing.get_args(hint) else None
    return text or str(hint).replace("typing.", "")


def settings(schema: type = RootConfig, prefix: str = "", composed=None) -> List[Setting]:
    """Every leaf setting of the schema, in declaration order. `composed`: a composed config whose
    values are shown as the defaults (what the presets set), else the schema's own defaults."""
    comments = field_comments(schema)
    hints = typing.get_type_hints(schema)
    found = []
    for item in dataclasses.fields(schema):
        hint, key = hints[item.name], f"{prefix}{item.name}"
        if dataclasses.is_dataclass(hint):
            found += settings(hint, f"{key}.", composed)
            continue
        if item.default is not dataclasses.MISSING:
            default = item.default
        elif item.default_factory is not dataclasses.MISSING:
            default = item.default_factory()
        else:
            default = None
        if composed is not None:
            default = _lookup(composed, key)
        shown = "(set by the group's preset)" if default == "???" else repr(default)
        found.append(Setting(key, _type_name(hint), shown, comments.get(item.name, ""),
                             item.metadata.get("choices")))
    return found


def _lookup(tree: dict, key: str):
    for part in key.split("."):
        tree = tree.get(part, "???") if isinstance(tree, dict) else "???"
    return tree


def composed_defaults(overrides: List[str]) -> Optional[dict]:
    """The config `shardtune train OVERRIDES` composes, as plain data (presets applied, interpolations
    such as run.dir's timestamp left as written), or None when it cannot be composed (the schema's
    defaults are shown then)."""
    from omegaconf import OmegaConf

    from launcher.compose import ConfigError, compose_node

    try:
        return OmegaConf.to_container(compose_node(overrides), resolve=False)
    except ConfigError as err:
        print(f"shardtune config: {'; '.join(err.problems)} (showing the schema's defaults)")
        return None


def presets(group: str) -> List[str]:
    """The names a config group takes (`peft=lora`): the files of configs/<group>/."""
    folder = CONFIG_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def describe(setting: Setting) -> str:
    lines = [f"{setting.key}  ({setting.type}, default {setting.default})"]
    if setting.description:
        lines.append(f"    {setting.description}")
    if setting.choices:
        lines.append(f"    valid: {', '.join(map(str, setting.choices))}")
    return "\n".join(lines)


def matching(query: str, known: List[Setting]) -> List[Setting]:
    """A key (optim.lr), or a group or prefix (optim, cluster.slurm): every setting under it."""
    query = query.rstrip(".")
    return [s for s in known if s.key == query or s.key.startswith(query + ".")]


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="shardtune config",
        description="Describe settings: type, default, valid values and what each does, read from the schema. "
                    "Set any of them on the command line of train, preflight, bench or data preview: KEY=VALUE.",
        epilog="e.g. shardtune config peft;  shardtune config optim.lr data.packing;  shardtune config (all)")
    parser.add_argument("keys", nargs="*", metavar="KEY",
                        help="a key (optim.lr) or a group (peft, cluster.slurm); KEY=VALUE overrides (peft=lora) "
                             "show the defaults that config would have")
    args = parser.parse_args(argv)
    overrides = [k for k in args.keys if "=" in k]
    args.keys = [k for k in args.keys if "=" not in k]
    known = settings(composed=composed_defaults(overrides))
    if not args.keys:
        print("\n".join(describe(s) for s in known))
        return 0
    code = 0
    for query in args.keys:
        found = matching(query, known)
        if not found:
            import difflib

            close = difflib.get_close_matches(query, [s.key for s in known], n=3, cutoff=0.6)
            hint = f"; did you mean {' or '.join(close)}?" if close else "; `shardtune config` lists every key"
            print(f"shardtune config: {query} is not a setting{hint}")
            code = 2
            continue
        group = query.split(".")[0]
        if query == group and presets(group):
            print(f"{group}=NAME picks a preset: {', '.join(presets(group))} (configs/{group}/)\n")
        print("\n".join(describe(s) for s in found))
    return code
