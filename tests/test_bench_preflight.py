"""FLOPs, MFU and the preflight memory arithmetic against hand-computed cases; bench and the speed
switches end to end on 2 CPU ranks."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from helpers import REPO, shardtune, train, metrics
from trainer.flops import ModelShape, attention_length, flops_per_token, mfu
from trainer.preflight import (GB, Setup, activation_bytes, estimate, lora_dropout_values,
                               model_state_bytes, shape_from_config_dict, verdict)

SHAPE = ModelShape(params=1000, embedding_params=100, tied_embeddings=False, layers=2, heads=4, kv_heads=2,
                   head_dim=8, hidden=32, intermediate=64, vocab=32, largest_layer_params=200)


# ---- FLOPs ------------------------------------------------------------------------------------------

def test_flops_per_token_full_tied_and_lora():
    attention = 12 * 2 * 4 * 8 * 16  # 12 L H Q T = 12288
    assert flops_per_token(SHAPE, 16) == 6 * 900 + attention  # untied: the embedding is not counted
    tied = ModelShape(**{**SHAPE.__dict__, "tied_embeddings": True})
    assert flops_per_token(tied, 16) == 6 * 1000 + attention  # tied: the head is the embedding, counted once
    assert flops_per_token(SHAPE, 16, trainable_params=10) == 4 * 900 + attention + 6 * 10


def test_attention_length_and_mfu():
    assert attention_length([2, 4]) == pytest.approx(20 / 6)  # (4 + 16) / 6
    assert attention_length([]) == 0.0
    assert mfu(tokens_per_s=1000, flops_token=1e6, devices=2, peak_per_device=1e9) == pytest.approx(0.5)


# ---- memory -----------------------------------------------------------------------------------------

def _only_bytes(parts):
    return {k: v[0] for k, v in parts.items()}


def test_zero3_fp32_states():
    s = Setup(world=2, stage=3, precision="fp32", micro_batch=1, seq_len=1, persistent_params=10,
              reduce_bucket=100, prefetch_bucket=50)
    assert _only_bytes(model_state_bytes(SHAPE, s)) == {
        "parameters (partition)": 4000 // 2,
        "parameters (gathered, persistent)": (min(990, 50 + 200) + 10) * 4,  # 1040
        "gradients (model dtype)": 100 * 4,  # the whole reduce bucket
        "gradients (before bucketing)": 1000 * 4,
        "all-gather buffers": 2 * min(1000, 50 + 200) * 4,
        "gradients (fp32 partition)": 4 * 1000 // 2,
        "optimizer (fp32 master)": 4 * 1000 // 2,
        "optimizer (Adam moments)": 8 * 1000 // 2,
    }


def test_stage0_fp32_and_bf16_and_stage2_offload():
    fp32 = Setup(world=2, stage=0, precision="fp32", micro_batch=1, seq_len=1)
    assert _only_bytes(model_state_bytes(SHAPE, fp32)) == {
        "parameters": 4000, "gradients (model dtype)": 4000, "optimizer (fp32 master)": 0,
        "optimizer (Adam moments)": 8000}
    bf16 = Setup(world=2, stage=0, precision="bf16", micro_batch=1, seq_len=1)
    assert sum(_only_bytes(model_state_bytes(SHAPE, bf16)).values()) == 2000 + 2000 + 4000 + 4000 + 8000
    off = Setup(world=4, stage=2, precision="bf16", micro_batch=1, seq_len=1, reduce_bucket=100,
                offload_optimizer=True)
    parts = model_state_bytes(SHAPE, off)
    assert parts["parameters"] == (2000, False)
    assert parts["gradients (model dtype)"] == (200, False)
    assert parts["gradients (before bucketing)"] == (2000, False)
    assert parts["optimizer (Adam moments)"] == (8000 // 4, True)  # offloaded: on the host
    est = estimate(SHAPE, Setup(**{**off.__dict__, "on_gpu": True}))
    assert est.host_total == 1000 + 1000 + 2000 and "runtime (python, torch, deepspeed)" not in est.host


def test_activations_by_checkpointing():
    shape = ModelShape(params=1, embedding_params=0, tied_embeddings=True, layers=2, heads=2, kv_heads=1,
                       head_dim=4, hidden=8, intermediate=16, vocab=32)
    s = Setup(world=1, stage=0, precision="fp32", micro_batch=2, seq_len=3)
    # per token per layer: 5H + 3Q + 2KV + 4I = 40 + 24 + 8 + 64 = 136 values; 6 tokens, 4 bytes, 2 layers
    assert activation_bytes(shape, s) == {"activations (kept for backward)": 136 * 6 * 4 * 2,
                                          "logits and loss": 3 * 6 * 32 * 4}
    full = activation_bytes(shape, Setup(**{**s.__dict__, "checkpointing": "full"}))
    assert full["activations (kept for backward)"] == 8 * 6 * 4 * 2  # only each layer's input
    assert full["activations (one recomputed layer)"] == 136 * 6 * 4
    lora = activation_bytes(shape, Setup(**{**s.__dict__, "lora_dropout_values": 50}))
    assert lora["LoRA dropout inputs"] == 50 * 6 * (4 + 1)  # fp32 dropped inputs + 1-byte masks
    eager = activation_bytes(shape, Setup(**{**s.__dict__, "attn": "eager"}))
    assert eager["attention scores (eager)"] == 2 * 2 * 3 * 3 * 2 * 4 * 2  # 2 x heads x S^2 x B x bytes x L
    chunked = activation_bytes(shape, Setup(**{**s.__dict__, "loss_chunks": 4}))
    assert "logits and loss" not in chunked
    assert chunked["logits and loss (one chunk)"] == 3 * 2 * 32 * 4  # ceil(6 tokens / 4) = 2 tokens at a time
    assert chunked["head inputs (label tokens)"] == 6 * 8 * 4


def test_shape_of_the_builtin_tiny_llama_and_its_lora():
    config = json.loads((REPO / "trainer/builtin/tiny-llama/config.json").read_text())
    shape, trainable, _ = shape_from_config_dict(config)
    # embedding 2048*128 + 2 layers x (q 128*128, k and v 128*64, o 128*128, MLP 3*128*352, 2 norms) + norm
    assert shape.params == 2048 * 128 + 2 * (16384 + 8192 * 2 + 16384 + 3 * 128 * 352 + 256) + 128 == 631424
    assert trainable == shape.params and shape.tied_embeddings and shape.non_embedding_params == 631424
    _, lora, _ = shape_from_config_dict(config, {"r": 8, "targets": "all-linear"})
    # per layer r*(in+out): q 8*256, k 8*192, v 8*192, o 8*256, gate/up/down 8*480 each
    assert lora == 2 * 8 * (256 + 192 + 192 + 256 + 3 * 480) == 37376
    # LoRA's dropout keeps each adapted layer's input: q, k, v, o, gate, up take 128, down takes 352
    assert lora_dropout_values(config, "all-linear") == 2 * (6 * 128 + 352)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix_tuning"])
def test_preflight_counts_each_peft_methods_trainable_parameters_as_peft_makes_them(tmp_path, method):
    """Preflight counts on the meta device what the run trains: the same number as peft's own count
    on the real tiny model (IA3 and prefix tuning were counted as full fine-tuning before)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from launcher.compose import compose
    from launcher.preflight_cmd import plan
    from trainer.model import weights_dir
    from trainer.peft_methods import method as peft_method

    cfg = compose([f"peft={method}", f"run.dir={tmp_path / 'run'}"], validate_files=False)
    setup, _, shape = plan(cfg, on_gpu=False)
    model = AutoModelForCausalLM.from_pretrained(weights_dir(cfg.model, cfg.seed), dtype=torch.float32)
    wrapped = peft.get_peft_model(model, peft_method(method).build(cfg.peft, cfg.model.family))
    trainable, _ = wrapped.get_nb_trainable_parameters()
    print(f"{method}: preflight {setup.trainable:,} trainable of {shape.params:,}, peft {trainable:,}")
    assert setup.trainable == trainable < shape.params


