"""`shardtune eval RUN_DIR`: the base model and the fine-tuned one on the same lm-eval tasks, paired.

Both models run the same tasks with the same settings through lm-evaluation-harness (its
transformers backend, one process). Per task and metric: the two scores with their standard
errors, the mean per-document difference and a paired bootstrap interval of it, and a verdict
("better", "worse", "no clear change") that calls a change only when the interval excludes 0. The
retention verdict looks at the general tasks (every task but the run's own held-out data): a
general-knowledge drop is flagged only when an interval says so.

Tasks (--tasks, comma-separated): `shardtune_general` (shipped with shardtune, offline), `heldout`
(the run's eval data), and any task or group lm-eval knows by name (mmlu, arc_easy, hellaswag...,
whose datasets lm-eval fetches from the Hugging Face hub). Results: RUN_DIR/benchmarks/, which
`shardtune report` shows as a table and a plot.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from launcher.eval_tasks import DIRECTION, GENERAL, HELDOUT, OURS, general_task, heldout_tasks
from trainer.paired_stats import mean_and_stderr, paired_bootstrap, verdict
from trainer.run_dir import RunDir

DEFAULT_TASKS = f"{GENERAL},{HELDOUT}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardtune eval", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="examples:\n"
                                       "  shardtune eval runs/exp1\n"
                                       "  shardtune eval runs/exp1 --tasks shardtune_general,heldout,arc_easy "
                                       "--limit 200\n"
                                       "  shardtune eval runs/exp2 --baseline runs/exp1   # two runs, paired")
    p.add_argument("run_dir", type=Path, help="a shardtune run directory with a committed checkpoint")
    p.add_argument("--tasks", default=DEFAULT_TASKS,
                   help=f"comma-separated lm-eval tasks or groups (default {DEFAULT_TASKS}; `heldout` is the "
                        "run's data.eval_files, skipped when the run has none)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step to evaluate (default: the latest committed)")
    p.add_argument("--baseline", default="base",
                   help="what the run is compared with: `base` (default: the model the run started from) or "
                        "another run directory (its latest checkpoint, or RUN_DIR@STEP)")
    p.add_argument("--heldout", nargs="+", default=None, metavar="FILE",
                   help="files for the `heldout` task instead of the run's data.eval_files")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    p.add_argument("--num-fewshot", type=int, default=None,
                   help="few-shot examples for lm-eval's tasks (default: the task's own)")
    p.add_argument("--batch-size", type=int, default=8, help="documents per forward pass (default 8)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto (default): cuda when a GPU is visible, else cpu")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                   help="auto (default): bfloat16 on cuda, float32 on cpu; both models use the same")
    p.add_argument("--bootstrap", type=int, default=2000,
                   help="bootstrap resamples of the paired difference (default 2000)")
    p.add_argument("--confidence", type=float, default=0.95, help="interval coverage (default 0.95)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and of lm-eval's sampling")
    return p


# ------------------------------------------------------------------------------ the two models
def _device_and_dtype(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("shardtune eval --device cuda: no CUDA device is visible")
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    return torch.device(device), getattr(torch, dtype)


def load_trained(run_dir: Path, step: Optional[int], device, dtype):
    """The run's model as trained at `step` (latest committed by default): (model, tokenizer, label)."""
    from launcher.export_cmd import checkpoint_tensors, find_checkpoint, saved_zero_stage, trained_model
    from trainer.config import load_run_config
    from trainer.model import build_tokenizer
    from trainer.train_state import TrainState

    cfg = load_run_config(run_dir)
    folder = find_checkpoint(run_dir, step)
    saved_base = TrainState.read(folder).base if TrainState.exists(folder) else None
    tensors = checkpoint_tensors(folder, saved_zero_stage(run_dir, folder))
    model = trained_model(cfg, tensors, saved_base, "shardtune eval:")
    return _ready(model, device, dtype), build_tokenizer(cfg.model), f"{run_dir.name}@{folder.name}"


