"""End to end through the real launcher: 2 CPU ranks, real DeepSpeed, ZeRO-0/2/3, full and LoRA.

The ZeRO-stage check: with the same seed, data and global batch, ZeRO-0 on one rank and ZeRO-2/3 on
two ranks must give the same loss curve. Differences can only come from floating-point reduction
order (gradients averaged over 2 ranks, micro-batches padded to different widths), which in fp32
moves a loss of ~7 by about 1e-6; a sharding bug (a lost or double-counted shard, a wrong loss
normalisation) moves it by 1e-2 or more. The tolerance, 1e-4 absolute, sits between the two.
"""
import json

import pytest

from helpers import losses, metrics, train

pytestmark = pytest.mark.distributed
STEPS = 8
COMMON = [f"train.max_steps={STEPS}", "optim.lr=1e-3", "optim.warmup_steps=0", "checkpoint.every_steps=4",
          "checkpoint.keep_last=1", "seed=7"]
STAGE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference runs, shared by the tests below (one launch each)."""
    root = tmp_path_factory.mktemp("foundation")
    specs = {
        "zero0_1rank": ["deepspeed=zero0", "cluster.nproc_per_node=1", "train.micro_batch_size=4"],
        "zero2": ["deepspeed=zero2", "cluster.nproc_per_node=2", "train.micro_batch_size=2"],
        "zero3": ["deepspeed=zero3", "cluster.nproc_per_node=2", "train.micro_batch_size=2"],
        # the loss in 3 checkpointed pieces inside one call of the head (tied to the embedding) under ZeRO-3
        "zero3_chunked_loss": ["deepspeed=zero3", "cluster.nproc_per_node=2", "train.micro_batch_size=2",
                               "model.loss_chunks=3"],
        "zero3_lora": ["deepspeed=zero3", "peft=lora", "cluster.nproc_per_node=2", "train.micro_batch_size=2",
                       "deepspeed.stage3_param_persistence_threshold=0"],
        "zero2_lora": ["deepspeed=zero2", "peft=lora", "cluster.nproc_per_node=2", "train.micro_batch_size=2"],
    }
    out = {}
    for name, overrides in specs.items():
        run_dir = root / name
        proc = train(run_dir, *COMMON, *overrides)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-5000:]}"
        out[name] = run_dir
    return out


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_lora", "zero2_lora"])
def test_two_ranks_train_loss_falls_and_checkpoints_exist(runs, name):
    run_dir = runs[name]
    curve = losses(run_dir)
    assert len(curve) == STEPS
    assert sum(curve[-2:]) / 2 < sum(curve[:2]) / 2 - 0.05, f"loss did not fall: {curve}"
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step-{STEPS:08d}"
    shards = list((run_dir / "checkpoints" / latest).glob("*model_states.pt"))
    assert shards, "no DeepSpeed shards in the checkpoint"
    assert len(list((run_dir / "checkpoints").glob("step-*"))) == 1  # keep_last=1
    env = json.loads((run_dir / "env.json").read_text())
    assert env["world_size"] == 2 and env["versions"]["deepspeed"]


def test_metrics_jsonl_is_well_formed(runs):
    records = metrics(runs["zero3"])
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    for r in records:
        for key in ("step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"):
            assert isinstance(r[key], (int, float)), (key, r)
    tokens = [r["tokens"] for r in records]
    assert tokens == sorted(tokens) and tokens[0] > 0
    evals = metrics(runs["zero3"], kind="eval")
    assert evals and evals[-1]["step"] == STEPS


def test_zero_stages_give_the_same_loss_curve(runs):
    reference = losses(runs["zero0_1rank"])
    for name in ("zero2", "zero3"):
        diff = max(abs(a - b) for a, b in zip(reference, losses(runs[name])))
        print(f"largest loss difference zero0(1 rank) vs {name}(2 ranks): {diff:.2e}")
        assert diff <= STAGE_TOLERANCE, f"{name} deviates by {diff}"


def test_chunked_loss_gives_the_same_loss_curve(runs):
    """model.loss_chunks=3 computes the same sums in another order: the curve must not move."""
    diff = max(abs(a - b) for a, b in zip(losses(runs["zero3"]), losses(runs["zero3_chunked_loss"])))
    print(f"largest loss difference zero3 vs zero3 with model.loss_chunks=3: {diff:.2e}")
    assert len(losses(runs["zero3_chunked_loss"])) == STEPS and diff <= STAGE_TOLERANCE
    evals = [r["eval_loss"] for r in metrics(runs["zero3_chunked_loss"], kind="eval")]
    reference = [r["eval_loss"] for r in metrics(runs["zero3"], kind="eval")]
    assert len(evals) == len(reference) and max(abs(a - b) for a, b in zip(evals, reference)) <= STAGE_TOLERANCE


def test_lora_trains_only_the_adapter(runs):
    log = (runs["zero3_lora"] / "metrics.jsonl").read_text()
    assert log  # trained; the parameter split is printed by rank 0:
    lines = [json.loads(x) for x in log.splitlines()]
    assert all(x["loss"] is not None for x in lines if x.get("kind") == "train")


RESUMED = {  # LoRA has dropout (0.05): its resumed steps must also train in train mode, with the same RNG
    # ZeRO-3 with data.streaming (rows tokenised from the source as they are read): stopped mid-epoch,
    # it must continue the map-style run's curve (the same rows in the same order)
    "zero3_streamed": ["deepspeed=zero3", "cluster.nproc_per_node=2", "train.micro_batch_size=2",
                       "data.streaming=true"],
    "zero2_lora": ["deepspeed=zero2", "peft=lora", "cluster.nproc_per_node=2", "train.micro_batch_size=2"],
}
UNINTERRUPTED = {"zero3_streamed": "zero3"}  # the reference run of a resumed case, where named otherwise


@pytest.mark.parametrize("name", list(RESUMED))
def test_stop_and_resume_continues_the_same_curve(runs, tmp_path, name):
    run_dir = tmp_path / "resumed"
    overrides = [*COMMON, *RESUMED[name]]
    stopped = train(run_dir, *overrides, "+train.fault_injection.stop_at_step=3")
    assert stopped.returncode == 75, stopped.stdout[-3000:]  # "stopped cleanly, resume me"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000003"
    resumed = train(run_dir, *overrides)  # resume=auto is the default
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert "resumed from" in resumed.stdout
    uninterrupted = losses(runs[UNINTERRUPTED.get(name, name)])
    curve = losses(run_dir)
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, STEPS + 1))
    diff = max(abs(a - b) for a, b in zip(uninterrupted, curve))
    print(f"largest loss difference resumed vs uninterrupted: {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.parametrize("how", ["tilde", "relative"])
def test_resume_from_a_path_given_with_tilde_or_relative_to_the_launcher(runs, tmp_path, how):
    """The launcher decides (launcher/resume.py) and the ranks obey control/resume.json: `~` is
    expanded and a relative path is taken from where the launcher runs (the ranks' working directory
    may differ, e.g. under Slurm). Before, `resume=~/...` passed the launcher and failed on every rank."""
    import os

    from helpers import REPO

    source = runs["zero0_1rank"] / "checkpoints" / "step-00000008"
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(runs["zero0_1rank"], home / "earlier")
    given = ("~/earlier/checkpoints/step-00000008" if how == "tilde"
             else os.path.relpath(source, REPO))  # helpers run shardtune from the checkout
    run_dir = tmp_path / "continued"
    proc = train(run_dir, *COMMON, "deepspeed=zero0", "cluster.nproc_per_node=1", "train.micro_batch_size=4",
                 "train.max_steps=10", f'resume="{given}"', env={"HOME": str(home)})  # Hydra needs ~ quoted
    assert proc.returncode == 0, proc.stdout[-3000:]
    decision = json.loads((run_dir / "control" / "resume.json").read_text())
    assert decision["resume_from"] == str(source.resolve())
    assert "resumed from" in proc.stdout
    assert [r["step"] for r in metrics(run_dir)] == [9, 10]


def test_a_resume_path_that_is_no_checkpoint_is_refused_before_any_rank_starts(tmp_path):
    proc = train(tmp_path / "run", f"resume={tmp_path / 'nowhere'}")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"resume={tmp_path / 'nowhere'}" in proc.stdout and "resume=auto or resume=never" in proc.stdout
    assert not (tmp_path / "run" / "heartbeats").exists()  # no rank ever started


def _model_with_dropout(folder):
    """The tiny model's seeded init as a local folder, with attention dropout switched on."""
    import shutil

    from trainer.builtin_init import materialize
    from trainer.model import BUILTIN_DIR

    shutil.copytree(materialize(BUILTIN_DIR / "tiny-llama", 7), folder)
    config = json.loads((folder / "config.json").read_text())
    config["attention_dropout"] = 0.2
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_full_fine_tuning_resumes_in_train_mode(tmp_path):
    """from_pretrained hands back a model in eval mode; a resumed run (no baseline eval to switch it)
    must still train with dropout on (and activation checkpointing active), as the uninterrupted one."""
    model = _model_with_dropout(tmp_path / "model")
    overrides = [*COMMON, "model=local", f"model.name_or_path={model}", "deepspeed=zero2",
                 "cluster.nproc_per_node=2", "train.micro_batch_size=2", "eval.baseline=true"]
    reference = train(tmp_path / "reference", *overrides)
    assert reference.returncode == 0, reference.stdout[-3000:]
    run_dir = tmp_path / "resumed"
    assert train(run_dir, *overrides, "+train.fault_injection.stop_at_step=3").returncode == 75
    resumed = train(run_dir, *overrides)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stdout[-3000:]
    diff = max(abs(a - b) for a, b in zip(losses(tmp_path / "reference"), losses(run_dir)))
    print(f"dropout model, largest loss difference resumed vs uninterrupted: {diff:.2e}")
    assert len(losses(run_dir)) == STEPS and diff <= 1e-5