def test_shape_of_an_architecture_without_intermediate_size():
    """GPT-2 names its MLP width n_inner (None: 4 x hidden); preflight must not trip over it."""
    config = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 100, "n_positions": 64}
    shape, _, _ = shape_from_config_dict(config)
    assert (shape.hidden, shape.intermediate, shape.layers, shape.heads) == (64, 256, 2, 4)
    # Its projections are Conv1D: c_attn 64->192, attn c_proj 64->64, c_fc 64->256, mlp c_proj 256->64
    _, lora, _ = shape_from_config_dict(config, {"r": 4, "targets": "all-linear"})
    assert lora == 2 * 4 * ((64 + 192) + (64 + 64) + (64 + 256) + (256 + 64))


def test_verdict_fits_and_suggests_a_remedy():
    s = Setup(world=8, stage=2, precision="bf16", micro_batch=4, seq_len=4096, on_gpu=True)
    big = ModelShape(params=8 * 10 ** 9, embedding_params=500 * 10 ** 6, tied_embeddings=False, layers=32,
                     heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, vocab=128256,
                     largest_layer_params=218 * 10 ** 6)
    est = estimate(big, s)
    assert verdict(big, s, est, 10 ** 15, "H100", 8).startswith("fits on 8 x H100 with")
    text = verdict(big, s, est, 80 * GB, "H100", 8)
    assert text.startswith("will not fit") and "deepspeed=zero3" in text and "compile" not in text
    compiled = replace(s, compiled=True)  # ZeRO-3 refuses compile: the remedy must turn it off too
    assert "deepspeed=zero3 model.compile=false" in verdict(big, compiled, est, 80 * GB, "H100", 8)


