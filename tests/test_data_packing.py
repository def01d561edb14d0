"""Packing: efficient rows, and no attention across documents. For every document of a packed
batch, the logits and the loss equal those of the document alone (tolerance below) on the tiny
model, in one process. flex_attention isolates too (measured: max diff 4.8e-7) but takes minutes
on CPU, so it is not run here."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.config import DataConfig, ModelConfig
from trainer.data import build_datasets
from trainer.data.collate import collate
from trainer.data.packing import pack, packing_problems
from trainer.data.render import IGNORE
from trainer.model import build_tokenizer, model_dir

TOLERANCE = 1e-5  # fp32; measured max differences are ~5e-7 (logits) and ~1e-6 (loss)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


@pytest.fixture(scope="module")
def packed(tok, tmp_path_factory):
    cfg = DataConfig(train_files=["samples/chat/train.jsonl"], packing=True, max_seq_len=256,
                     cache_dir=str(tmp_path_factory.mktemp("cache")))
    return build_datasets(cfg, tok)[0]


def tiny_model(attn: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(model_dir(ModelConfig(name_or_path="builtin:tiny-llama")),
                                        attn_implementation=attn)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def doc_bounds(position_ids, length):
    starts = [int(s) for s in (position_ids[:length] == 0).nonzero().flatten()]
    return list(zip(starts, starts[1:] + [length]))


def summed_loss(logits, labels):
    return F.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_documents_equal_documents_alone(tok, packed, attn):
    model = tiny_model(attn)
    rows = [packed[len(packed) // 2], packed[len(packed) - 1]]  # the last row holds the shortest documents
    batch = collate(rows, tok.pad_token_id)  # 2 rows, padded, position ids, no mask
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
        worst_logit = worst_loss = 0.0
        n_docs = 0
        for row in range(2):
            length = len(rows[row]["input_ids"])
            packed_loss = 0.0
            for start, end in doc_bounds(batch["position_ids"][row], length):
                alone = model(input_ids=batch["input_ids"][row:row + 1, start:end], use_cache=False).logits[0]
                worst_logit = max(worst_logit, (alone - logits[row, start:end]).abs().max().item())
                mine = summed_loss(alone, batch["labels"][row, start:end])
                ours = summed_loss(logits[row, start:end], batch["labels"][row, start:end])
                worst_loss = max(worst_loss, abs(mine - ours).item() / max(abs(mine.item()), 1.0))
                packed_loss += ours.item()
                n_docs += 1
            # the row's loss as the loop computes it (labels shifted over the whole row) is the sum of
            # the documents' losses: no document's first token is predicted from the previous one
            whole = summed_loss(logits[row, :length], batch["labels"][row, :length]).item()
            assert abs(whole - packed_loss) <= TOLERANCE * abs(whole)
    assert n_docs > 4
    print(f"{attn}: {n_docs} documents, max logit diff {worst_logit:.2e}, max relative loss diff {worst_loss:.2e}")
    assert worst_logit <= TOLERANCE and worst_loss <= TOLERANCE


def test_the_check_can_fail_a_kv_cache_leaks(tok, packed):
    """With use_cache=True transformers skips the per-document mask: the test above would catch it."""
    model = tiny_model("sdpa")
    batch = collate([packed[0]], tok.pad_token_id)
    start, end = doc_bounds(batch["position_ids"][0], len(packed[0]["input_ids"]))[1]
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        alone = model(input_ids=batch["input_ids"][:, start:end], use_cache=False).logits
    assert (leaky[0, start:end] - alone[0]).abs().max().item() > 0.1


def test_packing_is_efficient_and_lossless(tok, packed):
    docs = np.concatenate(packed.rows)
    assert sorted(docs.tolist()) == list(range(400))  # every document exactly once
    stats = packed.stats()
    assert all(len(packed[i]["input_ids"]) <= 256 for i in range(len(packed)))
    assert stats["packing"]["fill"] > 0.95, stats["packing"]
    assert sum(packed.label_tokens(i) for i in range(len(packed))) == stats["trained_tokens"]
    assert [len(b) for b in pack(np.array([5, 3, 7, 2, 8]), 10)] == [2, 2, 1]  # 8+2, 7+3, 5


def test_combinations_that_would_leak_are_refused():
    assert packing_problems("sdpa", "lora", on_gpu=False) == []
    assert "needs a CUDA GPU" in packing_problems("flash_attention_2", "none", on_gpu=False)[0]
    assert "prefix_tuning" in packing_problems("sdpa", "prefix_tuning", on_gpu=False)[0]
    assert packing_problems("flash_attention_2", "none", on_gpu=True) == []


def test_collate_pads_to_a_fixed_width_as_one_more_document():
    from trainer.data.collate import row_width

    packed_rows = [{"input_ids": [5, 6, 7], "labels": [IGNORE, 6, 7], "position_ids": [0, 1, 0]},
                   {"input_ids": [8], "labels": [8], "position_ids": [0]}]
    batch = collate(packed_rows, pad_id=1, width=6)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 1, 1], [8, 1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 0, 1, 2], [0, 0, 1, 2, 3, 4]]
    assert (batch["labels"][:, 3:] == IGNORE).all() and batch["labels"][1, 1:].eq(IGNORE).all()
    plain = collate([{"input_ids": [5, 6], "labels": [5, 6]}], pad_id=1, width=4)
    assert plain["attention_mask"].tolist() == [[1, 1, 0, 0]] and "position_ids" not in plain
    assert collate(packed_rows, pad_id=1)["input_ids"].shape == (2, 3)  # no width: the longest row
    # data.pad_to: a fixed width for compile (auto) or when asked, else each batch's longest row
    assert row_width("auto", 512, compiled=True) == 512 and row_width("auto", 512, compiled=False) is None
    assert row_width("max_seq_len", 512, compiled=False) == 512 and row_width("longest", 512, compiled=True) is None
