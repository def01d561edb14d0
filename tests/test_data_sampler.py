"""The step-indexed sampler: resume mid-epoch sees exactly the rest; ranks see disjoint samples."""
from __future__ import annotations

from trainer.data.sampler import GlobalBatchSampler


def seen(sampler, steps):
    return [i for step in steps for batch in sampler.micro_batches(step) for i in batch]


def test_resume_mid_epoch_sees_exactly_the_remaining_samples():
    n, world = 50, 2
    make = lambda rank: GlobalBatchSampler(n, micro_batch=2, grad_accum=3, world_size=world, rank=rank, seed=7)
    steps_per_epoch = make(0).steps_per_epoch  # 50 // 12 = 4
    uninterrupted = [seen(make(r), range(steps_per_epoch)) for r in range(world)]
    # A run stopped after step 2 resumes from the checkpointed step with a fresh sampler object.
    before = [seen(make(r), range(2)) for r in range(world)]
    state = make(0).state_dict(2)
    assert (state["epoch"], state["step_in_epoch"]) == (0, 2)
    after = [seen(make(r), range(state["step_in_epoch"], steps_per_epoch)) for r in range(world)]
    for r in range(world):
        assert before[r] + after[r] == uninterrupted[r]
    epoch = sorted(i for r in range(world) for i in before[r] + after[r])
    assert len(epoch) == len(set(epoch)) == steps_per_epoch * 12  # no repeat, no skip within the epoch


def test_ranks_see_disjoint_samples_and_the_global_batch_is_world_size_independent():
    two = [GlobalBatchSampler(40, 2, 2, world_size=2, rank=r, seed=1) for r in range(2)]
    one = GlobalBatchSampler(40, 4, 2, world_size=1, rank=0, seed=1)
    for step in range(12):  # three epochs
        a, b = seen(two[0], [step]), seen(two[1], [step])
        assert not set(a) & set(b)
        assert sorted(a + b) == sorted(seen(one, [step]))
    assert seen(two[0], [0]) != seen(two[0], [10])  # reshuffled per epoch
