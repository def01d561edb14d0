"""peft methods and exports: every method trains under ZeRO-2 and ZeRO-3 on 2 CPU ranks, and what it
exports loads with plain transformers / peft (tests/fixtures/peft_export/load_and_compare.py runs in
a separate interpreter that imports no shardtune code) giving the trainer's own logits.

ZeRO-3 runs use stage3_param_persistence_threshold=0, so every parameter - adapters included - is
partitioned: an export that forgot to gather would write empty tensors and fail here.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO, run_method, shardtune
from helpers import subprocess_env as shardtune_env
from trainer.config import PeftConfig, RootConfig
from trainer.validate import ConfigError, validate

LOADER = REPO / "tests" / "fixtures" / "peft_export" / "load_and_compare.py"
METHODS = ["none", "lora", "dora", "ia3", "prefix_tuning"]
TOLERANCE = 1e-4  # max |logit difference| in fp32 between the trainer and the reloaded export


def load_and_compare(export_dir: Path, probe: Path) -> dict:
    """Run the plain-transformers loader in a fresh interpreter; return its JSON facts."""
    proc = subprocess.run([sys.executable, str(LOADER), str(export_dir), str(probe)], env=shardtune_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- unit: no subprocess, no ranks
@pytest.mark.parametrize("method,kind", [("lora", "LoraConfig"), ("dora", "LoraConfig"), ("ia3", "IA3Config"),
                                         ("prefix_tuning", "PrefixTuningConfig")])
def test_peft_config_per_method(method, kind):
    from trainer.peft_methods import peft_config

    config = peft_config(PeftConfig(method=method, target_modules="family", use_rslora=True,
                                    modules_to_save=["lm_head"]), "qwen2_5")
    assert type(config).__name__ == kind
    assert config.modules_to_save == ["lm_head"]
    if method in ("lora", "dora"):
        assert set(config.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                              "down_proj"}
        assert config.use_rslora and config.use_dora == (method == "dora")
    if method == "ia3":
        assert set(config.target_modules) == {"k_proj", "v_proj", "down_proj"}
        assert set(config.feedforward_modules) == {"down_proj"}


def test_lora_all_linear_skips_the_output_head():
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.peft_methods import apply_peft

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(REPO / "trainer/builtin/tiny-llama"))
    peft_model = apply_peft(model, PeftConfig(method="lora", r=4, target_modules="all-linear"), "llama")
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("lm_head" in n for n in trainable)
    per_layer = {n.split(".layers.")[1].split(".")[2] for n in trainable}  # q_proj, ..., down_proj
    assert per_layer == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_lora_with_dropout_adapts_fused_moe_experts():
    """transformers 5 keeps MoE experts as stacked 3-D parameters; peft adapts them with ParamWrapper,
    which refuses any dropout. The default peft.dropout must still work: linear layers keep it."""
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from trainer.peft_methods import apply_peft

    config = AutoConfig.for_model("mixtral", vocab_size=128, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                  num_local_experts=4, num_experts_per_tok=2)
    torch.manual_seed(0)
    model = apply_peft(AutoModelForCausalLM.from_config(config), PeftConfig(method="lora", r=4, dropout=0.1,
                                                                            target_modules="all-linear"), "llama")
    wrappers = [m for m in model.modules() if type(m).__name__ == "ParamWrapper"]
    linears = [m for m in model.modules() if type(m).__name__ == "Linear" and hasattr(m, "lora_dropout")]
    assert wrappers and linears  # the experts and the attention projections are both adapted
    assert all(isinstance(m.lora_dropout["default"], nn.Dropout) and m.lora_dropout["default"].p == 0.1
               for m in linears)
    model.train()
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    expert_b = [p.grad for n, p in model.named_parameters() if "experts" in n and "lora_B" in n]
    assert expert_b and all(g is not None and g.abs().sum() > 0 for g in expert_b)  # (lora_A's is 0 while B is)


def test_target_modules_that_match_nothing_are_refused_before_launch(tmp_path):
    """Module names differ per architecture: GPT-2 has c_attn/c_proj/c_fc, not q_proj/v_proj."""
    from transformers import GPT2Config

    from launcher.compose import compose

    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=2048).save_pretrained(tmp_path / "gpt2")
    gpt2 = ["model=local", f"model.name_or_path={tmp_path / 'gpt2'}", "model.random_init=true"]
    for overrides, needles in [
            (["peft=lora", "peft.target_modules=family"], ["model.family=llama's targets", "'c_attn'", "all-linear"]),
            (["peft=ia3"], ["IA3's default targets ['k_proj', 'v_proj', 'down_proj']", "'c_fc'"]),
    ]:
        with pytest.raises(ConfigError) as err:
            compose(gpt2 + overrides)
        assert all(needle in str(err.value) for needle in needles), str(err.value)
    with pytest.raises(ConfigError, match=r"peft.target_modules \['v_prj'\] match no module of llama"):
        compose(["peft=lora", "peft.target_modules=[q_proj,v_prj]"])  # a typo in a list of one's own
    compose(gpt2 + ["peft=lora", "peft.target_modules=[c_attn]"])
    compose(gpt2 + ["peft=lora"])  # all-linear: any architecture


def test_shard_writer_splits_and_indexes(tmp_path):
    from safetensors.torch import load_file

    from trainer.export import ShardWriter

    writer = ShardWriter(tmp_path, max_bytes=2500)
    tensors = {f"w{i}": torch.full((300,), float(i)) for i in range(5)}  # 1200 bytes each, 2 a shard: 3 shards
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    paths = writer.close()
    assert [p.name for p in paths] == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 1200
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(str(tmp_path / file))[name], tensors[name])


# ---------------------------------------------------------------- distributed: real DeepSpeed, 2 ranks
# method_runs (tests/conftest.py): one 2-step run per method and stage, shared by the whole session.


@pytest.mark.distributed
# Every method under ZeRO-3 (parameters partitioned: the export must gather them, DoRA needs its base
# weight registered) and LoRA under ZeRO-2 too; ZeRO-2's export path is the same with nothing to gather.
@pytest.mark.parametrize("method,stage", [(m, 3) for m in METHODS] + [("lora", 2)])
def test_method_trains_and_final_export_reloads_with_same_logits(method_runs, method, stage):
    run_dir = method_runs(method, stage)
    facts = load_and_compare(run_dir / "export", run_dir / "export_probe.pt")
    assert facts["max_diff"] < TOLERANCE, facts
    if method != "none":
        assert all(n > 0 for n in facts["adapter_numels"].values()), facts  # never an empty adapter
        assert facts["adapter_abs_sum"] > 0
        assert facts["base_max_diff"] > 1e-6, "the adapter should change the model's output"


@pytest.mark.distributed
def test_offline_export_adapter_merge_and_sharded_full_model(method_runs, tmp_path):
    """`shardtune export` from ZeRO-3 checkpoints: adapter, merged model, and a sharded full model."""
    lora = method_runs("lora", 3)
    probe = lora / "export_probe.pt"
    proc = shardtune("export", str(lora), "--out", str(tmp_path / "adapter"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert load_and_compare(tmp_path / "adapter", probe)["max_diff"] < TOLERANCE
    written = json.loads((tmp_path / "adapter" / "shardtune_export.json").read_text())
    assert written["dtype"] == "float32" and written["vllm_problem"] is None  # a CPU run of an fp32 model
    assert "vLLM cannot serve" not in proc.stdout
    proc = shardtune("export", str(lora), "--step", "2", "--merge", "--out", str(tmp_path / "merged"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert json.loads((tmp_path / "merged" / "shardtune_export.json").read_text())["merge_max_logit_diff"] < TOLERANCE
    assert load_and_compare(tmp_path / "merged", probe)["max_diff"] < TOLERANCE
    missing = shardtune("export", str(lora), "--step", "7", "--out", str(tmp_path / "x"))
    assert missing.returncode != 0 and "committed steps: 2" in missing.stdout

    full = method_runs("none", 3)
    proc = shardtune("export", str(full), "--max-shard-size", "1MB", "--out", str(tmp_path / "full"), timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert len(list((tmp_path / "full").glob("model-*-of-*.safetensors"))) >= 2  # streamed into shards
    assert (tmp_path / "full" / "generation_config.json").is_file()
    assert load_and_compare(tmp_path / "full", full / "export_probe.pt")["max_diff"] < TOLERANCE


def tiny_moe_folder(folder: Path) -> Path:
    """A 2-layer Mixtral (experts fused as 3-D parameters in transformers 5) with the tiny tokenizer."""
    import shutil

    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", vocab_size=2048, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                  num_local_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for item in (REPO / "trainer/builtin/tiny-llama").glob("*token*"):
        shutil.copy2(item, folder / item.name)
    return folder


@pytest.mark.distributed
def test_moe_lora_with_dropout_trains_under_zero3_and_exports(tmp_path):
    """A model family the project ships no config for: LoRA (default dropout) on a Mixtral-style MoE,
    partitioned by ZeRO-3; the adapter covers the experts and reloads with plain peft."""
    model = tiny_moe_folder(tmp_path / "moe")
    run_dir = run_method(tmp_path, "lora", 3, "model=local", f"model.name_or_path={model}", "peft.dropout=0.05",
                         "checkpoint.save_final=false")
    facts = load_and_compare(run_dir / "export", run_dir / "export_probe.pt")
    assert facts["max_diff"] < TOLERANCE, facts
    experts = {k: n for k, n in facts["adapter_numels"].items() if "experts" in k}
    assert experts and all(n > 0 for n in experts.values()), facts
    assert facts["base_max_diff"] > 1e-6


@pytest.mark.parametrize("has_cuda", [False, True])
def test_qlora_is_refused_before_launch_on_cpu_and_gpu(has_cuda):
    """QLoRA is not built: peft.quantize_4bit=true is refused by validation (before any spawn) on a GPU
    machine too, not by the workers after the base model has loaded; the error says to use peft=lora."""
    cfg = RootConfig()
    cfg.model.name_or_path, cfg.run.dir, cfg.run.name = "builtin:tiny-llama", "/tmp/x", "x"
    cfg.peft.method, cfg.peft.quantize_4bit = "lora", True
    cfg.cluster.nproc_per_node = 1  # a one-GPU machine would refuse the default 2 ranks for another reason
    with pytest.raises(ConfigError) as err:
        validate(cfg, has_cuda=has_cuda, check_files=False)
    (problem,) = [p for p in err.value.problems if "quantize_4bit" in p]
    assert "peft.quantize_4bit=true" in problem and "not implemented" in problem and "peft=lora" in problem
    cfg.peft.quantize_4bit = False
    validate(cfg, has_cuda=has_cuda, check_files=False)  # the same config without it is valid


def test_qlora_is_refused_by_the_cli_before_spawning(tmp_path):
    proc = shardtune("train", f"run.dir={tmp_path / 'run'}", "peft=lora", "peft.quantize_4bit=true", timeout=120)
    assert proc.returncode == 2, proc.stdout
    assert "peft.quantize_4bit=true" in proc.stdout and "peft=lora" in proc.stdout
    assert not (tmp_path / "run" / "config.yaml").exists()  # nothing written, nothing spawned


@pytest.mark.parametrize("method, servable", [("lora", True), ("dora", False), ("ia3", False), ("prefix_tuning", False)])
def test_vllm_servability_is_said_per_method(method, servable):
    from trainer.config import PeftConfig
    from trainer.peft_methods import vllm_problem

    assert (vllm_problem(PeftConfig(method=method)) is None) == servable
    assert vllm_problem(PeftConfig(method="none")) is None
    assert "modules_to_save" in vllm_problem(PeftConfig(method="lora", modules_to_save=["lm_head"]))


def test_export_dtype_defaults_to_what_the_model_trained_or_was_published_in(tmp_path):
    from launcher.export_cmd import export_dtype
    from trainer.config import RootConfig
    from trainer.run_dir import RunDir

    cfg = RootConfig()
    cfg.model.name_or_path = "builtin:tiny-llama"
    run = RunDir(tmp_path)
    run.write_json(run.env, {"device": "cuda"})
    assert export_dtype(cfg, tmp_path, "auto") == "bfloat16"  # a GPU run trains in bf16
    assert export_dtype(cfg, tmp_path, "float16") == "float16"  # asked for
    run.write_json(run.env, {"device": "cpu"})
    published = json.loads((REPO / "trainer/builtin/tiny-llama/config.json").read_text())
    expected = str(published.get("dtype") or published.get("torch_dtype") or "float32")
    assert export_dtype(cfg, tmp_path, "auto") == expected
    cfg.model.dtype = "bfloat16"
    assert export_dtype(cfg, tmp_path, "auto") == "bfloat16"  # model.dtype as trained
