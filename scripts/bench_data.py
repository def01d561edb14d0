"""Data pipeline benchmark: tokenization + packing throughput, cold and from cache, packing
efficiency against padding, and data.streaming (index build, its size against the prepared store,
the cost of a row read and tokenised on the fly), on a generated chat dataset (default 100 k samples).

    .venv/bin/python scripts/bench_data.py [--samples 100000] [--num-proc 2] [--max-seq-len 1024]

Lengths follow a long-tailed (log-normal) distribution like real chat SFT data: 1-4 turns, user
turns ~25 words, assistant turns ~70 words. Prints figures; it is not a timed test.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORDS = ("the a of to and in is that for it with as was on be by this are or from at which an have not "
         "model data train token loss batch answer question city river number seven because however "
         "Paris Berlin Tokyo quickly large small first second value compute result explain example").split()


def words(rng, mean_words: float) -> str:
    n = max(1, int(rng.lognormal(np.log(mean_words), 0.8)))
    return " ".join(rng.choice(WORDS, n)).capitalize() + "."


def generate(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
            for _ in range(int(rng.choice([1, 2, 3, 4], p=[0.55, 0.25, 0.12, 0.08]))):
                messages += [{"role": "user", "content": words(rng, 25)},
                             {"role": "assistant", "content": words(rng, 70)}]
            handle.write(json.dumps({"messages": messages}) + "\n")


def generate_text(path: Path, n: int, words_per_doc: int, seed: int = 0) -> None:
    """`n` plain-text documents of `words_per_doc` words: fixed-length rows once truncated."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        for _ in range(n):
            handle.write(json.dumps({"text": " ".join(rng.choice(WORDS, words_per_doc))}) + "\n")


def padding_slots(lengths: np.ndarray, micro_batch: int, rng) -> int:
    """Token slots when random micro-batches are padded to their own longest sample."""
    order = rng.permutation(len(lengths))
    usable = len(order) - len(order) % micro_batch
    batches = lengths[order[:usable]].reshape(-1, micro_batch)
    return int(batches.max(axis=1).sum() * micro_batch)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, default=2)
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--read-rows", type=int, default=2000, help="random rows read, streamed and prepared")
    args = parser.parse_args()
    from trainer.config import DataConfig, ModelConfig
    from trainer.data import build_datasets
    from trainer.model import build_tokenizer

    tokenizer = build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    data = work / "chat.jsonl"
    generate(data, args.samples)
    print(f"dataset: {args.samples} chat samples, {data.stat().st_size / 1e6:.1f} MB, tokenizer builtin:tiny-llama "
          f"(vocab 2048), max_seq_len {args.max_seq_len}, num_proc {args.num_proc}")
    results = {}
    for label, packing in (("cold (tokenize + pack)", True), ("cached (load + pack)", True),
                           ("cached (load, no packing)", False)):
        cfg = DataConfig(train_files=[str(data)], cache_dir=str(work / "cache"), max_seq_len=args.max_seq_len,
                         packing=packing, num_proc=args.num_proc)
        started = time.perf_counter()
        train, _ = build_datasets(cfg, tokenizer)
        seconds = time.perf_counter() - started
        stats = train.stats()
        results[label] = (train, stats)
        print(f"{label:<27} {seconds:7.2f} s  {stats['documents'] / seconds:10,.0f} samples/s  "
              f"{stats['tokens'] / seconds:12,.0f} tokens/s")
    packed, stats = results["cold (tokenize + pack)"]
    lengths = packed.corpus.lengths
    trained = stats["trained_tokens"]
    rng = np.random.default_rng(0)
    pad_batch = padding_slots(lengths, args.micro_batch, rng)
    pad_max = len(lengths) * args.max_seq_len
    print(f"documents {stats['documents']}, tokens {stats['tokens']:,}, trained (assistant) tokens {trained:,} "
          f"({100 * stats['trained_fraction']:.1f}%), truncated {stats['truncated']}, "
          f"mean length {lengths.mean():.0f}, p50 {np.median(lengths):.0f}, p99 {np.percentile(lengths, 99):.0f}")
    print("trained tokens / sequence slots:")
    print(f"  packed rows of {args.max_seq_len}:             {100 * trained / stats['packing']['slots']:5.1f} %  "
          f"({stats['packing']['rows']:,} rows, {100 * stats['packing']['fill']:.1f} % of slots hold a token)")
    print(f"  padded per micro-batch of {args.micro_batch}:          {100 * trained / pad_batch:5.1f} %  "
          f"(non-pad fill {100 * stats['tokens'] / pad_batch:.1f} %)")
    print(f"  padded to max_seq_len:                {100 * trained / pad_max:5.1f} %")
    print(f"packing needs {pad_batch / stats['packing']['slots']:.2f}x fewer slots than per-batch padding")
    bench_streaming(data, work, tokenizer, args, packed)


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())


