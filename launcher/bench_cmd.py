"""`shardtune bench [--steps N] [--warmup K] [--vs hf] [--repeats R] <overrides>`

Trains N + K steps with our trainer (train.timing=true), drops the K warm-up steps, and writes
<run.dir>/bench.json: median step time, trained tokens/s (tokens that carry a label: not padding,
not masked prompt tokens) and input tokens/s (all non-padding tokens), MFU with its convention,
peak memory per rank, and the per-phase breakdown. With --vs hf the same run directory is trained
by HF Trainer (scripts/hf_peer.py) under the deepspeed launcher with the same ds_config.json,
alternating ours / HF R times, and the ratio of trained tokens/s is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from launcher.local import usable_cpus
from launcher.resources import CODE_ROOT, HF_PEER_SCRIPT
from trainer.run_dir import RunDir

# Settings that keep a bench run to training steps only: no eval, checkpoints or exports in between.
BENCH_OVERRIDES = ["train.timing=true", "checkpoint.every_steps=0", "checkpoint.save_final=false",
                   "checkpoint.export_final=false", "eval.baseline=false", "eval.every_steps=0",
                   "data.eval_files=[]", "data.eval_fraction=0", "train.log_every=1000000",
                   "eval.general_files=[]", "eval.prompts=[]", "eval.prompts_file=null"]


def parse_args(argv: List[str]):
    parser = argparse.ArgumentParser(prog="shardtune bench", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=3, help="steps run first and not timed")
    parser.add_argument("--vs", choices=["hf"], default=None, help="also run HF Trainer on the same setup")
    parser.add_argument("--repeats", type=int, default=1, help="alternating rounds of ours / HF")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, as for `shardtune train`")
    from launcher.compose import add_config_options

    add_config_options(parser)
    return parser.parse_args(argv)


def _run(argv: List[str], env: Dict[str, str]) -> None:
    proc = subprocess.run(argv, cwd=CODE_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:6])} ... exited {proc.returncode}:\n{proc.stdout[-4000:]}")


def run_ours(run_dir: Path, flags: List[str], overrides: List[str], steps: int, env: Dict[str, str]) -> None:
    """`flags`: Hydra's --config-dir/--config-name, before every override (Hydra takes none after one)."""
    _run([sys.executable, "-m", "launcher.cli", "train", *flags, f"run.dir={run_dir}", "resume=never",
          *overrides, *BENCH_OVERRIDES, f"train.max_steps={steps}"], env)


def run_hf(run_dir: Path, out: Path, steps: int, world: int, env: Dict[str, str]) -> None:
    from launcher.local import free_port

    _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(world), "--master_port",
          str(free_port()), str(HF_PEER_SCRIPT), "--run-dir", str(run_dir),
          "--out", str(out), "--steps", str(steps)], env)


def summarize(folder: Path, warmup: int, flops_token_fn, peak_total: Optional[float]) -> dict:
    """bench figures of one run from its timing/rank*.json files."""
    ranks = [json.loads(p.read_text()) for p in sorted(RunDir(folder).timing.glob("rank*.json"))]
    timed = [[s for s in r["steps"] if s["step"] >= warmup] for r in ranks]
    n = min(len(t) for t in timed)
    if n == 0:
        raise RuntimeError(f"{folder}: no step after the {warmup} warm-up steps was recorded")
    step_times = [max(t[i]["seconds"] for t in timed) for i in range(n)]  # the slowest rank sets the pace
    total_time = sum(step_times)
    trained = sum(t[i]["local_trained_tokens"] for t in timed for i in range(n))
    inputs = sum(t[i]["local_input_tokens"] for t in timed for i in range(n))
    squares = sum(t[i]["local_square_lengths"] for t in timed for i in range(n))
    mean_len = squares / inputs if inputs else 0.0
    flops_token = flops_token_fn(mean_len)
    phases = sorted({k for t in timed for s in t for k in s["phases"]})
    breakdown = {k: statistics.median(s["phases"].get(k, 0.0) for s in timed[0][:n]) for k in phases}
    result = {
        "timed_steps": n, "median_step_time_s": statistics.median(step_times), "mean_step_time_s": total_time / n,
        "trained_tokens_per_s": trained / total_time, "input_tokens_per_s": inputs / total_time,
        "trained_tokens": trained, "input_tokens": inputs, "attention_length_T": mean_len,
        "flops_per_token": flops_token,
        "mfu": (inputs / total_time * flops_token / peak_total) if peak_total else None,
        "breakdown_median_s": breakdown or None,
        # torch.compile work inside the timed steps (model.compile=true): their times include it
        "compiled_frames_timed": sum(s.get("compiled_frames", 0) for t in timed for s in t[:n]),
        "peak_memory": {f"rank{r['rank']}": r["memory"] for r in ranks},
    }
    return result


