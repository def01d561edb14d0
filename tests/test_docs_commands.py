"""Every `shardtune ...` command shown in README.md and docs/*.md still parses.

The commands are read from the fenced code blocks: in bash/sh/shell/zsh blocks every line whose first
word is `shardtune` (after an optional `$ ` prompt), in blocks without a language (or `console`,
`text`) only `$ shardtune ...` lines (the rest of such a block is output). Lines ending in `\\` are
joined, `# comments` outside quotes are dropped, a trailing `&` (or anything after `;`, `&&`, `|`)
is cut off, and a `...` word (an elision: "your other overrides") is left out. Each command is one
test case named file:line, so a documented command that no longer parses fails naming where it is.

What is checked, without running anything for real (no process is spawned, no file is read):

* `shardtune train ARGS`: `shardtune train ARGS --cfg job` (Hydra composes the config and prints
  it without launching) exits 0: the override grammar, every group and key, the types. The printed
  config is then bound to the typed schema (trainer.config.to_config: every mandatory `???` value,
  such as a model preset's `model.name_or_path`, must be given) and validated with
  trainer.validate.validate(check_files=False). A problem counts only when it is reported both as if
  on a CPU machine and as if on a GPU machine (a GPU-only option is fine in a GPU example), and
  problems naming a path the command gives that does not exist here (the user's own files, e.g.
  `cluster.hostfile=hosts.txt`) are not counted.
  A sweep (`-m`) cannot be shown with --cfg (Hydra refuses `-m` with `--cfg`), so it is composed
  without `-m`: first with the first value of every swept key (a comma list, choice(), range(), the
  lower end of interval()), then once more for every other value of each swept key. Hydra's own
  override parser reads the sweep syntax, so a malformed sweep fails too.
  `--help` (and `--hydra-help`, `--info`) runs as given and must exit 0. A `$ shardtune train ...`
  whose output in the doc is `shardtune: invalid config:` is an example of a refused config: it must
  compose, be refused on any machine, and report the problems the doc lists.
* The other subcommands: the command exists in launcher.cli.COMMANDS, `shardtune <command> --help`
  (`data preview --help`, `sweep summary --help`) exits 0 and lists every option the command uses;
  `export` and `bench` arguments are parsed with the command's own argument parser. `preflight`,
  `data preview` and `bench` compose a config: their overrides are composed and checked as above.
* NOT checked: that the files and folders the commands name exist (`/models/Llama-3.1-8B-Instruct`,
  `my_chats.jsonl`, `RUN_DIR`, `runs/exp1`, `hosts.txt`: placeholders for the user's own), what the
  commands print or do, and environment checks made at launch (GPUs, ssh, Slurm, run directory).
"""
from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Set, Tuple

import pytest
from omegaconf import OmegaConf

from helpers import REPO
from launcher import cli
from trainer.config import ConfigError, to_config
from trainer.validate import validate

DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "zsh"}
OUTPUT_BLOCKS = {"", "console", "text", "shell-session"}  # commands only behind a `$ ` prompt
SHELL_OPERATORS = {";", "&", "&&", "||", "|", ">", ">>", "2>&1"}
NESTED = {"data", "sweep"}  # `shardtune data preview`, `shardtune sweep summary`
COMPOSING = {"preflight", "data", "bench"}  # subcommands that compose a config like `train`
INSPECTING = {"--help", "-h", "--hydra-help", "--info", "-i"}
FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")


class DocCommand(NamedTuple):
    where: str  # "docs/slurm.md:13"
    text: str  # the command as written (continuation lines joined)
    argv: List[str]  # the words after `shardtune`
    output: Tuple[str, ...] = ()  # after a `$ ` prompt: the output the doc shows, up to the next prompt


def strip_comment(line: str) -> str:
    """`line` without a shell comment: a `#` outside quotes that starts a word."""
    quote = None
    i = 0
    while i < len(line):
        char = line[i]
        if quote:
            if char == quote:
                quote = None
            elif char == "\\" and quote == '"':
                i += 1
        elif char in "'\"":
            quote = char
        elif char == "\\":
            i += 1
        elif char == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
        i += 1
    return line.rstrip()