def bench_streaming(data: Path, work: Path, tokenizer, args, prepared) -> None:
    """data.streaming=true on the same file: the index pass, its size, and rows read on the fly."""
    from trainer.config import DataConfig
    from trainer.data import build_datasets

    cfg = DataConfig(train_files=[str(data)], cache_dir=str(work / "streamed"), max_seq_len=args.max_seq_len,
                     packing=True, num_proc=args.num_proc, streaming=True)
    started = time.perf_counter()
    streamed, _ = build_datasets(cfg, tokenizer)
    index_s = time.perf_counter() - started
    index_bytes = folder_bytes(streamed.corpus.stores[0].folder)
    store_bytes = folder_bytes(prepared.corpus.stores[0].folder)
    print(f"streaming: index built in {index_s:.2f} s; index {index_bytes / 1e6:.2f} MB vs prepared store "
          f"{store_bytes / 1e6:.2f} MB ({store_bytes / index_bytes:.1f}x smaller; "
          f"{index_bytes / len(streamed.corpus):.0f} bytes per document)")
    rows = np.random.default_rng(1).choice(len(prepared), min(args.read_rows, len(prepared)), replace=False)
    timings = {}
    for label, dataset in (("prepared (memory-mapped)", prepared), ("streamed (read + tokenise)", streamed)):
        started = time.perf_counter()
        read = [dataset[int(i)] for i in rows]
        timings[label] = (time.perf_counter() - started) / len(rows)
        timings[label + " rows"] = read
    same = sum(a == b for a, b in zip(timings["prepared (memory-mapped) rows"], timings["streamed (read + tokenise) rows"]))
    documents = sum(len(prepared.rows[int(i)]) for i in rows)
    for label in ("prepared (memory-mapped)", "streamed (read + tokenise)"):
        print(f"  {label:<27} {1e3 * timings[label]:7.3f} ms per packed row "
              f"({documents / len(rows):.1f} documents a row)")
    print(f"  identical rows: {same} of {len(rows)}")
    # A step of 8 micro-batches: its rows read in place, or read ahead (the loop's prefetch) during
    # the step before, whose compute is stood in for by a sleep (GPU work releases the GIL).
    step_rows, compute_s = [[int(i) for i in rows[k:k + 8 * args.micro_batch]]
                            for k in range(0, len(rows), 8 * args.micro_batch)], 0.2
    waits = {"in place": [], "read ahead": []}
    for ahead in (False, True):
        for current, upcoming in zip(step_rows, step_rows[1:]):
            if ahead:
                streamed.prefetch(upcoming)
            time.sleep(compute_s)
            started = time.perf_counter()
            _ = [streamed[i] for i in upcoming]
            waits["read ahead" if ahead else "in place"].append(time.perf_counter() - started)
    for label, values in waits.items():
        print(f"  loop waits per step of {8 * args.micro_batch} rows, {label}: {1e3 * np.median(values):7.1f} ms "
              f"(median of {len(values)}; {1e3 * compute_s:.0f} ms of compute between steps)")


if __name__ == "__main__":
    main()
