"""bench/seed_stats.py: the across-seed mean, sample std, t-interval and verdict on numbers worked by hand."""

import math

import pytest

from bench.seed_stats import across_seeds, paired_across_seeds, t_interval

T_975_DF2 = 4.302652729911275  # t_{0.975, 2} (tables: 4.303)


def test_across_seeds_is_the_mean_and_sample_std():
    out = across_seeds([1.0, 2.0, 3.0])
    assert out == {"values": [1.0, 2.0, 3.0], "n": 3, "mean": 2.0, "std": 1.0}  # ddof 1: sqrt(2 / 2)
    assert across_seeds([0.5]) == {"values": [0.5], "n": 1, "mean": 0.5, "std": None}
    # A run without a number (an undefined mAP) drops out and n says so.
    assert across_seeds([None, float("nan"), 4.0, 6.0])["n"] == 2
    assert across_seeds([None, 4.0, 6.0])["std"] == pytest.approx(math.sqrt(2))


def test_diffs_1_2_3_give_an_interval_across_zero_and_stay_undecided():
    # mean 2, sd 1, n 3: 2 +- 4.303 * 1 / sqrt(3) = 2 +- 2.484 -> [-0.484, 4.484]
    out = paired_across_seeds([1.0, 2.0, 3.0])
    assert out["mean"] == 2.0 and out["std"] == 1.0 and out["n"] == 3
    assert out["ci95"] == pytest.approx([-0.484, 4.484], abs=1e-3)
    assert out["ci95"][1] - 2.0 == pytest.approx(T_975_DF2 / math.sqrt(3))
    assert out["same_sign"] and out["verdict"] == "undecided"  # all positive, but the interval holds 0


def test_diffs_2_3_4_are_a_finding():
    # mean 3, sd 1: 3 +- 2.484 -> [0.516, 5.484], every seed positive
    out = paired_across_seeds([2.0, 3.0, 4.0])
    assert out["ci95"] == pytest.approx([0.516, 5.484], abs=1e-3)
    assert out["verdict"] == "finding"
    negative = paired_across_seeds([-2.0, -3.0, -4.0])
    assert negative["ci95"] == pytest.approx([-5.484, -0.516], abs=1e-3) and negative["verdict"] == "finding"


def test_one_seed_against_the_others_keeps_it_undecided():
    # Nine seeds at +10 and one at -0.1: mean 8.99, sd 3.194, t_{0.975,9} = 2.262 -> [6.71, 11.27] excludes
    # 0, yet one seed disagrees in sign.
    diffs = [10.0] * 9 + [-0.1]
    out = paired_across_seeds(diffs)
    assert out["ci95"][0] == pytest.approx(8.99 - 2.2622 * 3.1939 / math.sqrt(10), abs=1e-2)
    assert out["ci95"][0] > 0 and not out["same_sign"] and out["verdict"] == "undecided"
    # A zero difference agrees with no sign; one seed has no interval.
    assert paired_across_seeds([0.0, 1.0, 2.0])["verdict"] == "undecided"
    single = paired_across_seeds([5.0])
    assert single["ci95"] is None and single["verdict"] == "undecided"
    assert t_interval([1.0]) is None


def test_a_seed_without_a_number_keeps_the_pair_undecided():
    # Seeds 2, 3, 4 are a finding (above); a fourth seed whose difference is undefined (an undefined
    # mAP on either side) has not agreed: the statistics use the three, the verdict stays undecided.
    out = paired_across_seeds([2.0, None, 3.0, 4.0])
    assert out["n"] == 3 and out["undefined"] == 1 and out["mean"] == 3.0
    assert out["ci95"] == pytest.approx([0.516, 5.484], abs=1e-3) and out["verdict"] == "undecided"
    assert paired_across_seeds([2.0, float("nan"), 3.0, 4.0])["verdict"] == "undecided"
    assert paired_across_seeds([2.0, 3.0, 4.0])["undefined"] == 0
    from bench.quality_harness import _paired_cell

    cell = _paired_cell(paired_across_seeds([0.02, None, 0.03, 0.04]))
    assert cell == "+3.0 [+0.5, +5.5] undecided (1 seed(s) undefined)"
    assert _paired_cell(paired_across_seeds([0.02, 0.03, 0.04])) == "+3.0 [+0.5, +5.5] finding"


def test_rank_relation_on_worked_numbers():
    from bench.seed_stats import rank_relation

    # One seed, x = 1..4, y ranks 1, 3, 2, 4: rho = 1 - 6 * (0 + 1 + 1 + 0) / (4 * 15) = 0.8.
    one = rank_relation({0: [(1, 1), (2, 3), (3, 2), (4, 4)]}, permutations=2000)
    assert one["rho"] == pytest.approx(0.8) and one["per_seed"] == {"0": pytest.approx(0.8)} and one["n"] == 4
    # 24 orderings of y: rho >= 0.8 for 4 of them (the identity, and the three single adjacent swaps).
    assert one["p_value"] == pytest.approx(4 / 24, abs=0.02)
    assert one["verdict"] == "undecided"  # p > 0.05 however many permutations
    # Three seeds, y rising with x in each: rho 1 pooled and per seed; only the identity in every
    # seed reaches it ((1/24)^3 = 7e-5), so p is about 1 / (1 + permutations): a finding.
    rising = {s: [(x + s / 10, 10 * x + s) for x in (1, 2, 3, 4)] for s in range(3)}
    found = rank_relation(rising, permutations=2000)
    assert found["rho"] == pytest.approx(1.0) and found["same_sign"] and found["verdict"] == "finding"
    assert found["p_value"] < 0.005 and found["n"] == 12
    # One seed falls instead: the seeds disagree in sign, undecided.
    mixed = {**rising, 2: [(x, -x) for x in (1, 2, 3, 4)]}
    assert rank_relation(mixed, permutations=500)["verdict"] == "undecided"
    assert rank_relation(mixed, permutations=500)["per_seed"]["2"] == pytest.approx(-1.0)
    # Undefined values drop out (n counts the rest); a constant y has no rank correlation.
    dropped = rank_relation({0: [(1, 1), (2, None), (3, 3), (4, float("nan")), (5, 5)]}, permutations=100)
    assert dropped["n"] == 3 and dropped["rho"] == pytest.approx(1.0)
    flat = rank_relation({0: [(1, 2), (2, 2), (3, 2)]}, permutations=100)
    assert flat["rho"] is None and flat["p_value"] is None and flat["verdict"] == "undecided"