def load_base(run_dir: Path, device, dtype):
    """The model the run started from: its model source (or builtin init, same seed), no adapter."""
    import torch

    from trainer.config import load_run_config
    from trainer.model import build_model, build_tokenizer

    cfg = load_run_config(run_dir)
    no_peft = dataclasses.replace(cfg.peft, method="none")
    model_cfg = dataclasses.replace(cfg.model, frozen_modules=[])
    model = build_model(model_cfg, no_peft, {"zero_optimization": {"stage": 0}}, device=torch.device("cpu"),
                        seed=cfg.seed)
    return _ready(model, device, dtype), build_tokenizer(cfg.model), f"base ({cfg.model.name_or_path})"


def _ready(model, device, dtype):
    model.config.use_cache = True  # training turns the KV cache off; lm-eval's generation tasks want it
    return model.to(device=device, dtype=dtype).eval()


def _baseline_run(spec: str) -> Tuple[Path, Optional[int]]:
    path, _, step = spec.partition("@")
    return Path(path).expanduser().resolve(), int(step) if step.isdigit() else None


def baseline_problem(spec: str) -> Optional[str]:
    if spec == "base":
        return None
    path, step = _baseline_run(spec)
    if "@" in spec and step is None:
        return "the step after @ must be a number (RUN_DIR@STEP)"
    if not RunDir(path).is_run():
        return "not `base` and not a shardtune run directory (no config.yaml); give `base`, RUN_DIR or RUN_DIR@STEP"
    return None


def baseline_loader(spec: str, run_dir: Path):
    """A function (device, dtype) -> (model, tokenizer, label) for --baseline (checked by baseline_problem)."""
    if spec == "base":
        return lambda device, dtype: load_base(run_dir, device, dtype)
    other, step = _baseline_run(spec)
    return lambda device, dtype: load_trained(other, step, device, dtype)


# ------------------------------------------------------------------------------ running lm-eval
def task_configs(names: List[str], run_dir: Path, tokenizer, heldout: Optional[List[str]], limit: Optional[int],
                 log) -> List:
    """lm-eval task specs for the asked names: our tasks as configs, lm-eval's by name."""
    from trainer.config import load_run_config

    specs: List = []
    for name in names:
        if name == GENERAL:
            specs.append(general_task(limit))
        elif name == HELDOUT:
            data = load_run_config(run_dir).data
            files = heldout or list(data.eval_files)
            if not files:
                log("heldout: the run has no data.eval_files (pass --heldout FILE...); skipped")
                continue
            tasks, skipped = heldout_tasks(files, tokenizer, dict(data.fields), limit)
            if skipped:
                log(f"heldout: records left out: {dict(skipped)}")
            specs.extend(tasks)
        else:
            specs.append(name)
    return specs


def run_side(model, tokenizer, specs: List, args) -> dict:
    """lm-eval's simple_evaluate on one model; its results with every document's scores."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=args.batch_size, max_length=_max_length(model))
    try:
        return simple_evaluate(model=lm, tasks=specs, num_fewshot=args.num_fewshot, log_samples=True,
                               bootstrap_iters=0, task_manager=TaskManager(), random_seed=args.seed,
                               numpy_random_seed=args.seed, torch_random_seed=args.seed,
                               fewshot_random_seed=args.seed)
    except (ConnectionError, OSError) as err:
        raise SystemExit(f"shardtune eval: a task's dataset could not be read ({err}); lm-eval's own tasks fetch "
                         f"their data from the Hugging Face hub. Offline, use the shipped tasks: {', '.join(OURS)}")


def _max_length(model) -> int:
    config = model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


# ------------------------------------------------------------------------------ pairing
def leaf_tasks(result: dict, name: str) -> List[str]:
    """A task's own name, or the leaf tasks of a group (mmlu -> mmlu_anatomy, ...)."""
    groups = result.get("group_subtasks", {})
    if name not in groups or not groups[name]:
        return [name]
    return [leaf for sub in groups[name] for leaf in leaf_tasks(result, sub)]


def document_scores(result: dict, leaves: List[str]) -> Dict[str, Dict[Tuple[str, int], float]]:
    """metric -> {(leaf task, doc id): score} for every numeric per-document metric."""
    scores: Dict[str, Dict[Tuple[str, int], float]] = {}
    for leaf in leaves:
        for sample in result.get("samples", {}).get(leaf, []):
            for metric in sample.get("metrics", []):
                value = sample.get(metric)
                if isinstance(value, (bool, int, float)):
                    scores.setdefault(metric, {})[(leaf, sample["doc_id"])] = float(value)
    return scores


