"""A Hugging Face model folder (a full or merged export) as one GGUF file, for llama.cpp and Ollama.

`write_gguf(folder, out_file, quant)` reads `config.json`, the safetensors weights and the tokenizer
(`tokenizer.json`, `tokenizer_config.json`, the chat template) and writes them with the `gguf`
library's `GGUFWriter` under llama.cpp's key and tensor names (`gguf.TENSOR_NAMES`,
`gguf.MODEL_TENSORS`). Only the architectures whose GGUF layout is known here are converted
(`SUPPORTED`); any other is refused by name before anything is written.

What llama.cpp expects that a plain rename does not give:
- Llama-layout models (llama, mistral) rotate query/key pairs that sit next to each other, while
  transformers rotates the two halves of each head: q_proj/k_proj rows are permuted per head.
  Qwen2/Qwen3 use the half layout in llama.cpp too (NEOX rope), so theirs are written as they are.
- A tied output head is not written: llama.cpp (and transformers' reader) reuse `token_embd`.
- The vocabulary is exactly `vocab_size` entries long (the embedding rows); rows past the
  tokenizer's last token are padding tokens of type UNUSED.
- A byte-level BPE tokenizer ("gpt2") must name its pre-tokenizer (`tokenizer.ggml.pre`): llama.cpp
  splits text with the regex that name stands for, so a pre-tokenizer we cannot name is refused
  rather than written as one that would split text differently.

Tensors are planned from the safetensors headers, then converted and written one at a time, so a
model never has to fit in memory twice. Importing this module needs neither torch nor gguf (an
optional extra: `pip install 'shardtune[gguf]'`), so the CLI can list the choices without them.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

GGUF_FILE = "model.gguf"
MODELFILE = "Modelfile"
QUANTS = ("f16", "bf16", "q8_0")


class GGUFExportError(ValueError):
    """A model or tokenizer that cannot be written as GGUF; the message says what and what would do."""


def gguf_library():
    """The `gguf` package, imported when a conversion starts (it is an optional extra)."""
    try:
        import gguf
    except ImportError:
        raise GGUFExportError("GGUF export needs the gguf package: pip install 'shardtune[gguf]'") from None
    return gguf


@dataclass(frozen=True)
class Layout:
    """How one Hugging Face `model_type` is laid out in GGUF."""
    arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool  # HF's rotate-half q/k rows -> llama.cpp's adjacent-pair rotary layout

    def model_arch(self):
        gguf = gguf_library()
        arch = getattr(gguf.MODEL_ARCH, self.arch, None)
        if arch is None:  # an older gguf release than the architecture
            raise GGUFExportError(f"the installed gguf package has no {self.arch} architecture: upgrade it "
                                  "(pip install -U gguf; 0.19 is tested)")
        return arch


# SmolLM and SmolLM2 are `model_type: llama`; Mistral is converted to llama.cpp's llama graph (as
# llama.cpp's own converter does), so it needs the llama permutation as well.
SUPPORTED: Dict[str, Layout] = {
    "llama": Layout("LLAMA", permute_qk=True),
    "mistral": Layout("LLAMA", permute_qk=True),
    "qwen2": Layout("QWEN2", permute_qk=False),
    "qwen3": Layout("QWEN3", permute_qk=False),
}

# HF module path inside a decoder layer -> the gguf.MODEL_TENSOR it becomes.
LAYER_TENSORS: Dict[str, str] = {
    "input_layernorm": "ATTN_NORM",
    "self_attn.q_proj": "ATTN_Q",
    "self_attn.k_proj": "ATTN_K",
    "self_attn.v_proj": "ATTN_V",
    "self_attn.o_proj": "ATTN_OUT",
    "self_attn.q_norm": "ATTN_Q_NORM",
    "self_attn.k_norm": "ATTN_K_NORM",
    "post_attention_layernorm": "FFN_NORM",
    "mlp.gate_proj": "FFN_GATE",
    "mlp.up_proj": "FFN_UP",
    "mlp.down_proj": "FFN_DOWN",
}
MODEL_TENSORS_BY_NAME: Dict[str, str] = {
    "model.embed_tokens": "TOKEN_EMBD",
    "model.norm": "OUTPUT_NORM",
    "lm_head": "OUTPUT",
}
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")

# --quant -> (gguf.GGMLQuantizationType of the matrices, gguf.LlamaFileType recorded in the header)
QUANT_TYPES = {"f16": ("F16", "MOSTLY_F16"), "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0")}
# gguf.TokenType values (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.json pre-tokenizer splits -> llama.cpp's name for the same split (llama-vocab.cpp).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
KNOWN_SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
PRE_TOKENIZER_NAMES = ("gpt-2 (ByteLevel with its regex)", "smollm (Digits + ByteLevel)",
                       "llama-bpe (the Llama 3 split)", "qwen2 (the Qwen2 split)")


# ---------------------------------------------------------------- architecture and tensor names
def layout_for(model_type: str) -> Layout:
    """The GGUF layout of `model_type`, or a GGUFExportError naming it and what is supported."""
    layout = SUPPORTED.get(model_type)
    if layout is None:
        raise GGUFExportError(
            f"GGUF export does not support the architecture {model_type!r}: its GGUF tensor layout is not "
            f"known to shardtune. Supported: {', '.join(sorted(SUPPORTED))} (SmolLM/SmolLM2 are llama). "
            "Export a Hugging Face folder instead (`shardtune export RUN_DIR --merge --out DIR`) and "
            "convert it with llama.cpp's convert_hf_to_gguf.py if llama.cpp knows the architecture")
    return layout


def gguf_tensor_name(hf_name: str, arch) -> str:
    """llama.cpp's name for the HF tensor `hf_name` (`model.layers.3.self_attn.q_proj.weight` ->
    `blk.3.attn_q.weight`), checked against the tensors `arch` (a gguf.MODEL_ARCH) has in gguf's tables."""
    gguf = gguf_library()
    layer = _LAYER_NAME.fullmatch(hf_name)
    if layer:
        block, module, kind = layer.groups()
        tensor = LAYER_TENSORS.get(module)
    else:
        module, _, kind = hf_name.rpartition(".")
        block, tensor = None, MODEL_TENSORS_BY_NAME.get(module)
    tensor = getattr(gguf.MODEL_TENSOR, tensor) if tensor else None
    if tensor is None or tensor not in gguf.MODEL_TENSORS[arch]:
        raise GGUFExportError(f"{hf_name}: a tensor with no place in GGUF's {gguf.MODEL_ARCH_NAMES[arch]} layout "
                              "(a module this converter does not know); not writing a GGUF that would lack it")
    base = gguf.TENSOR_NAMES[tensor]
    return f"{base.format(bid=block) if block is not None else base}.{kind}"