def test_one_gpu_lora_verdict_drops_the_dropout_not_zero3():
    """The 8B LoRA run that ran out of memory on one H100 (micro-batch 2 x 4096): preflight must say
    so, and name a remedy that helps on one rank (ZeRO-3 partitions nothing there)."""
    s = Setup(world=1, stage=1, precision="bf16", micro_batch=2, seq_len=4096, on_gpu=True, loss_chunks=8,
              trainable=41_943_040, lora_dropout_values=32 * (6 * 4096 + 14336))
    big = ModelShape(params=8_030_261_248, embedding_params=525_336_576, tied_embeddings=False, layers=32,
                     heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, vocab=128256,
                     largest_layer_params=525_336_576)
    text = verdict(big, s, estimate(big, s), int(79.2 * GB), "H100", 1)
    assert text.startswith("will not fit") and "try peft.dropout=0" in text and "zero3" not in text, text


def test_preflight_command_prints_table_and_verdict():
    proc = shardtune("preflight", "deepspeed.reduce_bucket_size=1000000", "--json", check=True)
    facts = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert facts["params"] == 631424 and facts["fits"] is True
    assert facts["device"]["gradients (model dtype)"] == 1000000 * 4


# ---- end to end ----------------------------------------------------------------------------------

BENCH_FIELDS = ("median_step_time_s", "trained_tokens_per_s", "input_tokens_per_s", "flops_per_token", "mfu",
                "breakdown_median_s", "peak_memory", "attention_length_T")


@pytest.mark.distributed
def test_bench_vs_hf_writes_every_field(tmp_path):
    proc = shardtune("bench", "--steps", "2", "--warmup", "1", "--vs", "hf", f"run.dir={tmp_path}",
                     "data.max_seq_len=128", "train.micro_batch_size=2", "deepspeed.reduce_bucket_size=1000000",
                     "cluster.timeout_s=120", "cluster.allocator=auto", check=True)
    report = json.loads((tmp_path / "bench.json").read_text())
    ours, hf = report["ours"][0], report["hf"][0]
    for field in BENCH_FIELDS:
        assert ours[field] is not None, field
    assert ours["timed_steps"] == 2 and hf["timed_steps"] == 2
    assert set(ours["breakdown_median_s"]) == {"data", "forward", "backward", "loss_allreduce", "optimizer"}
    assert 0 < ours["mfu"] < 1 and ours["trained_tokens"] < ours["input_tokens"]
    # Both sides trained the very same samples: our sampler's order is fed to HF Trainer.
    assert ours["trained_tokens"] == hf["trained_tokens"] and ours["input_tokens"] == hf["input_tokens"]
    for rank in ("rank0", "rank1"):
        assert ours["peak_memory"][rank]["peak_rss_bytes"] > 100 * 2 ** 20
    # cluster.allocator=auto: the library found here (CI installs tcmalloc) is the one the ranks run with
    from trainer.allocator import choose

    library = choose("auto", on_gpu=False)
    expected = "glibc" if library is None else "jemalloc" if "jemalloc" in library else "tcmalloc"
    assert ours["peak_memory"]["rank0"]["allocator"] == expected
    assert report["ratio_trained_tokens_per_s"] > 0 and "ours / HF Trainer" in proc.stdout
    # The preflight estimate is put next to the measured peak (the target is 15 %; a looser bound
    # here, since a 3-step run on a shared CI machine is not where the figure is taken).
    pre = report["preflight"]
    assert pre["measured"] == "peak_rss_bytes" and abs(pre["error"]) < 0.25, pre
    assert "preflight estimate" in proc.stdout


@pytest.mark.distributed
@pytest.mark.parametrize("switch", ["model.attn_implementation=eager",
                                    "model.activation_checkpointing=full",
                                    "model.activation_checkpointing=selective"])
def test_speed_switch_trains(tmp_path, switch):
    train(tmp_path, switch, "train.max_steps=3", "deepspeed.reduce_bucket_size=1000000", check=True)
    records = metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] is not None and 0 < r["loss"] < 20 for r in records)