def code_blocks(text: str) -> Iterator[Tuple[str, List[Tuple[int, str]]]]:
    """(language, [(line number, line), ...]) for every fenced block of a markdown text."""
    language, lines, fence = None, [], None
    for number, line in enumerate(text.splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, language, lines = match.group(1), match.group(2).lower(), []
        elif fence is not None and line.strip().startswith(fence):
            yield language, lines
            fence = None
        elif fence is not None:
            lines.append((number, line))


def commands_in(path: Path) -> Iterator[DocCommand]:
    return commands_in_text(path.read_text(), path.relative_to(REPO).as_posix())


def commands_in_text(text: str, where: str) -> Iterator[DocCommand]:
    for language, lines in code_blocks(text):
        if language not in SHELL_BLOCKS | OUTPUT_BLOCKS:
            continue  # python, yaml, ...
        pending, start, prompted = "", 0, False
        for index, (number, raw) in enumerate(lines):
            line = raw.strip()
            if not pending:
                start, prompted = number, line.startswith("$ ")
                if prompted:
                    line = line[2:].lstrip()
                elif language in OUTPUT_BLOCKS:
                    continue  # output, not a command
            line = strip_comment(line)
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            logical, pending = pending + line, ""
            try:
                words = shlex.split(logical)
            except ValueError as err:  # an unbalanced quote: report it as the command's failure
                if logical.startswith("shardtune"):
                    yield DocCommand(f"{where}:{start}", logical, [f"<unparsable: {err}>"])
                continue
            if not words or words[0] != "shardtune":
                continue
            cut = next((i for i, word in enumerate(words) if word in SHELL_OPERATORS), len(words))
            shown = []
            if prompted:
                for _, after in lines[index + 1:]:
                    if after.strip().startswith("$ "):
                        break
                    shown.append(after)
            yield DocCommand(f"{where}:{start}", logical, [w for w in words[1:cut] if w != "..."], tuple(shown))


DOC_COMMANDS = [command for path in DOC_FILES for command in commands_in(path)]


def run_cli(argv: List[str], capsys) -> Tuple[int, str, str]:
    """`shardtune ARGV` in this process: (exit code, stdout, stdout + stderr)."""
    saved = sys.argv[:]
    capsys.readouterr()
    try:
        code = cli.main(list(argv))
    except SystemExit as exit_:  # argparse and Hydra exit for --help and for errors
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    finally:
        sys.argv = saved  # train_main sets it for Hydra
    out = capsys.readouterr()
    return code, out.out, out.out + out.err


def user_paths(argv: List[str]) -> Set[str]:
    """Values in the command that look like paths and do not exist here: the user's own files."""
    found = set()
    for word in argv:
        value = word.split("=", 1)[1] if "=" in word else word
        for part in re.split(r"[\[\],{}\s]+", value):
            part = part.strip("'\"")
            looks_like_path = "/" in part or re.search(r"\.[A-Za-z]\w*$", part)
            if part and looks_like_path and not (REPO / os.path.expanduser(part)).exists():
                found.add(part)
    return found


def sweep_variants(overrides: List[str]) -> List[List[str]]:
    """The overrides of a `-m` command as single runs: the first value of every swept key, then one
    run for each other value of each swept key (the other keys at their first value)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)  # raises on malformed sweep syntax
    choices = []
    for override in parsed:
        key = override.input_line.split("=", 1)[0]
        if not override.is_sweep_override():
            choices.append([override.input_line])
        elif override.is_discrete_sweep():  # a,b,c  choice(...)  range(...)
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:  # interval(low, high): both ends
            interval = override.value()
            choices.append([f"{key}={interval.start}", f"{key}={interval.end}"])
    first = [values[0] for values in choices]
    variants = [first]
    for index, values in enumerate(choices):
        for value in values[1:]:
            variants.append(first[:index] + [value] + first[index + 1:])
    return variants


def check_composes(overrides: List[str], capsys, where: str, refused: Optional[List[str]] = None) -> None:
    """`shardtune train OVERRIDES --cfg job` composes; the result binds to the schema and validates
    (or, with `refused`, validation refuses it, listing at least those problems)."""
    code, printed, output = run_cli(["train", *overrides, "--cfg", "job"], capsys)
    assert code == 0, f"{where}: `shardtune train {' '.join(overrides)} --cfg job` exited {code}:\n{output}"
    try:
        cfg = to_config(OmegaConf.create(printed))  # every mandatory value given, every type right
    except ConfigError as err:
        pytest.fail(f"{where}: `shardtune train {' '.join(overrides)}` does not compose: {err}")
    if refused is not None:  # an example of an invalid config: refused on any machine, for the reasons shown
        for has_cuda in (False, True):
            with pytest.raises(ConfigError) as err:
                validate(cfg, has_cuda=has_cuda, check_files=False)
            missing = [p for p in refused if not any(found.startswith(p) for found in err.value.problems)]
            assert not missing, (f"{where}: the doc shows problems that `shardtune train {' '.join(overrides)}` "
                                 f"no longer reports: {missing}; it reports {err.value.problems}")
        return
    problems = None
    for has_cuda in (False, True):  # valid on a CPU or on a GPU machine: fine
        try:
            validate(cfg, has_cuda=has_cuda, check_files=False)
            return
        except ConfigError as err:
            problems = set(err.problems) if problems is None else problems & set(err.problems)
    own = user_paths(overrides)
    problems = sorted(p for p in problems if not any(path in p for path in own))
    assert not problems, f"{where}: `shardtune train {' '.join(overrides)}` is refused:\n  " + "\n  ".join(problems)


def overrides_of(argv: List[str]) -> List[str]:
    """The Hydra overrides among a subcommand's arguments (key=value, +key=value, ~key)."""
    return [word for word in argv if ("=" in word and not word.startswith("-")) or word.startswith("~")]


def check_train(command: DocCommand, capsys) -> None:
    argv = command.argv[1:]
    if INSPECTING & set(argv) or "--cfg" in argv or "-c" in argv:  # --help, --cfg job: run as written
        code, _, output = run_cli(["train", *argv], capsys)
        assert code == 0, f"{command.where}: `{command.text}` exited {code}:\n{output}"
        assert output.strip(), f"{command.where}: `{command.text}` printed nothing"
        return
    if "-m" in argv or "--multirun" in argv:
        rest = [word for word in argv if word not in ("-m", "--multirun")]
        for overrides in sweep_variants(rest):
            check_composes(overrides, capsys, command.where)
        return
    shown = [line.strip() for line in command.output]
    refused = None
    if shown and shown[0].startswith("shardtune: invalid config"):  # the doc shows it being refused
        refused = [line[2:] for line in shown[1:] if line.startswith("- ")]
    check_composes(argv, capsys, command.where, refused)


def check_subcommand(command: DocCommand, capsys) -> None:
    name, args = command.argv[0], command.argv[1:]
    path = [name, *args[:1]] if name in NESTED else [name]
    args = args[1:] if name in NESTED else args
    code, _, help_text = run_cli([*path, "--help"], capsys)
    assert code == 0, f"{command.where}: `shardtune {' '.join(path)} --help` exited {code}:\n{help_text}"
    for option in (word.split("=", 1)[0] for word in args if word.startswith("-")):
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", help_text), (
            f"{command.where}: `{command.text}` uses {option}, which `shardtune {' '.join(path)} --help` "
            f"does not list:\n{help_text}")
    if name in ("export", "bench"):  # their argument parsers are importable: parse the arguments as written
        from launcher.bench_cmd import parse_args as parse_bench
        from launcher.export_cmd import build_parser

        try:
            parsed = build_parser().parse_args(args) if name == "export" else parse_bench(args)
        except SystemExit:
            pytest.fail(f"{command.where}: `{command.text}`: the arguments do not parse:\n{capsys.readouterr().err}")
        assert name == "export" or parsed.overrides == overrides_of(args), (command.where, parsed.overrides)
    if name in COMPOSING:
        check_composes(overrides_of(args), capsys, command.where)


