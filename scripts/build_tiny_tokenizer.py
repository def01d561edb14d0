"""Build the tokenizer and config of the builtin tiny Llama (trainer/builtin/tiny-llama/).

    python scripts/build_tiny_tokenizer.py

Trains a byte-level BPE tokenizer (vocab 2048) on the text of the samples/ data files and writes a
Hugging Face model folder without weights: tokenizer.json, tokenizer_config.json (with a ChatML
chat_template), special_tokens_map.json, config.json (LlamaConfig) and generation_config.json.
The model itself is random-init from config.json. Deterministic: reruns give identical files.
"""
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "trainer" / "builtin" / "tiny-llama"
VOCAB_SIZE = 2048
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]  # ids 0..3
EOS, PAD = "<|im_end|>", "<|pad|>"
# ChatML. The {% generation %} markers change nothing in the rendered text; they let
# apply_chat_template(..., return_assistant_tokens_mask=True) mark assistant content + <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus():
    """Every string of the samples/ data files (jsonl texts and messages, .txt lines), in sorted
    file order. samples/README.md is left out so editing the docs does not change the tokenizer."""
    for path in sorted((ROOT / "samples").rglob("*")):
        if path.suffix == ".jsonl":
            for line in path.read_text(encoding="utf-8").splitlines():
                row = json.loads(line)
                if "text" in row:
                    yield row["text"]
                for m in row.get("messages", []):
                    yield m["content"]
        elif path.suffix == ".txt":
            yield from path.read_text(encoding="utf-8").splitlines()


def train_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer=trainer)
    return tok


def write_json(name, obj):
    (OUT / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    tok.save(str(OUT / "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in SPECIAL}
    vocab = tok.get_vocab_size()
    special_map = {"eos_token": EOS, "pad_token": PAD,
                   "additional_special_tokens": ["<|endoftext|>", "<|im_start|>"]}
    write_json("special_tokens_map.json", special_map)
    write_json("tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None, "unk_token": None, **special_map,
        "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1024,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    })
    write_json("config.json", {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "initializer_range": 0.02,
        "vocab_size": -(-vocab // 64) * 64, "max_position_embeddings": 1024,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "attention_dropout": 0.0,
        "bos_token_id": None, "eos_token_id": ids[EOS], "pad_token_id": ids[PAD],
        "use_cache": False, "torch_dtype": "float32",
    })
    write_json("generation_config.json", {"eos_token_id": ids[EOS], "pad_token_id": ids[PAD]})
    print(f"wrote {OUT.relative_to(ROOT)}: vocab {vocab}, special ids {ids}")


if __name__ == "__main__":
    main()