@pytest.mark.distributed
def test_compile_trains_the_same_losses_and_compiles_once(tmp_path):
    """model.compile=true on CPU (inductor's C++ backend), ZeRO-2, packed rows of varying lengths,
    with the chunked loss (its label count varies per batch): the same loss curve as eager, and
    nothing compiled after the first step (data.pad_to=auto pads every batch to max_seq_len under
    compile, the engine's hooks stay outside the graph, the chunked loss runs eagerly)."""
    common = ["deepspeed=zero2", "data.packing=true", "train.max_steps=4", "deepspeed.reduce_bucket_size=1000000"]
    eager = train(tmp_path / "eager", *common, check=True)
    compiled = train(tmp_path / "compiled", *common, "model.compile=true", "model.loss_chunks=4", check=True)
    eager_losses = [r["loss"] for r in metrics(tmp_path / "eager")]
    compiled_losses = [r["loss"] for r in metrics(tmp_path / "compiled")]
    assert len(compiled_losses) == 4 and compiled_losses == pytest.approx(eager_losses, abs=1e-4)
    assert "torch.compile compiled" not in compiled.stdout, compiled.stdout[-3000:]
    assert "torch.compile compiled" not in eager.stdout


def test_a_recompile_after_the_first_step_is_reported_with_its_likely_cause():
    from types import SimpleNamespace as NS

    from trainer.loop import _report_recompile

    for pad_to, cause in (("longest", "data.pad_to=max_seq_len"), ("auto", "a graph break that varies")):
        said = []
        ctx = NS(cfg=NS(model=NS(compile=True), data=NS(pad_to=pad_to, max_seq_len=128)), log=said.append)
        _report_recompile(ctx, 1, {"compiled_frames": 5})  # the first step compiles: not news
        _report_recompile(ctx, 3, {"compiled_frames": 0})
        assert said == []
        _report_recompile(ctx, 3, {"compiled_frames": 2})
        assert len(said) == 1 and "step 3: torch.compile compiled 2 more frame(s)" in said[0] and cause in said[0]


def test_compile_with_zero3_is_refused_before_spawn():
    from trainer.config import ConfigError, RootConfig
    from trainer.validate import validate

    cfg = RootConfig()
    cfg.model.name_or_path, cfg.run.dir, cfg.run.name = "builtin:tiny-llama", "/tmp/x", "x"
    cfg.model.compile, cfg.deepspeed.stage = True, 3
    with pytest.raises(ConfigError, match="deepspeed=zero1 or zero2 with compile"):
        validate(cfg, has_cuda=False, check_files=False)
    cfg.deepspeed.stage = 2
    validate(cfg, has_cuda=False, check_files=False)


@pytest.mark.parametrize("key, value, message", [
    ("attn_implementation", "flex_attention", "FlexAttention has no backward on CPU"),
    ("attn_implementation", "flash_attention_2", "flash_attention_2 needs a CUDA GPU")])
def test_switches_the_cpu_cannot_run_are_rejected_clearly(key, value, message):
    from trainer.config import ConfigError, RootConfig
    from trainer.validate import validate

    cfg = RootConfig()
    cfg.model.name_or_path, cfg.run.dir, cfg.run.name = "builtin:tiny-llama", "/tmp/x", "x"
    setattr(cfg.model, key, value)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, has_cuda=False, check_files=False)


# ---- checkpointing applies to LoRA's activations too; estimating a GPU job on a CPU machine ----------

LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
               "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072,
               "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu"}