def rotary_pairs_layout(weight: np.ndarray, n_head: int) -> np.ndarray:
    """q/k projection rows from transformers' layout (each head's first half rotates with its second
    half) to llama.cpp's (row 2i rotates with row 2i+1): per head, interleave the two halves."""
    rows = weight.shape[0]
    half = rows // n_head // 2
    return weight.reshape(n_head, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def encoding_for(shape: Tuple[int, ...], quant: str):
    """The gguf.GGMLQuantizationType one tensor is stored as: vectors (norms, biases) stay F32, as
    llama.cpp keeps them; a matrix takes the asked type, except q8_0 rows that are not whole
    32-value blocks (then F16)."""
    types = gguf_library().GGMLQuantizationType
    if len(shape) < 2:
        return types.F32
    wanted = getattr(types, QUANT_TYPES[quant][0])
    block, _ = gguf_library().GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else types.F16


def encode(data: np.ndarray, kind) -> np.ndarray:
    gguf = gguf_library()
    if kind == gguf.GGMLQuantizationType.F32:
        return data.astype(np.float32)
    if kind == gguf.GGMLQuantizationType.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), kind)


def stored_nbytes(shape: Tuple[int, ...], kind) -> Tuple[Tuple[int, ...], np.dtype, int]:
    """(numpy shape, numpy dtype, bytes) of `shape` stored as `kind`, without converting anything."""
    gguf = gguf_library()
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        dtype = np.dtype(np.float32 if kind == gguf.GGMLQuantizationType.F32 else np.float16)
        return shape, dtype, math.prod(shape) * dtype.itemsize
    byte_shape = tuple(gguf.quant_shape_to_byte_shape(shape, kind))
    return byte_shape, np.dtype(np.uint8), math.prod(byte_shape)


