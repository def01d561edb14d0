"""The chunked loss (model.loss_chunks) computes the whole loss's value and gradients, in one process."""
import pytest
import torch

from helpers import REPO
from trainer.config import ConfigError, RootConfig
from trainer.data.render import IGNORE
from trainer.loss import check_chunked_loss_supported, sum_cross_entropy
from trainer.model import BUILTIN_DIR
from trainer.validate import validate


def tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(BUILTIN_DIR / "tiny-llama")
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def a_batch(vocab: int):
    torch.manual_seed(1)
    ids = torch.randint(0, vocab, (3, 40))
    labels = ids.clone()
    labels[:, :10] = IGNORE  # a masked prompt
    labels[1, 25:] = IGNORE  # padding
    labels[2] = IGNORE  # a row with no label at all
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def loss_and_grads(model, batch, chunks):
    model.zero_grad()
    loss = sum_cross_entropy(model, batch, chunks)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("use_lora", [False, True])
def test_chunked_loss_matches_the_whole_loss(use_lora):
    model = tiny_model()
    if use_lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    batch = a_batch(model.config.vocab_size)
    whole, whole_grads = loss_and_grads(model, batch, 1)
    for chunks in (2, 7, 200):  # 200: more chunks than label tokens, most of them empty
        value, grads = loss_and_grads(model, batch, chunks)
        assert value == pytest.approx(whole, rel=1e-6)
        assert grads.keys() == whole_grads.keys()
        for name, grad in grads.items():
            # fp32 sums in another order: differences of a few ulps of the largest entry
            scale = whole_grads[name].abs().max()
            assert (grad - whole_grads[name]).abs().max() <= 1e-4 * scale, name


def test_chunked_loss_never_makes_the_whole_logits():
    from torch.overrides import TorchFunctionMode

    model = tiny_model()
    weight = model.get_output_embeddings().weight
    rows = []  # tokens per application of the head in forward

    class HeadCalls(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.nn.functional.linear and args[1] is weight:
                rows.append(out.shape[0] if out.dim() == 2 else out.shape[:-1].numel())
            return out

    batch = a_batch(model.config.vocab_size)
    with HeadCalls():
        sum_cross_entropy(model, batch, 4).backward()
    label_tokens = int((batch["labels"][:, 1:] != IGNORE).sum())
    assert max(rows) <= -(-label_tokens // 4)  # one piece of the label tokens at most
    assert sum(rows) == label_tokens  # masked prompt and padding positions never reach the head


def test_models_that_transform_their_logits_are_refused(tmp_path):
    from transformers import AutoConfig

    with pytest.raises(ValueError, match="final_logit_softcapping=30.0 .*model.loss_chunks=1"):
        check_chunked_loss_supported(AutoConfig.for_model("gemma2"), 4)
    check_chunked_loss_supported(AutoConfig.for_model("llama"), 4)
    # before any process is spawned, from the model folder's config.json
    AutoConfig.for_model("gemma2").save_pretrained(tmp_path)
    cfg = RootConfig()
    cfg.model.name_or_path, cfg.model.loss_chunks, cfg.run.dir, cfg.run.name = str(tmp_path), 4, "/tmp/x", "x"
    cfg.model.random_init = True  # the folder holds a config.json only
    cfg.data.train_files = [str(REPO / "samples/chat/train.jsonl")]
    with pytest.raises(ConfigError, match="model.loss_chunks=4: this gemma2 applies final_logit_softcapping"):
        validate(cfg, has_cuda=False)
    cfg.model.loss_chunks = 1
    validate(cfg, has_cuda=False)