def flops_function(run_dir: Path):
    """T -> FLOPs per token for the run's model (and LoRA, when trainable < all)."""
    from launcher.preflight_cmd import plan
    from trainer.config import load_run_config
    from trainer.flops import flops_per_token

    cfg = load_run_config(run_dir)
    setup, _, shape = plan(cfg, on_gpu=False)
    return lambda T: flops_per_token(shape, T, setup.trainable)


def peak_flops_total(run_dir: Path, world: int, threads: int, precision: str) -> tuple:
    from trainer.flops import measure_cpu_peak, peak_flops

    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0)
            peak = peak_flops(name, precision)
            return (peak * world if peak else None), f"{name} datasheet dense {precision} peak x {world}"
    except Exception:  # noqa: BLE001 - no CUDA: fall through to the CPU measurement
        pass
    per_rank = measure_cpu_peak(threads)
    return per_rank * world, f"measured fp32 1024^3 matmul with {threads} thread(s) x {world} ranks"


def preflight_check(cfg, ours: List[dict], on_gpu: bool) -> dict:
    """`shardtune preflight`'s per-rank estimate for this run next to the measured peak.

    Measured: the largest peak over ranks and rounds, resident set size on CPU, PyTorch's peak
    allocated bytes on GPU (what the estimate counts: the CUDA context is outside it).
    """
    from launcher.preflight_cmd import plan

    _, est, _ = plan(cfg, on_gpu)
    key = "peak_allocated_bytes" if on_gpu else "peak_rss_bytes"
    measured = max(m[key] for r in ours for m in r["peak_memory"].values())
    predicted = est.rank_total(on_gpu)
    return {"predicted_bytes_per_rank": predicted, "measured_peak_bytes_per_rank": measured, "measured": key,
            "error": (predicted - measured) / measured}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a and b else None


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    from launcher.compose import compose, config_yaml
    from trainer.validate import ConfigError

    try:
        cfg = compose(args.overrides, config_dirs=args.config_dirs, config_name=args.config_name)
    except ConfigError as err:
        print(f"shardtune bench: {err}", file=sys.stderr)
        return 2
    if args.cfg:
        print(config_yaml(cfg))
        return 0
    base = Path(cfg.run.dir).expanduser().resolve()
    world = cfg.cluster.world_size
    threads = cfg.cluster.threads_per_rank or max(1, usable_cpus() // cfg.cluster.nproc_per_node)
    python_path = os.pathsep.join(filter(None, [str(CODE_ROOT), os.environ.get("PYTHONPATH")]))  # keep the user's
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=python_path)
    total_steps = args.steps + args.warmup
    rounds: List[dict] = []
    for r in range(args.repeats):
        ours = base / f"ours-{r}"
        started = time.time()
        overrides = [o for o in args.overrides if not o.startswith("run.dir=")]  # each round has its own dir
        flags = [*(arg for d in args.config_dirs for arg in ("--config-dir", str(Path(d).expanduser().resolve()))),
                 "--config-name", args.config_name]
        run_ours(ours, flags, overrides + [f"cluster.threads_per_rank={threads}"], total_steps, env)
        entry = {"ours_dir": str(ours), "ours_wall_s": time.time() - started}
        if args.vs == "hf":
            if "DS_ACCELERATOR" not in env and not _has_cuda():
                env["DS_ACCELERATOR"] = "cpu"
            started = time.time()
            run_hf(ours, base / f"hf-{r}", total_steps, world, env)
            entry.update(hf_dir=str(base / f"hf-{r}"), hf_wall_s=time.time() - started)
        rounds.append(entry)
        print(f"[bench] round {r + 1}/{args.repeats} done", file=sys.stderr, flush=True)
    report = build_report(rounds, args, world, threads)
    base.mkdir(parents=True, exist_ok=True)
    (base / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    print(render(report))
    print(f"written: {base / 'bench.json'}")
    return 0


def _has_cuda() -> bool:
    from launcher.devices import gpu_count

    return gpu_count() > 0


def build_report(rounds: List[dict], args, world: int, threads: int) -> dict:
    from trainer.config import load_run_config
    from trainer.ds_config import resolve_precision
    from trainer.flops import CONVENTION

    first = Path(rounds[0]["ours_dir"])
    cfg = load_run_config(first)
    flops_fn = flops_function(first)
    precision = resolve_precision(cfg, _has_cuda())
    peak, peak_source = peak_flops_total(first, world, threads, precision)
    report = {
        "settings": {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "world_size": world,
                     "threads_per_rank": threads, "overrides": args.overrides, "precision": precision,
                     "micro_batch_size": cfg.train.micro_batch_size, "grad_accum": cfg.train.grad_accum,
                     "max_seq_len": cfg.data.max_seq_len, "packing": cfg.data.packing},
        "tokens": "trained = tokens that carry a label (not padding, not masked prompt tokens); "
                  "input = all non-padding tokens; tokens/s = tokens of the timed steps / their summed wall time",
        "step_time": "wall time between consecutive optimizer-step ends, the slowest rank's",
        "mfu_convention": CONVENTION + "; MFU counts input (non-padding) tokens",
        "peak_flops_total": peak, "peak_flops_source": peak_source,
        "ours": [summarize(Path(r["ours_dir"]), args.warmup, flops_fn, peak) for r in rounds],
    }
    report["preflight"] = preflight_check(cfg, report["ours"], _has_cuda())
    if args.vs == "hf":
        report["hf"] = [summarize(Path(r["hf_dir"]), args.warmup, flops_fn, peak) for r in rounds]
        ours_tps = statistics.median(o["trained_tokens_per_s"] for o in report["ours"])
        hf_tps = statistics.median(h["trained_tokens_per_s"] for h in report["hf"])
        report["ratio_trained_tokens_per_s"] = _ratio(ours_tps, hf_tps)
        report["ratio_per_round"] = [_ratio(o["trained_tokens_per_s"], h["trained_tokens_per_s"])
                                     for o, h in zip(report["ours"], report["hf"])]
    return report


def _peak_memory_text(peaks: dict) -> str:
    """The largest per-rank peaks: GPU allocated / reserved when on a GPU, resident set size always."""
    def most(key: str) -> float:
        return max(m.get(key, 0) for m in peaks.values()) / 2 ** 30

    rss = f"peak RSS {most('peak_rss_bytes'):.2f} GiB/rank"
    if any("peak_allocated_bytes" in m for m in peaks.values()):
        return (f"peak GPU {most('peak_allocated_bytes'):.2f} GiB allocated / {most('peak_reserved_bytes'):.2f} "
                f"reserved per rank, {rss}")
    return rss


def render(report: dict) -> str:
    lines = []
    for side in ("ours", "hf"):
        for i, r in enumerate(report.get(side, [])):
            mfu = f"{100 * r['mfu']:.2f}%" if r["mfu"] is not None else "n/a"
            lines.append(f"{side:>4} round {i}: median step {r['median_step_time_s']:.3f}s, "
                         f"{r['trained_tokens_per_s']:.0f} trained tok/s ({r['input_tokens_per_s']:.0f} input tok/s), "
                         f"MFU {mfu}, {_peak_memory_text(r['peak_memory'])}")
            if r["breakdown_median_s"]:
                lines.append("      breakdown (median s): " + ", ".join(
                    f"{k} {v:.3f}" for k, v in r["breakdown_median_s"].items()))
            if r.get("compiled_frames_timed"):
                lines.append(f"      torch.compile compiled {r['compiled_frames_timed']} frame(s) during the timed "
                             "steps (their times include it): more warm-up, or fixed shapes (data.pad_to)")
    pre = report["preflight"]
    lines.append(f"preflight estimate {pre['predicted_bytes_per_rank'] / 2 ** 30:.3f} GiB/rank vs measured "
                 f"{pre['measured']} {pre['measured_peak_bytes_per_rank'] / 2 ** 30:.3f} GiB: "
                 f"{100 * pre['error']:+.1f} %")
    if "ratio_trained_tokens_per_s" in report:
        lines.append(f"ours / HF Trainer, trained tokens/s: {report['ratio_trained_tokens_per_s']:.2f}x "
                     f"(per round: {', '.join(f'{x:.2f}' for x in report['ratio_per_round'] if x)})")
    lines.append(f"MFU convention: {report['mfu_convention']}; peak: {report['peak_flops_source']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