def test_docs_show_shardtune_commands():
    """The collection itself works: a silent regex change must not turn this file into no tests."""
    assert len(DOC_COMMANDS) >= 40, [c.where for c in DOC_COMMANDS]
    wheres = {c.where for c in DOC_COMMANDS}
    assert "README.md" in {w.split(":")[0] for w in wheres}
    assert any(c.argv[:1] == ["train"] and "-m" in c.argv for c in DOC_COMMANDS)


def test_collection_rules():
    text = "\n".join([
        "```bash",
        "# a comment with shardtune train in it",
        "shardtune train a=1 \\",
        "    'b=x # y' c=2   # a comment",
        "shardtune train d=1 &",
        "python -m other",
        "```",
        "```",
        "$ shardtune preflight --json",
        "shardtune: invalid config:",
        "  shardtune stop RUN_DIR   (output, not a command)",
        "```",
        "```python",
        "shardtune train never=1",
        "```",
    ])
    found = [(c.where, c.argv) for c in commands_in_text(text, "x.md")]
    assert found == [("x.md:3", ["train", "a=1", "b=x # y", "c=2"]), ("x.md:5", ["train", "d=1"]),
                     ("x.md:9", ["preflight", "--json"])]
    assert sweep_variants(["a=1,2", "b=x", "c=choice(3, 4)"]) == [
        ["a=1", "b=x", "c=3"], ["a=2", "b=x", "c=3"], ["a=1", "b=x", "c=4"]]


@pytest.mark.parametrize("command", DOC_COMMANDS, ids=[c.where for c in DOC_COMMANDS])
def test_documented_command_parses(command: DocCommand, capsys):
    assert not command.argv or not command.argv[0].startswith("<unparsable"), (
        f"{command.where}: `{command.text}`: {command.argv[0]}")
    if not command.argv or command.argv[0] in ("-h", "--help", "help"):
        code, _, output = run_cli(command.argv, capsys)
        assert code == 0 and "usage" in output, f"{command.where}: `{command.text}` exited {code}:\n{output}"
        return
    if command.argv[0] in ("-V", "--version", "version"):
        code, _, output = run_cli(command.argv, capsys)
        assert code == 0 and output.startswith("shardtune "), f"{command.where}: `{command.text}` exited {code}"
        return
    assert command.argv[0] in cli.COMMANDS, (
        f"{command.where}: `{command.text}`: no such command; shardtune has {', '.join(cli.COMMANDS)}")
    if command.argv[0] == "train":
        check_train(command, capsys)
    else:
        check_subcommand(command, capsys)