# ---------------------------------------------------------------- hyperparameters
def rope_parameters(config: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs in rope_theta/rope_scaling."""
    params = dict(config.get("rope_scaling") or {})
    params.update(config.get("rope_parameters") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    """Llama 3.1's per-frequency divisors, which llama.cpp reads from the `rope_freqs` tensor
    (transformers computes the same scaling inside its rotary embedding)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old_context = rope["original_max_position_embeddings"]
    freqs = 1.0 / (rope["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    wavelen = 2 * math.pi / freqs
    smooth = (old_context / wavelen - low) / (high - low)
    divisors = np.where(wavelen < old_context / high, 1.0,
                        np.where(wavelen > old_context / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
    return divisors.astype(np.float32)


def add_hyperparameters(writer, config: dict) -> Optional[np.ndarray]:
    """The model's shape and rope settings; returns the rope_freqs tensor when the model needs one."""
    heads, dim = config["num_attention_heads"], head_dim(config)
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_rope_dimension_count(dim)
    if dim != config["hidden_size"] // heads:  # Qwen3 and some Mistrals: heads wider than hidden/heads
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    kind = rope["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf_library().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif kind == "llama3":
        return llama3_rope_factors(rope, dim)
    elif kind != "default":
        raise GGUFExportError(f"rope scaling {kind!r} (config.json) is not written by this converter; "
                              "supported: default, linear, llama3")
    return None


# ---------------------------------------------------------------- tokenizer
@dataclass
class Vocabulary:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style BPE with byte fallback)
    tokens: List[str]
    types: List[int]
    merges: List[str]
    scores: Optional[List[float]] = None
    pre: Optional[str] = None
    add_space_prefix: Optional[bool] = None


def read_tokenizer_files(folder: Path) -> Tuple[dict, dict]:
    """(tokenizer.json, tokenizer_config.json) of `folder`."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise GGUFExportError(f"{folder}: no tokenizer.json; GGUF export reads the vocabulary from a fast "
                              "(tokenizers) tokenizer: save one with AutoTokenizer(...).save_pretrained")
    settings = folder / "tokenizer_config.json"
    return json.loads(path.read_text()), (json.loads(settings.read_text()) if settings.is_file() else {})


def _merge_strings(merges: list) -> List[str]:
    # tokenizers writes merges as "a b" (older files) or as ["a", "b"] pairs (newer files).
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def bpe_pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for this byte-level tokenizer's way of splitting text (tokenizer.ggml.pre)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = KNOWN_SPLITS.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise GGUFExportError(
        f"tokenizer.json pre-tokenizer {json.dumps(pre)[:300]} has no llama.cpp name known to this converter, "
        f"and llama.cpp would split text differently without one. Known: {'; '.join(PRE_TOKENIZER_NAMES)}")


def added_token_types(tokenizer: dict) -> Dict[int, int]:
    """Added tokens: special ones are CONTROL (never produced from plain text by llama.cpp unless it
    parses specials), the others USER_DEFINED (always matched whole)."""
    return {t["id"]: CONTROL if t.get("special") else USER_DEFINED
            for t in tokenizer.get("added_tokens", [])}


def ordered_tokens(tokenizer: dict, vocab_size: int) -> List[Optional[str]]:
    """Token strings by id, `vocab_size` long (None where no token has that id)."""
    by_id: Dict[int, str] = {i: t for t, i in tokenizer["model"]["vocab"].items()}
    by_id.update({t["id"]: t["content"] for t in tokenizer.get("added_tokens", [])})
    too_big = [i for i in by_id if i >= vocab_size]
    if too_big:
        raise GGUFExportError(f"the tokenizer has token ids up to {max(too_big)} but the model's vocab_size is "
                              f"{vocab_size}: resize the embeddings (model.resize_token_embeddings) first")
    return [by_id.get(i) for i in range(vocab_size)]


def byte_level_vocabulary(tokenizer: dict, vocab_size: int) -> Vocabulary:
    special = added_token_types(tokenizer)
    tokens, types = [], []
    for i, token in enumerate(ordered_tokens(tokenizer, vocab_size)):
        tokens.append(token if token is not None else f"[PAD{i}]")
        types.append(UNUSED if token is None else special.get(i, NORMAL))
    return Vocabulary("gpt2", tokens, types, _merge_strings(tokenizer["model"].get("merges", [])),
                      pre=bpe_pre_tokenizer(tokenizer))


def prepends_space(tokenizer: dict) -> bool:
    """Whether this SentencePiece-style tokenizer puts "▁" before the text (Metaspace or a normalizer)."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always") != "never" and step.get("add_prefix_space", True)
    norm = tokenizer.get("normalizer") or {}
    steps = norm.get("normalizers", [norm]) if norm.get("type") == "Sequence" else [norm]
    return any(step.get("type") == "Prepend" for step in steps)


def piece_score(token: str, kind: int, merge_rank: Dict[str, int], token_id: int) -> float:
    """Minus the rank of the merge that makes `token`; single characters (made by no merge) below every
    merged token, specials and bytes at 0 (llama.cpp never merges into them)."""
    if token in merge_rank:
        return -float(merge_rank[token])
    return -1e6 - token_id if kind == NORMAL else 0.0


def sentencepiece_vocabulary(tokenizer: dict, vocab_size: int) -> Vocabulary:
    """A SentencePiece-style BPE (Llama 2, Mistral): llama.cpp merges the adjacent pair whose result
    has the highest score, which is BPE exactly when the scores follow the merge order; so a token's
    score is minus the rank of the merge that makes it."""
    merges = _merge_strings(tokenizer["model"].get("merges", []))
    rank = {merge.replace(" ", ""): i for i, merge in reversed(list(enumerate(merges)))}
    special, unk = added_token_types(tokenizer), tokenizer["model"].get("unk_token")
    tokens, types, scores = [], [], []
    for i, token in enumerate(ordered_tokens(tokenizer, vocab_size)):
        if token is None:  # a padding row of the embedding
            token, kind = f"[PAD{i}]", UNUSED
        elif token == unk:
            kind = UNKNOWN
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            kind = BYTE
        else:
            kind = special.get(i, NORMAL)
        tokens.append(token)
        types.append(kind)
        scores.append(piece_score(token, kind, rank, i))
    return Vocabulary("llama", tokens, types, merges, scores=scores, add_space_prefix=prepends_space(tokenizer))


def read_vocabulary(tokenizer: dict, vocab_size: int) -> Vocabulary:
    model = tokenizer.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return sentencepiece_vocabulary(tokenizer, vocab_size)
    if model.get("type") == "BPE":
        return byte_level_vocabulary(tokenizer, vocab_size)
    raise GGUFExportError(f"tokenizer model {model.get('type')!r}: GGUF export writes BPE tokenizers (byte-level, "
                          "as GPT-2/Llama 3/Qwen/SmolLM, or SentencePiece-style with byte fallback, as Llama 2/"
                          "Mistral); this one is neither")


def token_id(tokenizer: dict, token) -> Optional[int]:
    """The id of a tokenizer_config.json special token (a string or an AddedToken dict)."""
    content = token.get("content") if isinstance(token, dict) else token
    if not content:
        return None
    for added in tokenizer.get("added_tokens", []):
        if added["content"] == content:
            return added["id"]
    return tokenizer["model"]["vocab"].get(content)


def special_token_ids(tokenizer: dict, settings: dict, config: dict) -> Dict[str, int]:
    """bos/eos/unk/pad ids: the tokenizer's own (what training used), else config.json's."""
    ids = {}
    for name in ("bos", "eos", "unk", "pad"):
        found = token_id(tokenizer, settings.get(f"{name}_token"))
        if found is None and isinstance(config.get(f"{name}_token_id"), int):
            found = config[f"{name}_token_id"]
        if found is not None:
            ids[name] = found
    return ids


def adds_bos(tokenizer: dict, settings: dict) -> bool:
    """Whether encoding prepends BOS: tokenizer_config's flag, else the post-processor's template."""
    if "add_bos_token" in settings:
        return bool(settings["add_bos_token"])
    single = (tokenizer.get("post_processor") or {}).get("single") or []
    return bool(single) and "SpecialToken" in single[0]


def chat_template(folder: Path, settings: dict) -> Optional[str]:
    """The chat template as transformers saves it: chat_template.jinja, else tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = settings.get("chat_template")
    if isinstance(template, list):  # named templates: llama.cpp reads the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def add_tokenizer(writer, folder: Path, config: dict) -> dict:
    """Write the vocabulary, merges, special ids and chat template; return what Modelfile needs."""
    tokenizer, settings = read_tokenizer_files(folder)
    vocab = read_vocabulary(tokenizer, config["vocab_size"])
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    ids = special_token_ids(tokenizer, settings, config)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if name in ids:
            add(ids[name])
    writer.add_add_bos_token(adds_bos(tokenizer, settings))
    writer.add_add_eos_token(bool(settings.get("add_eos_token", False)))
    template = chat_template(folder, settings)
    if template:
        writer.add_chat_template(template)
    return {"chat_template": template, "eos": vocab.tokens[ids["eos"]] if "eos" in ids else None,
            "tokenizer": vocab.model, "pre": vocab.pre}


# ---------------------------------------------------------------- weights
def weight_files(folder: Path) -> List[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{folder}: no *.safetensors weights to convert")
    return files


def tensor_shapes(files: List[Path]) -> Dict[str, Tuple[Tuple[int, ...], Path]]:
    """name -> (shape, file), read from the safetensors headers only."""
    from safetensors import safe_open

    shapes = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as handle:
            for name in handle.keys():
                shapes[name] = (tuple(handle.get_slice(name).get_shape()), path)
    return shapes


def read_tensor(path: Path, name: str) -> np.ndarray:
    """One tensor as float32 numpy (through torch: numpy has no bfloat16)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.get_tensor(name).to(torch.float32).numpy()


@dataclass
class PlannedTensor:
    gguf_name: str
    hf_name: Optional[str]  # None: made here (rope_freqs)
    path: Optional[Path]
    kind: object  # gguf.GGMLQuantizationType
    n_head: Optional[int] = None  # set: permute rows for llama.cpp's rotary layout


def plan_tensors(config: dict, layout: Layout, shapes: dict, quant: str) -> List[PlannedTensor]:
    tied = config.get("tie_word_embeddings", False)
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    plan = []
    for hf_name, (shape, path) in shapes.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by the reader / the embedding, reused as the output head
        n_head = None
        if layout.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            n_head = heads
        elif layout.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            n_head = kv_heads
        plan.append(PlannedTensor(gguf_tensor_name(hf_name, layout.model_arch()), hf_name, path,
                                  encoding_for(shape, quant), n_head))
    return plan


def write_gguf(folder: Path, out_file: Path, quant: str = "f16", name: Optional[str] = None) -> dict:
    """Convert the Hugging Face model folder `folder` into the GGUF file `out_file`.

    Args:
        folder: config.json, safetensors weights and a fast tokenizer (a full or merged export).
        out_file: the .gguf file to write (replaced).
        quant: "f16", "bf16" or "q8_0": the type of the weight matrices (norms stay F32).
        name: general.name (default: the folder's name).

    Returns:
        Facts for the export record: architecture, quant, tensor count, bytes, tokenizer kind.
    """
    folder, out_file = Path(folder), Path(out_file)
    if quant not in QUANTS:
        raise GGUFExportError(f"--quant {quant!r}: choose one of {', '.join(QUANTS)}")
    config = json.loads((folder / "config.json").read_text())
    layout = layout_for(config.get("model_type", "?"))
    gguf = gguf_library()
    shapes = tensor_shapes(weight_files(folder))
    plan = plan_tensors(config, layout, shapes, quant)  # refuses unknown tensors before writing
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[layout.model_arch()])
    try:
        facts = _write(writer, folder, config, layout, shapes, plan, quant, name or folder.name)
    except BaseException:
        writer.close()
        out_file.unlink(missing_ok=True)  # never leave a half-written GGUF that looks usable
        raise
    writer.close()
    return {**facts, "gguf_bytes": out_file.stat().st_size}


def _write(writer, folder: Path, config: dict, layout: Layout, shapes: dict, plan: List[PlannedTensor],
           quant: str, name: str) -> dict:
    gguf = gguf_library()
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, QUANT_TYPES[quant][1])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    rope_freqs = add_hyperparameters(writer, config)
    tokenizer_facts = add_tokenizer(writer, folder, config)
    if rope_freqs is not None:
        plan = [PlannedTensor(f"{gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS]}.weight", None, None,
                              gguf.GGMLQuantizationType.F32), *plan]
    for item in plan:
        shape = rope_freqs.shape if item.hf_name is None else shapes[item.hf_name][0]
        stored_shape, dtype, nbytes = stored_nbytes(tuple(shape), item.kind)
        writer.add_tensor_info(item.gguf_name, stored_shape, dtype, nbytes,
                               raw_dtype=None if dtype != np.uint8 else item.kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in plan:  # one tensor in memory at a time, in the order of the tensor table
        writer.write_tensor_data(encode(_source_data(item, rope_freqs), item.kind))
    return {"architecture": gguf.MODEL_ARCH_NAMES[layout.model_arch()], "model_type": config["model_type"],
            "quant": quant, "tensors": len(plan), **tokenizer_facts}


def _source_data(item: PlannedTensor, rope_freqs: Optional[np.ndarray]) -> np.ndarray:
    if item.hf_name is None:
        return rope_freqs
    data = read_tensor(item.path, item.hf_name)
    return rotary_pairs_layout(data, item.n_head) if item.n_head else data


# ---------------------------------------------------------------- Ollama
CHATML = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
          "<|im_start|>assistant\n")
LLAMA3 = ("{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
          "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")


def default_system_prompt(template: str) -> Optional[str]:
    """The system message a ChatML template inserts when the conversation has none (SmolLM2's
    "You are a helpful AI assistant named SmolLM..."), found by rendering it; Ollama needs it as SYSTEM."""
    try:
        import jinja2

        text = jinja2.Environment().from_string(template).render(
            messages=[{"role": "user", "content": "hi"}], add_generation_prompt=False)
    except Exception:  # a template that needs transformers' extra helpers: no default to carry
        return None
    found = re.match(r"\s*<\|im_start\|>system\n(.*?)<\|im_end\|>", text, re.S)
    return found.group(1) if found else None


def modelfile_text(gguf_name: str, template: Optional[str], eos: Optional[str]) -> str:
    """An Ollama Modelfile for the GGUF: the chat format as Ollama's Go template where it is one we
    can translate (ChatML, Llama 3), and the end-of-turn tokens as stop sequences."""
    lines = ["# Ollama: `ollama create NAME -f Modelfile` in this folder, then `ollama run NAME`.",
             f"FROM ./{gguf_name}"]
    stops = [eos] if eos else []
    if template and "<|im_start|>" in template:
        lines += [f'TEMPLATE """{CHATML}"""']
        stops.append("<|im_end|>")
        system = default_system_prompt(template)
        if system:
            lines += [f'SYSTEM """{system}"""']
    elif template and "<|start_header_id|>" in template:
        lines += [f'TEMPLATE """{LLAMA3}"""']
        stops.append("<|eot_id|>")
    else:
        lines += ["# No TEMPLATE: Ollama reads the GGUF's tokenizer.chat_template and uses the built-in",
                  "# template it matches; check with `ollama show --modelfile NAME`, or add a TEMPLATE here."]
    lines += [f'PARAMETER stop "{stop}"' for stop in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


def write_modelfile(out_dir: Path, facts: dict, gguf_name: str = GGUF_FILE) -> Path:
    path = Path(out_dir) / MODELFILE
    path.write_text(modelfile_text(gguf_name, facts.get("chat_template"), facts.get("eos")))
    return path


def export_folder(folder: Path, out_dir: Path, quant: str = "f16", name: Optional[str] = None) -> dict:
    """`out_dir/model.gguf` and `out_dir/Modelfile` from the model folder `folder`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    facts = write_gguf(folder, out_dir / GGUF_FILE, quant, name)
    write_modelfile(out_dir, facts)
    return {k: v for k, v in facts.items() if k != "chat_template"}