# ---------------------------------------------------------------- adapter-sized checkpoints
def _checkpoint_mib(folder):
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


@pytest.mark.parametrize("name", ["zero2_lora", "zero3_lora"])
def test_an_adapter_checkpoint_holds_the_adapter_and_not_the_frozen_base(runs, name):
    """A LoRA checkpoint held the whole frozen base (SmolLM2-135M: 539 of 571 MiB; an 8B base ~16 GB per
    save). Now its module states hold the adapter's tensors only, no rank saves frozen fragments, and
    the train state records the base that a resume reloads."""
    from trainer.checkpoint import safe_load

    folder = runs[name] / "checkpoints" / f"step-{STEPS:08d}"
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["base"]["model"] == "builtin:tiny-llama" and state["base"]["files"], state["base"]
    for path in folder.glob("*model_states.pt"):
        saved = safe_load(path, map_location="cpu")
        kept = [key for key in saved["module"] if "lora_" not in key]  # lm_head.weight (tied) included
        assert not kept, f"{path.name} holds frozen weights: {kept[:5]}"
        assert not saved.get("frozen_param_fragments"), f"{path.name} holds frozen fragments"
    full = runs[name.removesuffix("_lora")] / "checkpoints" / f"step-{STEPS:08d}"
    print(f"{name}: checkpoint {_checkpoint_mib(folder):.2f} MiB (full fine-tuning of the same model: "
          f"{_checkpoint_mib(full):.2f} MiB)")