def test_lora_with_full_checkpointing_keeps_one_layers_dropout_inputs(tmp_path):
    """Llama-3.1-8B, LoRA r16 on all linear layers with dropout 0.05 (peft=lora), 4096 tokens, full
    checkpointing, bf16 (GPU): the activations against the formula written out by hand."""
    from launcher.compose import compose
    from launcher.preflight_cmd import plan

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    cfg = compose(["model=local", f"model.name_or_path={tmp_path}", "peft=lora", "data.max_seq_len=4096",
                   "train.micro_batch_size=1", "model.activation_checkpointing=full", "cluster.nproc_per_node=8"],
                  validate_files=False)
    setup, est, _ = plan(cfg, on_gpu=True)
    assert setup.precision == "bf16" and setup.checkpointing == "full"

    L, H, I, V, T, b = 32, 4096, 14336, 128256, 4096, 2  # layers, hidden, MLP, vocab, tokens, bf16 bytes
    Q, KV = 32 * 128, 8 * 128  # query width, key/value width (8 kv heads of 128)
    # Full checkpointing keeps each layer's input (the boundary) for every layer ...
    boundaries = L * H * T * b
    # ... and backward recomputes one layer at a time, which then holds all it keeps for backward:
    # its input, the two norms' normalised and scaled outputs and the attention residual (5H), the
    # rotated q, the attention output and o_proj's input (3Q), the rotated k and v (2KV), and the
    # MLP's gate, up, activation and product (4I).
    one_layer = (5 * H + 3 * Q + 2 * KV + 4 * I) * T * b
    # LoRA's dropout runs inside the checkpointed layer, so its dropped inputs (bf16, plus a 1-byte
    # mask) exist for the recomputed layer only: q, k, v, o, gate and up take H values, down takes I.
    lora_dropout = (6 * H + I) * T * (b + 1)
    # Around the loss: fp32 logits, their log-softmax and one gradient of that size.
    logits = 3 * T * V * 4
    by_hand = boundaries + one_layer + lora_dropout + logits  # 8.02 GiB; 23.75 GiB of dropout alone before

    estimated = sum(v for k, v in est.device.items() if k.startswith(("activations", "LoRA", "logits")))
    assert abs(estimated - by_hand) / by_hand < 0.15, (estimated / GB, by_hand / GB)
    assert est.device["LoRA dropout inputs (one recomputed layer)"] < 0.5 * GB
    assert "LoRA dropout inputs" not in est.device  # not every layer's


def test_selective_checkpointing_keeps_loras_matmul_outputs_not_its_dropout_inputs():
    shape = ModelShape(params=1, embedding_params=0, tied_embeddings=True, layers=2, heads=2, kv_heads=1,
                       head_dim=4, hidden=8, intermediate=16, vocab=32)
    s = Setup(world=1, stage=0, precision="fp32", micro_batch=2, seq_len=3, lora_dropout_values=50,
              lora_output_values=70, checkpointing="selective")
    parts = activation_bytes(shape, s)
    assert parts["LoRA dropout inputs (one recomputed layer)"] == 50 * 6 * 5 // 2  # one of the 2 layers
    assert parts["LoRA matmul outputs (selective keeps)"] == 70 * 6 * 4  # every layer's (values are all layers')
    none = activation_bytes(shape, replace(s, checkpointing="none"))
    assert none["LoRA dropout inputs"] == 50 * 6 * 5 and "LoRA matmul outputs (selective keeps)" not in none


def test_the_advice_never_names_what_the_run_already_uses():
    big = ModelShape(params=8_030_261_248, embedding_params=525_336_576, tied_embeddings=False, layers=32,
                     heads=32, kv_heads=8, head_dim=128, hidden=4096, intermediate=14336, vocab=128256,
                     largest_layer_params=218_112_000)
    lora = Setup(world=8, stage=3, precision="bf16", micro_batch=1, seq_len=4096, on_gpu=True, peft="lora",
                 trainable=41_943_040, checkpointing="full", loss_chunks=8)
    text = verdict(big, lora, estimate(big, lora), 1 * GB, "GPU", 8)  # fits nowhere: every remedy, then the rest
    assert text.startswith("will not fit") and "use more ranks" in text, text
    for in_use in ("peft=lora", "deepspeed=zero3 ", "activation_checkpointing=full", "loss_chunks=8", "dropout"):
        assert in_use not in text, (in_use, text)
    full = replace(lora, peft="none", trainable=None)
    assert "peft=lora" in verdict(big, full, estimate(big, full), 1 * GB, "GPU", 8)


def test_a_cpu_machine_estimates_a_gpu_job_per_gpu(tmp_path):
    """`--device cuda --gpu-memory 80GB` here (no GPU): GPU defaults (bf16), per-GPU figures against
    the given memory, GPU-only settings accepted; without --gpu-memory it says what is missing."""
    from launcher.preflight_cmd import main

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_31_8B))
    job = ["model=local", f"model.name_or_path={tmp_path}", "peft=lora", "data.max_seq_len=4096",
           "model.activation_checkpointing=full", "cluster.nproc_per_node=8", "train.micro_batch_size=1"]
    proc = shardtune("preflight", "--device", "cuda", "--gpu-memory", "80GB", *job,
                     "model.attn_implementation=flash_attention_2", check=True)
    assert "bf16, 8 ranks" in proc.stdout and ", GPU\n" in proc.stdout, proc.stdout
    assert "total per GPU" in proc.stdout and "runtime (python" not in proc.stdout
    assert "verdict: fits on 8 x GPU (80.0 GB, --gpu-memory) with" in proc.stdout, proc.stdout
    import torch

    if not torch.cuda.is_available():
        assert main(["--device", "cuda", *job]) == 2