def reported_names(names: List[str], result: dict) -> List[str]:
    """The asked names as reported: `heldout` becomes the held-out task(s) actually built."""
    out = []
    for name in names:
        if name == HELDOUT:
            out.extend(t for t in result.get("samples", {}) if t == HELDOUT or t.startswith(HELDOUT + "_"))
        elif name in result.get("samples", {}) or name in result.get("group_subtasks", {}):
            out.append(name)
    return out


def higher_is_better(result: dict, leaf: str, metric: str) -> bool:
    if metric in DIRECTION:
        return DIRECTION[metric]
    return bool(result.get("higher_is_better", {}).get(leaf, {}).get(metric, True))


def pair_results(names: List[str], base: dict, tuned: dict, args) -> Tuple[List[dict], List[dict]]:
    """The paired table (one row per task and metric) and the per-document scores behind it."""
    rows, documents = [], []
    for name in reported_names(names, tuned):
        leaves = leaf_tasks(tuned, name)
        base_scores, tuned_scores = document_scores(base, leaves), document_scores(tuned, leaves)
        for index, (metric, tuned_docs) in enumerate(tuned_scores.items()):
            base_docs = base_scores.get(metric, {})
            if set(base_docs) != set(tuned_docs):
                raise SystemExit(f"shardtune eval: task {name}: the two models were scored on different documents "
                                 f"({len(base_docs)} and {len(tuned_docs)}); were both run with the same --limit?")
            keys = sorted(tuned_docs)
            b, t = [base_docs[k] for k in keys], [tuned_docs[k] for k in keys]
            better = higher_is_better(tuned, leaves[0], metric)
            stats = paired_bootstrap(b, t, iters=args.bootstrap, confidence=args.confidence, seed=args.seed)
            (base_mean, base_err), (tuned_mean, tuned_err) = mean_and_stderr(b), mean_and_stderr(t)
            rows.append({"task": name, "metric": metric, "primary": index == 0, "higher_is_better": better,
                         "general": not name.startswith(HELDOUT), "n": len(keys), "base": base_mean,
                         "base_stderr": base_err, "tuned": tuned_mean, "tuned_stderr": tuned_err, **stats,
                         "verdict": verdict(stats["ci_low"], stats["ci_high"], better)})
            documents.extend({"task": leaf, "doc_id": doc, "metric": metric, "base": bv, "tuned": tv}
                             for (leaf, doc), bv, tv in zip(keys, b, t))
    return rows, documents


def retention(rows: List[dict]) -> dict:
    """Did general knowledge survive? Judged on each general task's primary metric only."""
    general = [r for r in rows if r["general"] and r["primary"]]
    worse = [r["task"] for r in general if r["verdict"] == "worse"]
    if not general:
        return {"verdict": "not measured", "text": "no general task was evaluated"}
    if worse:
        return {"verdict": "dropped", "tasks": worse,
                "text": f"general knowledge dropped on {', '.join(worse)} (the interval excludes 0)"}
    return {"verdict": "kept", "tasks": [], "text": f"no drop on {', '.join(r['task'] for r in general)} "
                                                     "(no interval lies wholly below 0)"}


# ------------------------------------------------------------------------------ writing
def _raw(result: dict) -> dict:
    """lm-eval's results without the per-document samples (kept in scores.jsonl) or callables."""
    keep = {k: v for k, v in result.items() if k != "samples"}
    return json.loads(json.dumps(keep, default=str))


