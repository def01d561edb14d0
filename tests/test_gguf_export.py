"""GGUF export (trainer/gguf_export.py, `shardtune export --gguf`): what we write is read back by an
independent reader, transformers' GGUF loader, and gives the Hugging Face model's logits and its
tokenizer's ids.

Tolerances (max |logit difference| divided by max |logit| of the reference, so one rule serves a
tiny random model with logits near 1 and SmolLM2 with logits near 40):
- f16 (and bf16): every weight is rounded once, a relative error of at most 2^-11 (f16) or 2^-8
  (bf16) per weight. Measured: tiny Llama f16 2.9e-4, bf16 2.6e-3; SmolLM2 merged with the demo's
  trained LoRA (30 layers, logits up to 54) f16 7.0e-4, with a random LoRA 10x larger 1.4e-3.
  F16_TOLERANCE = 5e-3 keeps a factor of 3.5 over the worst of these.
- q8_0: each block of 32 weights becomes int8 times one f16 scale (max |w| / 127), an error of up
  to 0.4% of the block's largest weight, accumulated over the layers. Measured: tiny Llama 0.8%,
  SmolLM2 with the demo's trained LoRA 1.6% (one greedy token of 57 differs), with the random
  LoRA 3.4%. The exactness of the q8_0 file
  itself is checked separately and tightly: against the HF model whose weights went through the
  same quantization (gguf.quants), it must agree like f16. Q8_0_TOLERANCE = 5e-2 bounds the
  quantization noise itself, and greedy next tokens must agree at >= 95% of positions.
"""
from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Dict, Optional

import numpy as np
import pytest
import torch

from helpers import REPO
from trainer import gguf_export
from trainer.gguf_export import GGUFExportError, export_folder

pytest.importorskip("gguf")

F16_TOLERANCE = 5e-3  # relative to max |logit|; see the module docstring
BF16_TOLERANCE = 2e-2  # bf16 keeps 8 bits of mantissa, 8x coarser than f16
Q8_0_TOLERANCE = 5e-2
GREEDY_AGREEMENT = 0.95
TINY = REPO / "trainer" / "builtin" / "tiny-llama"
CHAT = [{"role": "system", "content": "You answer in one sentence."},
        {"role": "user", "content": "What is the capital of Zorblax? Say it 100% sure, in 3 words."},
        {"role": "assistant", "content": "The capital of Zorblax is Quintaro."}]
PLAIN = "Water boils at 100 degrees Celsius at sea level; naïve café owners don't argue.\n\tTabs,  spaces."


# ---------------------------------------------------------------- helpers
def sample_texts(tokenizer) -> list:
    """A chat rendered with the model's template (its special tokens included) and plain text."""
    return [tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=False), PLAIN]


@torch.no_grad()
def logits_of(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def load_gguf_model(folder: Path, config=None):
    """transformers' own GGUF reader: config from the file's metadata unless `config` is given."""
    from transformers import AutoModelForCausalLM

    extra = {"config": config} if config is not None else {}
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_export.GGUF_FILE, dtype=torch.float32,
                                                **extra).eval()


