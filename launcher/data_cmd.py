"""`shardtune data preview <overrides>`: the samples as the model will see them, and statistics.

With a preference objective (objective=dpo|simpo|kto) a row is shown as its two sequences: a pair's
chosen and rejected answers after their shared prompt (KTO: the answer, marked desirable or not,
and the mismatched answer that estimates the KL reference point), with the pair statistics.

Composes the config exactly as `shardtune train` would (launcher.compose.compose), prepares the data
through the same cached pipeline the workers use (a later run then hits the cache), and prints
a few rows with trained tokens marked: green on a terminal, [[like this]] otherwise.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List

USAGE = "shardtune data preview [-n N] [--split train|eval] [--color|--no-color] [-cd DIR] [hydra overrides...]"
GREEN, DIM, RESET = "\033[1;32m", "\033[2m", "\033[0m"


def render_row(tokenizer, row: dict, color: bool) -> str:
    """Decode a row run by run (trained / masked), marking document starts of packed rows."""
    ids, labels = row["input_ids"], row["labels"]
    starts = {i for i, p in enumerate(row.get("position_ids", [])) if p == 0 and i > 0}
    pieces, run, run_trained = [], [], None

    def flush():
        if not run:
            return
        text = tokenizer.decode(run)
        if color:
            pieces.append(f"{GREEN if run_trained else DIM}{text}{RESET}")
        else:
            pieces.append(f"[[{text}]]" if run_trained else text)

    for i, (token, label) in enumerate(zip(ids, labels)):
        trained = label != -100
        if i in starts:
            flush()
            run = []
            pieces.append("\n------ next document (positions restart at 0) ------\n")
        if trained != run_trained and run:
            flush()
            run = []
        run.append(token)
        run_trained = trained
    flush()
    return "".join(pieces)


PAIR_STATS = ("rows", "pairs", "examples", "desirable", "undesirable", "tokens", "trained_tokens",
              "chosen_answer_tokens_mean", "rejected_answer_tokens_mean", "chosen_longer_share", "prompt_cut",
              "answer_cut", "skipped", "cache_hits", "cache_misses")


def print_preference_row(tokenizer, dataset, index: int, color: bool, legend: str) -> None:
    row = dataset[index]
    names = (("chosen", "rejected") if dataset.kind == "preference"
             else ("answer (" + ("desirable" if row["desirable"] else "undesirable") + ")",
                   "mismatched answer for the KL reference point (not trained)"))
    print(f"== row {index}: one forward pass of 2 sequences ({legend}) ==")
    for name, sequence in zip(names, row["sequences"]):
        trained = sum(1 for label in sequence["labels"] if label != -100)
        print(f"-- {name}: {len(sequence['input_ids'])} tokens, {trained} in the answer --")
        print(render_row(tokenizer, sequence, color))


def print_preference_stats(name: str, dataset) -> None:
    stats = dataset.stats()
    print(f"== {name} statistics ({stats['kind']}) ==")
    for key in PAIR_STATS:
        if key in stats:
            value = stats[key]
            print(f"  {key:<28} {value:.2f}" if isinstance(value, float) else f"  {key:<28} {value}")
    print("  length histogram (tokens of the longer sequence of a row):")
    top = max(stats["length_histogram"].values()) or 1
    for edge, count in stats["length_histogram"].items():
        print(f"    {edge:>8} {count:>8} {'#' * int(40 * count / top)}")


def print_stats(name: str, dataset) -> None:
    if hasattr(dataset, "kind"):  # preference rows
        print_preference_stats(name, dataset)
        return
    stats = dataset.stats()
    print(f"== {name} statistics ==")
    for key in ("rows", "documents", "tokens", "trained_tokens", "truncated", "dropped", "skipped",
                "cache_hits", "cache_misses"):
        if key in stats:
            print(f"  {key:<15} {stats[key]}")
    print(f"  {'trained/tokens':<15} {100 * stats['trained_fraction']:.1f}%")
    if "packing" in stats:
        p = stats["packing"]
        print(f"  {'packing':<15} {p['rows']} rows x {dataset.max_seq_len} = {p['slots']} slots, "
              f"{100 * p['fill']:.1f}% filled, {100 * p['trained_per_slot']:.1f}% of slots trained")
    print("  length histogram (tokens per document):")
    top = max(stats["length_histogram"].values()) or 1
    for edge, count in stats["length_histogram"].items():
        print(f"    {edge:>8} {count:>8} {'#' * int(40 * count / top)}")


def preview(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardtune data preview", usage=USAGE)
    parser.add_argument("-n", type=int, default=3, help="rows to show (default 3)")
    parser.add_argument("--split", choices=("train", "eval"), default="train")
    parser.add_argument("--color", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--json", action="store_true", help="print the statistics as JSON only")
    from launcher.compose import add_config_options, compose, config_yaml

    add_config_options(parser)
    args, overrides = parser.parse_known_args(argv)
    from trainer.config import ConfigError
    from trainer.data.errors import DataError
    from trainer.model import build_tokenizer
    from trainer.objectives import build_datasets

    try:
        cfg = compose(overrides, validate_files=True, config_dirs=args.config_dirs, config_name=args.config_name)
        if args.cfg:
            print(config_yaml(cfg))
            return 0
        tokenizer = build_tokenizer(cfg.model)
        train, evaluation = build_datasets(cfg, tokenizer, log=lambda m: print(m, file=sys.stderr))
    except (ConfigError, DataError) as err:
        print(f"shardtune data: {err}", file=sys.stderr)
        return 2
    dataset = train if args.split == "train" else evaluation
    if dataset is None:
        print("shardtune data: no eval split (set data.eval_files or data.eval_fraction)", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(dataset.stats(), indent=1))
        return 0
    color = sys.stdout.isatty() if args.color is None else args.color
    legend = f"{GREEN}trained{RESET} / {DIM}masked{RESET}" if color else "[[trained]] / masked"
    for index in range(min(args.n, len(dataset))):
        if hasattr(dataset, "kind"):
            print_preference_row(tokenizer, dataset, index, color, legend)
            continue
        print(f"== {args.split} row {index}: {len(dataset[index]['input_ids'])} tokens, "
              f"{dataset.label_tokens(index)} trained ({legend}) ==")
        print(render_row(tokenizer, dataset[index], color))
    print_stats(args.split, dataset)
    return 0


def main(argv: List[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: {USAGE}")
        return 0
    if argv[0] != "preview":
        print(f"shardtune data: unknown subcommand {argv[0]!r}\nusage: {USAGE}", file=sys.stderr)
        return 2
    return preview(argv[1:])
