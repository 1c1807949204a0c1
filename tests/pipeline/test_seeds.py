from pipeline.seeds import HELDOUT, SEED_BITS, epoch_seed, prompt_seeds, sample_seed


def test_no_collision_where_additive_seeds_collided():
    # old: seed*K + step + prompt_index, so (step s, prompt j+1) == (step s+1, prompt j)
    for s in range(20):
        for j in range(20):
            assert sample_seed(0, s, f"p{j + 1}", 0) != sample_seed(0, s + 1, f"p{j}", 0)


def test_all_seeds_of_a_run_distinct_and_in_range():
    seeds = [sample_seed(3, step, f"p{j}", k) for step in [*range(50), HELDOUT] for j in range(32) for k in range(4)]
    assert len(set(seeds)) == len(seeds)
    assert all(0 <= s < 2 ** SEED_BITS for s in seeds)


def test_heldout_domain_is_fixed_and_distinct_from_training():
    heldout = prompt_seeds(0, HELDOUT, ["a", "b"], 3)
    assert heldout == prompt_seeds(0, HELDOUT, ["a", "b"], 3)  # every evaluation samples with the same noise
    training = {s for step in range(100) for row in prompt_seeds(0, step, ["a", "b"], 3) for s in row}
    assert not training & {s for row in heldout for s in row}


def test_seed_is_a_function_of_the_sample_not_its_position():
    both = prompt_seeds(0, 5, ["a", "b"], 2)
    assert prompt_seeds(0, 5, ["b"], 2) == [both[1]]  # b's seeds do not depend on a being in the same shard
    assert sample_seed(0, 5, "a", 0) != sample_seed(1, 5, "a", 0) != sample_seed(0, 5, "a", 1)
    assert epoch_seed(1, 0) != epoch_seed(0, 1)