def write_results(run_dir: Path, summary: dict, documents: List[dict], raw: Dict[str, dict]) -> Path:
    """RUN_DIR/benchmarks, replaced whole: an interrupted eval leaves the previous results."""
    rd = RunDir(run_dir)
    final = rd.benchmarks
    staging = final.with_name(final.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    in_staging = lambda path: staging / path.name  # noqa: E731
    in_staging(rd.benchmark_results).write_text(json.dumps(summary, indent=1) + "\n")
    with open(in_staging(rd.benchmark_scores), "w") as handle:
        for row in documents:
            handle.write(json.dumps(row) + "\n")
    for side, result in raw.items():
        in_staging(rd.benchmark_raw(side)).write_text(json.dumps(result, indent=1) + "\n")
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def format_table(summary: dict) -> str:
    level = round(summary["settings"]["confidence"] * 100)
    difference = f"difference [{level}% CI]"
    lines = [f"{'task':<22} {'metric':<14} {'n':>5}  {'baseline':>16}  {'tuned':>16}  {difference:>32}  verdict"]
    for r in summary["rows"]:
        arrow = "" if r["higher_is_better"] else " (lower is better)"
        lines.append(f"{r['task']:<22} {r['metric']:<14} {r['n']:>5}  {r['base']:>8.4f} ± {r['base_stderr']:<6.4f}"
                     f"  {r['tuned']:>8.4f} ± {r['tuned_stderr']:<6.4f}  {r['diff']:>+9.4f} "
                     f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]  {r['verdict']}{arrow}")
    return "\n".join(lines)


def evaluate(args) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # checkpoint consolidation needs no accelerator
    run_dir = args.run_dir.expanduser().resolve()
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise SystemExit("shardtune eval --tasks: give at least one task")
    device, dtype = _device_and_dtype(args.device, args.dtype)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its notes on passing a built model are not for users
    log = lambda message: print(f"[eval] {message}", file=sys.stderr, flush=True)  # noqa: E731
    started = time.perf_counter()
    results, labels, seconds = {}, {}, {}
    for side, load in (("tuned", lambda d, t: load_trained(run_dir, args.step, d, t)),
                       ("baseline", baseline_loader(args.baseline, run_dir))):
        side_started = time.perf_counter()
        model, tokenizer, labels[side] = load(device, dtype)
        log(f"{side}: {labels[side]} on {device} ({str(dtype).removeprefix('torch.')})")
        specs = task_configs(names, run_dir, tokenizer, args.heldout, args.limit, log)
        if not specs:
            raise SystemExit("shardtune eval: no task to run")
        results[side] = run_side(model, tokenizer, specs, args)
        del model
        seconds[side] = round(time.perf_counter() - side_started, 1)
    rows, documents = pair_results(names, results["baseline"], results["tuned"], args)
    summary = {"run_dir": str(run_dir), "tuned": labels["tuned"], "baseline": labels["baseline"], "rows": rows,
               "retention": retention(rows),
               "settings": {"tasks": names, "limit": args.limit, "num_fewshot": args.num_fewshot,
                            "batch_size": args.batch_size, "device": str(device),
                            "dtype": str(dtype).removeprefix("torch."), "bootstrap": args.bootstrap,
                            "confidence": args.confidence, "seed": args.seed,
                            "lm_eval": _lm_eval_version()},
               "seconds": {**seconds, "total": round(time.perf_counter() - started, 1)}}
    summary["path"] = str(write_results(run_dir, summary, documents,
                                        {"tuned": _raw(results["tuned"]), "baseline": _raw(results["baseline"])}))
    return summary


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def main(argv: List[str]) -> int:
    args = build_parser().parse_args(argv)
    if not RunDir(args.run_dir.expanduser()).is_run():
        print(f"shardtune eval: {args.run_dir} is not a shardtune run directory (no config.yaml)", file=sys.stderr)
        return 2
    if not 0 < args.confidence < 1:
        print(f"shardtune eval --confidence {args.confidence}: give a coverage between 0 and 1, e.g. 0.95",
              file=sys.stderr)
        return 2
    problem = baseline_problem(args.baseline)
    if problem:
        print(f"shardtune eval --baseline {args.baseline}: {problem}", file=sys.stderr)
        return 2
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        print("shardtune eval needs lm-evaluation-harness: pip install 'shardtune[eval]' (make install has it)",
              file=sys.stderr)
        return 2
    summary = evaluate(args)
    print(f"{summary['tuned']} against {summary['baseline']}:\n{format_table(summary)}")
    print(f"retention: {summary['retention']['text']}")
    print(f"written to {summary['path']} in {summary['seconds']['total']:.0f}s; `shardtune report "
          f"{summary['run_dir']}` shows it")
    return 0
