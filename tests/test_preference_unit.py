"""Preference objectives in one process: the losses against the papers' formulas computed here, the
LoRA reference against a frozen copy of the base model, preference data (formats, bad input, length
policy), and the checks made before launch.

Tolerance of the loss checks. Both sides run the same fp32 model on the same sequences; the
objective batches chosen and rejected together (padded rows, one matmul over 2B rows) while the
check below runs every sequence alone and sums log-softmax entries one position at a time. fp32
rounding then differs by a few ulps per logit (~1e-6 relative), summed over ~30 answer tokens of
log-probs near -7: about 1e-5 absolute on a sequence's log-prob. A wrong formula (a sign, a missing
beta, a mean in place of a sum, padding counted) moves the loss by 1e-2 or more. rel=abs=1e-4 (IPO
squares h, so its absolute error is ~2|h| times larger: 1e-4 on a loss near 10, still 1e-5 relative).
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from helpers import REPO
from trainer.builtin_init import materialize
from trainer.config import DataConfig, ModelConfig, ObjectiveConfig, PeftConfig, to_config
from trainer.data import cache
from trainer.data.errors import DataError
from trainer.data.preference import build_preference_datasets, collate_rows, fit
from trainer.model import BUILTIN_DIR, build_tokenizer
from trainer.objectives import Preference, reference_mode, sequence_logps

FIXTURES = REPO / "tests" / "fixtures" / "preference"
TOL = dict(rel=1e-4, abs=1e-4)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(ModelConfig(name_or_path="builtin:tiny-llama"))


@pytest.fixture(scope="module")
def models():
    """The tiny model as policy, and a perturbed copy as a reference that differs from it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(materialize(BUILTIN_DIR / "tiny-llama", 7), dtype=torch.float32)
    reference = copy.deepcopy(policy)
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return policy.eval(), reference.eval()


def _data(tmp_path, files, kind, tokenizer, **overrides):
    cfg = DataConfig(train_files=[str(f) for f in files], max_seq_len=128, cache_dir=str(tmp_path / "cache"),
                     **overrides)
    return build_preference_datasets(cfg, kind, tokenizer)


# ---------------------------------------------------------------- independent implementation

def logp_alone(model, row) -> float:
    """Sum of log p(label) of one sequence run alone, position by position (no batching, no padding)."""
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].double()
    total = 0.0
    for t in range(len(row["labels"]) - 1):
        target = row["labels"][t + 1]
        if target != -100:
            total += float(logits[t, target] - torch.logsumexp(logits[t], dim=0))
    return total


def answer_tokens(row) -> int:
    return sum(1 for label in row["labels"][1:] if label != -100)


def neg_log_sigmoid(x: float) -> float:
    return -math.log(1 / (1 + math.exp(-x)))


def paper_dpo(h: float, beta: float, loss_type: str, eps: float) -> float:
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        return ((1 - eps) * neg_log_sigmoid(beta * h) - eps * neg_log_sigmoid(-beta * h)) / (1 - 2 * eps)
    return (1 - eps) * neg_log_sigmoid(beta * h) + eps * neg_log_sigmoid(-beta * h)


def _with_reference(objective, rows, reference_model):
    """The batch as the loop sees it, reference log-probs precomputed by the objective's own path."""
    batch = collate_rows(rows, 0)
    with torch.no_grad():
        logps, _ = sequence_logps(reference_model, batch)
    batch["reference"] = torch.stack(logps.chunk(2), dim=1).double()
    return batch


@pytest.mark.parametrize("loss_type,eps,sft_weight", [("sigmoid", 0.0, 0.0), ("sigmoid", 0.1, 0.0),
                                                      ("robust", 0.2, 0.0), ("ipo", 0.0, 0.0),
                                                      ("sigmoid", 0.0, 0.5)])