def test_an_adapter_checkpoint_resumes_on_another_world_size(tmp_path):
    """2 ranks stopped at step 3 -> 1 rank from the adapter-only checkpoint (through a universal one):
    the base comes from the model source, the adapter and its moments from the checkpoint. LoRA's
    dropout is off: its masks are drawn per rank, so they differ on another world size."""
    lora = [*COMMON, "deepspeed=zero2", "peft=lora", "peft.dropout=0", "train.micro_batch_size=2",
            "train.max_steps=5", "checkpoint.save_final=false"]
    reference = train(tmp_path / "uninterrupted", *lora, "cluster.nproc_per_node=2")
    assert reference.returncode == 0, reference.stdout[-3000:]
    run_dir = tmp_path / "two-to-one"
    assert train(run_dir, *lora, "cluster.nproc_per_node=2", "+train.fault_injection.stop_at_step=3").returncode == 75
    resumed = train(run_dir, *lora, "cluster.nproc_per_node=1")
    assert resumed.returncode == 0 and "universal" in resumed.stdout, resumed.stdout[-3000:]
    diffs = [abs(a - b) for a, b in zip(losses(tmp_path / "uninterrupted"), losses(run_dir))]
    print(f"LoRA adapter-only checkpoint, 2 ranks -> 1 rank: loss differences {[f'{d:.1e}' for d in diffs]}")
    assert [r["step"] for r in metrics(run_dir)] == list(range(1, 6)) and max(diffs) <= STAGE_TOLERANCE


def test_an_adapter_checkpoint_refuses_a_base_that_changed(tmp_path):
    """The base is not in the checkpoint: resuming onto other weights under the same path (another seed,
    another fine-tune; same file sizes) would train the adapter on a model it never saw. Refused."""
    import shutil

    from trainer.builtin_init import materialize
    from trainer.model import BUILTIN_DIR

    model = tmp_path / "model"
    shutil.copytree(materialize(BUILTIN_DIR / "tiny-llama", 7), model)
    overrides = [*COMMON, "model=local", f"model.name_or_path={model}", "deepspeed=zero2", "peft=lora",
                 "cluster.nproc_per_node=1", "train.micro_batch_size=4"]
    run_dir = tmp_path / "run"
    assert train(run_dir, *overrides, "+train.fault_injection.stop_at_step=2").returncode == 75
    other = materialize(BUILTIN_DIR / "tiny-llama", 8)  # same architecture, other weights, same sizes
    for path in other.glob("*.safetensors"):
        shutil.copy2(path, model / path.name)
    proc = train(run_dir, *overrides)
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "holds only the adapter" in proc.stdout and "save_frozen_base" in proc.stdout, proc.stdout[-3000:]