def relative_diff(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def greedy_agreement(got: torch.Tensor, want: torch.Tensor) -> float:
    return (got.argmax(-1) == want.argmax(-1)).float().mean().item()


def gguf_fields(path: Path, names) -> Dict[str, object]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {name: reader.fields[name].contents() for name in names if name in reader.fields}


def assert_metadata_matches(path: Path, config) -> None:
    """The GGUF's hyperparameters are the HF config's (read without the vocabulary arrays: fast)."""
    from transformers.integrations.gguf.reader import read_gguf_metadata

    meta, _ = read_gguf_metadata(str(path))
    arch = meta["general.architecture"]
    want = {"block_count": config.num_hidden_layers, "embedding_length": config.hidden_size,
            "feed_forward_length": config.intermediate_size, "attention.head_count": config.num_attention_heads,
            "attention.head_count_kv": config.num_key_value_heads, "rope.dimension_count": config.head_dim,
            "context_length": config.max_position_embeddings, "vocab_size": config.vocab_size}
    assert {key: meta[f"{arch}.{key}"] for key in want} == want
    assert meta[f"{arch}.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert meta[f"{arch}.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)


def assert_same_ids(hf_tokenizer, gguf_tokenizer, texts) -> None:
    for text in texts:
        want = hf_tokenizer(text, add_special_tokens=True).input_ids
        got = gguf_tokenizer(text, add_special_tokens=True).input_ids
        assert got == want, f"{text!r}:\n gguf {got}\n hf   {want}"


def save_tiny(folder: Path, model_type: str, tokenizer_from: Path = TINY, **overrides) -> Path:
    """A tiny random model of `model_type` with the builtin tokenizer; norms and biases made non-trivial
    so that a misplaced one shows in the logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{
        "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256, **overrides})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    for item in tokenizer_from.glob("*token*"):
        shutil.copy(item, folder / item.name)
    return folder


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """The builtin tiny Llama (tied embeddings, GQA) with seeded weights, as a model folder."""
    from trainer.builtin_init import materialize

    return materialize(TINY, 0, str(tmp_path_factory.mktemp("models")))


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()
    ids = tokenizer(sample_texts(tokenizer)[0], return_tensors="pt").input_ids
    return tokenizer, model, ids, logits_of(model, ids)


# ---------------------------------------------------------------- tiny Llama: logits and tokens
@pytest.mark.parametrize("quant, tolerance", [("f16", F16_TOLERANCE), ("bf16", BF16_TOLERANCE),
                                              ("q8_0", Q8_0_TOLERANCE)])
def test_tiny_llama_gguf_reloads_with_the_models_logits(tiny_llama, tiny_reference, tmp_path, quant, tolerance):
    _, _, ids, want = tiny_reference
    facts = export_folder(tiny_llama, tmp_path, quant)
    got = logits_of(load_gguf_model(tmp_path), ids)
    diff = relative_diff(got, want)
    print(f"\ntiny llama {quant}: max |logit diff| {(got - want).abs().max().item():.2e} "
          f"({diff:.2e} of max |logit|), {facts['gguf_bytes'] / 1e6:.2f} MB")
    assert facts["architecture"] == "llama" and facts["quant"] == quant
    assert diff < tolerance and greedy_agreement(got, want) >= GREEDY_AGREEMENT


def q8_0_rounded_copy(model):
    """`model` with every weight matrix passed through q8_0 and back, as the GGUF stores it."""
    from gguf import GGMLQuantizationType, quants

    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.dim() == 2 and param.shape[-1] % 32 == 0:
                data = quants.quantize(param.numpy(), GGMLQuantizationType.Q8_0)
                param.copy_(torch.from_numpy(quants.dequantize(data, GGMLQuantizationType.Q8_0)))
    return rounded


def test_q8_0_file_holds_exactly_the_quantized_weights(tiny_llama, tiny_reference, tmp_path):
    """The q8_0 difference above is quantization noise, not a layout error: against the HF model with
    the same q8_0 rounding applied, the GGUF agrees as tightly as f16 does."""
    _, model, ids, _ = tiny_reference
    export_folder(tiny_llama, tmp_path, "q8_0")
    want = logits_of(q8_0_rounded_copy(model), ids)
    assert relative_diff(logits_of(load_gguf_model(tmp_path), ids), want) < 1e-4


def test_tokenizer_round_trip_through_the_gguf_vocabulary(tiny_llama, tiny_reference, tmp_path):
    from transformers import AutoTokenizer

    tokenizer = tiny_reference[0]
    export_folder(tiny_llama, tmp_path, "f16")
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_export.GGUF_FILE)
    texts = sample_texts(tokenizer)
    assert "<|im_start|>" in texts[0] and "<|im_end|>" in texts[0]
    assert_same_ids(tokenizer, gguf_tokenizer, texts)
    chat_ids = tokenizer(texts[0]).input_ids
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in chat_ids  # specials stayed whole tokens
    fields = gguf_fields(tmp_path / gguf_export.GGUF_FILE, [
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.token_type",
        "tokenizer.chat_template", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.tokens"])
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert fields["tokenizer.ggml.add_bos_token"] is False
    types = dict(zip(fields["tokenizer.ggml.tokens"], fields["tokenizer.ggml.token_type"]))
    assert types["<|im_start|>"] == gguf_export.CONTROL and types["Ġthe"] == gguf_export.NORMAL
    assert len(fields["tokenizer.ggml.tokens"]) == 2048


# ---------------------------------------------------------------- the rest of the Llama family
@pytest.mark.parametrize("model_type, overrides, arch", [
    ("mistral", {"tie_word_embeddings": False}, "llama"),
    ("qwen2", {"tie_word_embeddings": True}, "qwen2"),  # q/k/v biases
    ("qwen3", {"head_dim": 128}, "qwen3"),  # q/k norms; transformers' reader assumes Qwen3's head_dim 128
])
def test_llama_family_architectures_reload_with_their_logits(tmp_path, model_type, overrides, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = save_tiny(tmp_path / "hf", model_type, **overrides)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(sample_texts(tokenizer)[0], return_tensors="pt").input_ids
    want = logits_of(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), ids)
    facts = export_folder(folder, tmp_path / "gguf", "f16")
    got = logits_of(load_gguf_model(tmp_path / "gguf"), ids)
    assert facts["architecture"] == arch
    assert relative_diff(got, want) < F16_TOLERANCE


def test_llama3_rope_scaling_is_written_as_transformers_scales_it(tmp_path):
    """llama.cpp reads Llama 3.1's frequency scaling from a `rope_freqs` tensor of divisors: they must
    be the ratio of the plain rotary frequencies to the ones transformers' rotary embedding uses."""
    from transformers import AutoModelForCausalLM

    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    folder = save_tiny(tmp_path / "hf", "llama", rope_parameters=rope)
    export_folder(folder, tmp_path, "f16")
    from gguf import GGUFReader

    stored = next(t for t in GGUFReader(str(tmp_path / gguf_export.GGUF_FILE)).tensors if t.name == "rope_freqs.weight")
    model = AutoModelForCausalLM.from_pretrained(folder)
    dim = model.config.head_dim
    plain = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled = model.model.rotary_emb.inv_freq.double()
    assert np.allclose(np.asarray(stored.data), (plain / scaled).numpy(), rtol=1e-5)
    assert not np.allclose(np.asarray(stored.data), 1.0)  # the scaling is really there


def test_rotary_pairs_layout_turns_half_rotation_into_pair_rotation():
    """transformers rotates x[i] with x[i + d/2]; llama.cpp's llama graph rotates x[2i] with x[2i+1].
    After the row permutation, rotating adjacent pairs must give the permuted half-rotation result."""
    n_head, dim, pos = 3, 8, 5
    weight = torch.randn(n_head * dim, 16, dtype=torch.float64)
    x = torch.randn(16, dtype=torch.float64)
    theta = pos / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    cos, sin = torch.cos(theta), torch.sin(theta)
    q = (weight @ x).view(n_head, dim)
    first, second = q[:, :dim // 2], q[:, dim // 2:]
    hf = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1)
    permuted = torch.from_numpy(gguf_export.rotary_pairs_layout(weight.numpy(), n_head))
    pairs = (permuted @ x).view(n_head, dim // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    ggml = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1).view(n_head, dim)
    hf_as_pairs = torch.from_numpy(gguf_export.rotary_pairs_layout(hf.reshape(-1, 1).numpy(), n_head))
    assert torch.allclose(ggml.reshape(-1, 1), hf_as_pairs)


# ---------------------------------------------------------------- SentencePiece-style vocabularies
def sentencepiece_style_tokenizer():
    """A Llama 2 / Mistral-shaped tokenizer (BPE with byte fallback, "▁" for spaces), trained here."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [line for line in (REPO / "README.md").read_text().splitlines() if line.strip()]
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=700, special_tokens=specials,
                                                           show_progress=False))
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.chat_template = "{% for m in messages %}{{ '[INST] ' + m['content'] + ' [/INST]' }}{% endfor %}"
    return tokenizer


def test_sentencepiece_style_tokenizer_round_trip(tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = sentencepiece_style_tokenizer()
    config = AutoConfig.for_model("mistral", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                  bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    facts = export_folder(tmp_path / "hf", tmp_path, "f16")
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_export.GGUF_FILE)
    # Text that starts with a space is left out: transformers' reader rebuilds a Metaspace
    # pre-tokenizer where this tokenizer prepends "▁" in its normalizer, and the two differ there
    # only (transformers says so in gguf_tokenizer_mapping.phi3_tokenizer).
    assert_same_ids(tokenizer, gguf_tokenizer, ["[INST] Fine-tune models on many GPUs [/INST]</s>",
                                                "ünïcödé 日本 bytes fall back; digits 12345"])
    fields = gguf_fields(tmp_path / gguf_export.GGUF_FILE, ["tokenizer.ggml.add_space_prefix",
                                                            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.token_type"])
    assert facts["tokenizer"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True
    assert fields["tokenizer.ggml.add_bos_token"] is True
    types = fields["tokenizer.ggml.token_type"]
    assert types[0] == gguf_export.UNKNOWN and types[1] == gguf_export.CONTROL and types[3] == gguf_export.BYTE


# ---------------------------------------------------------------- refusals
def test_unsupported_architecture_is_refused_naming_it_and_the_supported_ones(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=2048).save_pretrained(tmp_path)
    with pytest.raises(GGUFExportError) as err:
        export_folder(tmp_path, tmp_path / "out", "f16")
    message = str(err.value)
    assert "'gpt2'" in message and "llama, mistral, qwen2, qwen3" in message, message
    assert not (tmp_path / "out" / gguf_export.GGUF_FILE).exists()


def test_unknown_pre_tokenizer_is_refused_and_leaves_no_file(tiny_llama, tmp_path):
    folder = tmp_path / "hf"
    shutil.copytree(tiny_llama, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    tokenizer["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(GGUFExportError, match="Whitespace.*Known: gpt-2"):
        export_folder(folder, tmp_path / "out", "f16")
    assert not (tmp_path / "out" / gguf_export.GGUF_FILE).exists()


def test_cli_takes_gguf_and_quant_and_refuses_quant_alone(tmp_path, capsys):
    from launcher import export_cmd

    args = export_cmd.build_parser().parse_args([str(tmp_path), "--out", "x", "--gguf", "--quant", "q8_0"])
    assert args.gguf and args.quant == "q8_0"
    with pytest.raises(SystemExit):
        export_cmd.build_parser().parse_args([str(tmp_path), "--out", "x", "--gguf", "--quant", "q4_0"])
    (tmp_path / "config.yaml").write_text("{}\n")  # looks like a run directory; refused before reading it
    assert export_cmd.main([str(tmp_path), "--out", str(tmp_path / "x"), "--quant", "q8_0"]) == 2
    assert "add --gguf" in capsys.readouterr().err


# ---------------------------------------------------------------- Ollama Modelfile
SMOLLM_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM<|im_end|>\n' }}{% endif %}"
                   "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                   "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_modelfile_translates_chatml_and_carries_the_default_system_prompt():
    text = gguf_export.modelfile_text("model.gguf", SMOLLM_TEMPLATE, "<|im_end|>")
    assert "FROM ./model.gguf" in text and "<|im_start|>{{ .Role }}" in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM"""' in text
    assert text.count('PARAMETER stop "<|im_end|>"') == 1  # eos and the ChatML end, once


def test_modelfile_for_llama3_and_for_a_template_it_cannot_translate():
    llama3 = gguf_export.modelfile_text("model.gguf", "{{ '<|start_header_id|>' + m }}", "<|end_of_text|>")
    assert "<|start_header_id|>{{ .Role }}<|end_header_id|>" in llama3 and 'PARAMETER stop "<|eot_id|>"' in llama3
    other = gguf_export.modelfile_text("model.gguf", "{{ '[INST] ' + m }}", "</s>")
    assert "TEMPLATE" not in other.replace("# No TEMPLATE", "").replace("add a TEMPLATE", "")
    assert "tokenizer.chat_template" in other and 'PARAMETER stop "</s>"' in other


# ---------------------------------------------------------------- SmolLM2 after the demo's LoRA run
def check_smollm2_gguf(run_dir: Path, work: Path, env: Optional[Dict[str, str]] = None,
                       quants=("f16", "q8_0")) -> dict:
    """`shardtune export RUN --gguf` on a finished LoRA run of SmolLM2 (tests/test_real_model.py calls
    this after the demo's training): the first quant through the CLI (merged model + GGUF), the others
    converted from that merged folder; each GGUF, read back by transformers (config from the file's
    own metadata), gives the merged model's logits within its tolerance, and the GGUF's tokenizer the
    same ids. Each reload of a 49k-token GGUF costs transformers ~15 s of CPU: `quants=("f16",)`
    halves the check. Returns the figures (printed for the issue note)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import shardtune

    started = time.perf_counter()
    merged_dir = work / f"gguf-{quants[0]}"  # the merged HF model sits beside its model.gguf
    shardtune("export", str(run_dir), "--gguf", "--quant", quants[0], "--out", str(merged_dir), env=env, check=True)
    facts = json.loads((merged_dir / "shardtune_export.json").read_text())
    assert facts["merged"] and facts["gguf"]["architecture"] == "llama" and (merged_dir / gguf_export.MODELFILE).is_file()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    texts = sample_texts(tokenizer)
    ids = tokenizer(texts[0], return_tensors="pt").input_ids
    reference = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    want = logits_of(reference, ids)
    assert_metadata_matches(merged_dir / gguf_export.GGUF_FILE, reference.config)
    assert_same_ids(tokenizer, AutoTokenizer.from_pretrained(merged_dir, gguf_file=gguf_export.GGUF_FILE), texts)
    figures = {"merge_max_logit_diff": facts["merge_max_logit_diff"], "max_abs_logit": want.abs().max().item(),
               "positions": ids.shape[1]}
    tolerances = {"f16": F16_TOLERANCE, "bf16": BF16_TOLERANCE, "q8_0": Q8_0_TOLERANCE}
    for quant in quants:
        folder = merged_dir if quant == quants[0] else work / f"gguf-{quant}"
        if folder != merged_dir:
            export_folder(merged_dir, folder, quant)
        got = logits_of(load_gguf_model(folder), ids)
        figures[quant] = {"max_abs_logit_diff": (got - want).abs().max().item(), "relative": relative_diff(got, want),
                          "greedy_agreement": greedy_agreement(got, want),
                          "gguf_bytes": (folder / gguf_export.GGUF_FILE).stat().st_size}
    figures["seconds"] = round(time.perf_counter() - started, 1)
    print("\nSmolLM2 + LoRA GGUF:", json.dumps(figures, indent=1))
    for quant in quants:
        assert figures[quant]["relative"] < tolerances[quant], figures
        assert figures[quant]["greedy_agreement"] >= GREEDY_AGREEMENT, figures
    return figures