def test_dpo_loss_matches_the_papers_formula(tmp_path, tokenizer, models, loss_type, eps, sft_weight):
    policy, reference = models
    train, _ = _data(tmp_path, [FIXTURES / "pairs.jsonl"], "preference", tokenizer)
    rows = [train[i] for i in range(4)]
    beta = 0.3
    objective = Preference(ObjectiveConfig(name="dpo", beta=beta, loss_type=loss_type, label_smoothing=eps,
                                           sft_weight=sft_weight), "precomputed")
    loss, totals = objective.micro_loss(policy, _with_reference(objective, rows, reference))
    expected, accuracy = 0.0, 0
    for row in rows:
        chosen, rejected = row["sequences"]
        pc, pr = logp_alone(policy, chosen), logp_alone(policy, rejected)
        rc, rr = logp_alone(reference, chosen), logp_alone(reference, rejected)
        h = (pc - rc) - (pr - rr)
        expected += paper_dpo(h, beta, loss_type, eps) + sft_weight * (-pc / answer_tokens(chosen))
        accuracy += (beta * (pc - rc)) > (beta * (pr - rr))
    print(f"dpo {loss_type} eps={eps} sft={sft_weight}: objective {loss.item():.8f} paper {expected:.8f} "
          f"diff {abs(loss.item() - expected):.2e}")
    assert loss.item() == pytest.approx(expected, **TOL)
    assert totals["rewards/accuracy"] == (accuracy, 4)


def test_simpo_loss_matches_the_papers_formula(tmp_path, tokenizer, models):
    policy, _ = models
    train, _ = _data(tmp_path, [FIXTURES / "pairs.jsonl"], "preference", tokenizer)
    rows = [train[i] for i in range(4)]
    objective = Preference(ObjectiveConfig(name="simpo", beta=2.0, gamma=0.7), "none")
    loss, _ = objective.micro_loss(policy, collate_rows(rows, 0))
    expected = 0.0
    for row in rows:
        chosen, rejected = row["sequences"]
        margin = (2.0 * logp_alone(policy, chosen) / answer_tokens(chosen)
                  - 2.0 * logp_alone(policy, rejected) / answer_tokens(rejected))
        expected += neg_log_sigmoid(margin - 0.7)
    print(f"simpo: objective {loss.item():.8f} paper {expected:.8f} diff {abs(loss.item() - expected):.2e}")
    assert loss.item() == pytest.approx(expected, **TOL)


def test_kto_loss_matches_the_papers_formula(tmp_path, tokenizer, models):
    policy, reference = models
    train, _ = _data(tmp_path, [FIXTURES / "kto.jsonl"], "kto", tokenizer)
    rows = [train[i] for i in range(6)]
    assert {row["desirable"] for row in rows} == {True, False}
    beta, w_d, w_u = 0.5, 1.0, 1.5
    objective = Preference(ObjectiveConfig(name="kto", beta=beta, desirable_weight=w_d, undesirable_weight=w_u),
                           "precomputed")
    loss, totals = objective.micro_loss(policy, _with_reference(objective, rows, reference))
    # The reference point: the KL of policy to reference on mismatched (prompt, other answer) samples,
    # averaged over the batch, floored at 0.
    kl = [logp_alone(policy, row["sequences"][1]) - logp_alone(reference, row["sequences"][1]) for row in rows]
    z0 = max(0.0, sum(kl) / len(kl))
    expected = 0.0
    for row in rows:
        r = logp_alone(policy, row["sequences"][0]) - logp_alone(reference, row["sequences"][0])
        sigmoid = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        expected += w_d * (1 - sigmoid(beta * (r - z0))) if row["desirable"] else w_u * (1 - sigmoid(beta * (z0 - r)))
    print(f"kto: objective {loss.item():.8f} paper {expected:.8f} diff {abs(loss.item() - expected):.2e}, z0 {z0:.4f}")
    assert loss.item() == pytest.approx(expected, **TOL)
    assert totals["kl"][0] / totals["kl"][1] == pytest.approx(z0, **TOL)


def test_lora_reference_is_the_frozen_base_model(tmp_path, tokenizer, models):
    """Adapters off must give exactly the base model's log-probs, while adapters on differ."""
    from trainer.peft_methods import apply_peft

    base = copy.deepcopy(models[0])
    frozen = copy.deepcopy(base).eval()
    peft_model = apply_peft(base, PeftConfig(method="lora", r=4, alpha=8, dropout=0.1), "llama")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:  # LoRA starts as the identity; make the adapter change the model
                param.add_(0.05 * torch.randn_like(param))
    peft_model.train()
    train, _ = _data(tmp_path, [FIXTURES / "pairs.jsonl"], "preference", tokenizer)
    batch = collate_rows([train[i] for i in range(4)], 0)
    objective = Preference(ObjectiveConfig(name="dpo"), "adapters_off")
    reference = objective.reference_logps(peft_model, batch)
    with torch.no_grad():
        expected, _ = sequence_logps(frozen, batch)
        with_adapters, _ = sequence_logps(peft_model.eval(), batch)
    expected = torch.stack(expected.chunk(2), dim=1)
    diff = float((reference - expected).abs().max())
    print(f"LoRA reference (adapters off) vs frozen base copy: max |diff| {diff:.2e}; "
          f"adapters on differ by {float((torch.stack(with_adapters.chunk(2), 1) - expected).abs().max()):.3f}")
    assert diff <= 1e-5
    assert not torch.allclose(torch.stack(with_adapters.chunk(2), dim=1), expected, atol=1e-2)
    peft_model.train()
    with reference_mode(peft_model):
        assert not peft_model.training
    assert peft_model.training


# ---------------------------------------------------------------- data

def _write(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


BAD_PAIRS = [
    ({"prompt": "Hi?", "chosen": "Same.", "rejected": "Same."}, "identical_answers"),
    ({"prompt": "Hi?", "chosen": "  ", "rejected": "No."}, "empty_answer"),
    ({"chosen": [{"role": "user", "content": "A?"}, {"role": "assistant", "content": "Yes."}],
      "rejected": [{"role": "user", "content": "B?"}, {"role": "assistant", "content": "No."}]}, "no_shared_prompt"),
    ({"prompt": "Hi?", "chosen": "word " * 200, "rejected": "No."}, "too_long"),
]


@pytest.mark.parametrize("record,reason", BAD_PAIRS, ids=[r for _, r in BAD_PAIRS])
def test_bad_pair_stops_strict_mode_with_file_line_and_reason(tmp_path, tokenizer, record, reason):
    good = {"prompt": "Hello?", "chosen": "Hello, friend.", "rejected": "Go away."}
    path = _write(tmp_path / "pairs.jsonl", [good, good, record])
    with pytest.raises(DataError) as err:
        _data(tmp_path, [path], "preference", tokenizer)
    assert err.value.reason == reason and f"{path}:3" in str(err.value), str(err.value)


def test_skip_mode_counts_bad_pairs_by_reason(tmp_path, tokenizer):
    good = {"prompt": "Hello?", "chosen": "Hello, friend.", "rejected": "Go away."}
    path = _write(tmp_path / "pairs.jsonl", [good, *[r for r, _ in BAD_PAIRS], good, "{not json"])
    train, _ = _data(tmp_path, [path], "preference", tokenizer, on_error="skip")
    assert len(train) == 2
    assert train.stats()["skipped"] == {"identical_answers": 1, "empty_answer": 1, "no_shared_prompt": 1,
                                        "too_long": 1, "malformed_json": 1}


def test_kto_labels_must_be_booleans_and_not_all_desirable(tmp_path, tokenizer):
    path = _write(tmp_path / "kto.jsonl", [{"prompt": "Q?", "completion": "A.", "label": True},
                                           {"prompt": "Q?", "completion": "B.", "label": "yes"}])
    with pytest.raises(DataError) as err:
        _data(tmp_path, [path], "kto", tokenizer)
    assert err.value.reason == "bad_label" and f"{path}:2" in str(err.value)
    only_good = _write(tmp_path / "good.jsonl", [{"prompt": "Q?", "completion": f"A{i}.", "label": True}
                                                 for i in range(3)])
    with pytest.raises(DataError) as err:
        _data(tmp_path, [only_good], "kto", tokenizer)
    assert err.value.reason == "one_sided" and "objective=sft" in str(err.value)


def test_every_pair_shape_renders_the_same_and_trains_only_the_answer(tmp_path, tokenizer):
    """A string pair, message lists, whole conversations and remapped field names give the same tokens."""
    conversation = lambda answer: [{"role": "user", "content": "Tell me."}, {"role": "assistant", "content": answer}]  # noqa: E731
    shapes = [{"prompt": "Tell me.", "chosen": "Yes, gladly.", "rejected": "No."},
              {"prompt": [{"role": "user", "content": "Tell me."}],
               "chosen": [{"role": "assistant", "content": "Yes, gladly."}],
               "rejected": [{"role": "assistant", "content": "No."}]},
              {"chosen": conversation("Yes, gladly."), "rejected": conversation("No.")}]
    rows = [_data(tmp_path / str(i), [_write(tmp_path / f"{i}.jsonl", [s])], "preference", tokenizer)[0][0]
            for i, s in enumerate(shapes)]
    assert rows[0] == rows[1] == rows[2]
    renamed = _write(tmp_path / "renamed.jsonl", [{"question": "Tell me.", "good": "Yes, gladly.", "bad": "No."}])
    remapped, _ = _data(tmp_path / "r", [renamed], "preference", tokenizer,
                        fields={"prompt": "question", "chosen": "good", "rejected": "bad"})
    assert remapped[0] == rows[0]
    chosen = rows[0]["sequences"][0]
    trained = tokenizer.decode([t for t in chosen["labels"] if t != -100])
    assert trained.startswith("Yes, gladly.") and "Tell me" not in trained


def test_length_policy_cuts_the_prompt_from_its_start_then_the_answer_from_its_end():
    import numpy as np

    ids = np.arange(20)
    trained = np.array([0] * 12 + [1] * 8, dtype=np.uint8)  # a 12-token prompt, an 8-token answer
    cut_ids, cut_trained, prompt_cut, answer_cut = fit(ids, trained, 16)
    assert list(cut_ids) == list(range(4, 20)) and prompt_cut and not answer_cut  # prompt lost its start
    long_answer = np.array([0] * 6 + [1] * 14, dtype=np.uint8)
    cut_ids, _, prompt_cut, answer_cut = fit(ids, long_answer, 16)
    # the prompt keeps min(its length, 16 / 2) = 6 tokens; the answer loses its end
    assert list(cut_ids) == list(range(0, 16)) and not prompt_cut and answer_cut


def test_the_cache_key_includes_the_objectives_format():
    cfg = DataConfig(train_files=["x"])
    keys = {cache.cache_key("data", "tok", replace(cfg, format=f)) for f in ("auto", "preference", "kto")}
    assert len(keys) == 3


# ---------------------------------------------------------------- validation

def _problems(**overrides):
    from trainer.config import ConfigError
    from trainer.validate import validate

    node = {"model": {"name_or_path": "builtin:tiny-llama"}, "run": {"dir": "/tmp/x", "name": "x"}}
    for dotted, value in overrides.items():
        group, key = dotted.split("__")
        node.setdefault(group, {})[key] = value
    try:
        validate(to_config(node), has_cuda=False, check_files=False)
    except ConfigError as err:
        return err.problems
    return []


@pytest.mark.parametrize("overrides,expected", [
    ({"objective__name": "simpo", "objective__reference": "precomputed"}, "objective.reference=precomputed"),
    ({"objective__name": "dpo", "objective__reference": "none"}, "objective.reference=none"),
    ({"objective__name": "dpo", "objective__reference": "adapters_off"}, "needs a peft method"),
    ({"objective__name": "dpo", "data__format": "kto"}, "data.format=kto does not fit objective=dpo"),
    ({"objective__name": "sft", "data__format": "preference"}, "objective=sft cannot train on"),
    ({"objective__name": "dpo", "data__packing": True}, "data.packing=true with objective=dpo"),
    ({"objective__name": "dpo", "objective__loss_type": "hinge"}, "objective.loss_type='hinge'"),
    ({"objective__name": "dpo", "objective__loss_type": "robust", "objective__label_smoothing": 0.5},
     "objective.label_smoothing=0.5 must be in [0, 0.5)"),
    ({"objective__name": "kto", "objective__beta": 0.0}, "objective.beta=0.0 must be > 0"),
])
def test_validation_names_the_key_and_what_would_be_valid(overrides, expected):
    problems = _problems(**overrides)
    assert any(expected in p for p in problems), problems


def test_valid_preference_configs_pass():
    assert _problems(objective__name="dpo") == []
    assert _problems(objective__name="simpo") == []
    assert _problems(objective__name="kto", peft__method="lora") == []


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "configs" / "objective").glob("*.yaml")))
def test_every_shipped_objective_composes_and_validates_with_its_data(name):
    from launcher.compose import compose

    data = {"sft": [], "kto": [f"data.train_files=[{REPO / 'samples/preference/kto.jsonl'}]"]}.get(
        name, [f"data.train_files=[{REPO / 'samples/preference/train.jsonl'}]"])
    cfg = compose([f"objective={name}", *data, "data.eval_files=[]"], validate_files=True)
    assert cfg.objective.name == name


def test_a_preference_objective_on_sft_conversations_is_refused_before_launch():
    from launcher.compose import compose
    from trainer.config import ConfigError

    with pytest.raises(ConfigError) as err:  # the default data is chat conversations (samples/chat)
        compose(["objective=dpo"], validate_files=True)
    assert "samples/chat/train.jsonl:1 has keys ['messages'], not preference data" in str(err.value)
