"""aesearch.pareto against fronts, crowding distances and hypervolumes worked out by hand, and the
hypervolume against a Monte-Carlo estimate."""

from __future__ import annotations

import numpy as np
import pytest

from aesearch.pareto import crowding_distances, hypervolume, nondominated_ranks, pareto_order, to_minimise

NAN, INF = float("nan"), float("inf")


def test_to_minimise_negates_the_max_columns_and_checks_the_shape():
    assert to_minimise([[1, 2], [3, -4]], ["min", "max"]).tolist() == [[1.0, -2.0], [3.0, 4.0]]
    assert to_minimise([], ["min", "max"]).shape == (0, 2)
    with pytest.raises(ValueError, match="shape"):
        to_minimise([[1, 2, 3]], ["min", "max"])
    with pytest.raises(ValueError, match="modes"):
        to_minimise([[1]], ["lowest"])


def test_ranks_of_known_fronts_when_both_metrics_are_minimised():
    points = [[1, 5], [2, 2], [5, 1], [3, 3], [2, 6], [6, 6], [4, 4]]
    #          front 1 --------------   2       2       4       3
    assert nondominated_ranks(points, ["min", "min"]).tolist() == [1, 1, 1, 2, 2, 4, 3]


def test_ranks_follow_the_modes():
    # accuracy (max) against seconds (min): a slower trial is only kept if it is more accurate
    points = [[0.90, 10], [0.95, 20], [0.85, 15], [0.99, 30], [0.80, 40]]
    assert nondominated_ranks(points, ["max", "min"]).tolist() == [1, 1, 2, 1, 3]
    # the same numbers with both minimised: the least accurate and the fastest are kept instead
    assert nondominated_ranks(points, ["min", "min"]).tolist() == [1, 2, 1, 3, 1]


def test_equal_points_share_a_rank_and_do_not_dominate_each_other():
    points = [[2, 2], [1, 3], [2, 2], [3, 3], [3, 3]]
    assert nondominated_ranks(points, ["min", "min"]).tolist() == [1, 1, 1, 2, 2]


def test_a_row_with_nan_is_not_ranked_and_dominates_nothing():
    # [0, NaN] would dominate every other point if the NaN were ignored
    points = [[0, NAN], [1, 1], [2, 2], [NAN, NAN]]
    assert nondominated_ranks(points, ["min", "min"]).tolist() == [0, 1, 2, 0]
    assert crowding_distances(points, ["min", "min"])[[0, 3]].tolist() == [0.0, 0.0]
    assert pareto_order(points, ["min", "min"]).tolist() == [1, 2, 0, 3]


def test_one_metric_ranks_by_value_with_ties_sharing_a_rank():
    values = [[3.0], [1.0], [2.0], [1.0], [NAN], [5.0]]
    assert nondominated_ranks(values, ["min"]).tolist() == [3, 1, 2, 1, 0, 4]
    assert nondominated_ranks(values, ["max"]).tolist() == [2, 4, 3, 4, 0, 1]


def test_crowding_distances_of_a_front_worked_out_by_hand():
    # One front; ranges 6 (first metric) and 5 (second). (1, 3): neighbours 0 and 3 in the first metric, 1 and 5
    # in the second: 3/6 + 4/5 = 1.3. (3, 1): 5/6 + 3/5. The ends of the front are kept: inf.
    front = [[0, 5], [1, 3], [3, 1], [6, 0]]
    distances = crowding_distances(front, ["min", "min"])
    assert distances[[0, 3]].tolist() == [INF, INF]
    assert distances[1:3] == pytest.approx([3 / 6 + 4 / 5, 5 / 6 + 3 / 5])
    # the same front as maximised accuracy (the first metric negated) is the same front
    accuracy = [[-x, y] for x, y in front]
    assert crowding_distances(accuracy, ["max", "min"]) == pytest.approx(distances)


def test_crowding_distances_are_computed_within_each_front():
    points = [[0, 5], [1, 3], [3, 1], [6, 0],  # front 1, as above
              [2, 9], [4, 6], [8, 4],  # front 2: ranges 6 and 5; (4, 6): 6/6 + 5/5
              [9, 9], [10, 10]]  # fronts 3 and 4, one point each
    ranks = nondominated_ranks(points, ["min", "min"])
    assert ranks.tolist() == [1, 1, 1, 1, 2, 2, 2, 3, 4]
    distances = crowding_distances(points, ["min", "min"], ranks)
    assert distances[:4] == pytest.approx([INF, 3 / 6 + 4 / 5, 5 / 6 + 3 / 5, INF])
    assert distances[4:].tolist() == [INF, 2.0, INF, INF, INF]
    assert crowding_distances(points, ["min", "min"]) == pytest.approx(distances)  # the ranks found alone


def test_fronts_of_one_or_two_points_are_all_inf():
    assert crowding_distances([[1, 2]], ["min", "min"]).tolist() == [INF]
    assert crowding_distances([[1, 2], [2, 1]], ["min", "min"]).tolist() == [INF, INF]


def test_pareto_order_by_front_then_crowding_then_index():
    points = [[7, 7],  # front 2
              [1, 3],  # front 1, crowding 1.3
              [6, 0],  # front 1, an end
              [3, 1],  # front 1, crowding 1.433
              [0, 5]]  # front 1, an end
    assert pareto_order(points, ["min", "min"]).tolist() == [2, 4, 3, 1, 0]


def test_pareto_order_keeps_the_index_order_among_equal_points():
    points = [[2, 2], [1, 1], [2, 2], [1, 1], [2, 2]]
    assert pareto_order(points, ["min", "min"]).tolist() == [1, 3, 0, 2, 4]


@pytest.mark.parametrize("mode", ["min", "max"])
def test_pareto_order_of_one_metric_is_a_stable_sort_with_nan_last(mode):
    rng = np.random.default_rng(3)
    values = rng.integers(0, 8, size=40).astype(float)  # many ties
    values[[5, 17]] = NAN
    order = pareto_order(values[:, None], [mode])
    key = values if mode == "min" else -values
    expected = np.argsort(np.where(np.isnan(key), np.inf, key), kind="stable")
    assert order.tolist() == expected.tolist()


def test_hypervolume_in_two_dimensions_by_hand():
    # rectangles up to (4, 4): [1,4]x[3,4] + [2,4]x[1,3] = 3 + 4; the dominated (3, 3) adds nothing
    assert hypervolume([[1, 3], [2, 1], [3, 3]], ["min", "min"], [4, 4]) == pytest.approx(7.0)
    # accuracy (max) against loss (min), reference (0.5, 1.0): 0.4 * 0.8 + 0.3 * 0.9 - 0.3 * 0.8 (the overlap)
    assert hypervolume([[0.9, 0.2], [0.8, 0.1]], ["max", "min"], [0.5, 1.0]) == pytest.approx(0.35)


def test_hypervolume_in_three_dimensions_by_hand():
    # boxes up to (4, 4, 4) of volumes 9, 12 and 6; pairwise overlaps 4, 3, 4; all three overlap in 2
    points = [[1, 1, 3], [2, 2, 1], [3, 1, 2]]
    assert hypervolume(points, ["min"] * 3, [4, 4, 4]) == pytest.approx(9 + 12 + 6 - 4 - 3 - 4 + 2)
    assert hypervolume(points[:2], ["min"] * 3, [4, 4, 4]) == pytest.approx(9 + 12 - 4)


def test_hypervolume_counts_only_points_strictly_better_than_the_reference():
    assert hypervolume([[4, 1], [1, 4], [5, 0]], ["min", "min"], [4, 4]) == 0.0  # on or beyond the reference
    assert hypervolume([[1, 1], [NAN, 0], [4, 0]], ["min", "min"], [4, 4]) == pytest.approx(9.0)  # NaN ignored
    assert hypervolume([[0.9, 0.5]], ["max", "max"], [1.0, 0.0]) == 0.0  # the reference is better in accuracy
    assert hypervolume(np.empty((0, 3)), ["min"] * 3, [1, 1, 1]) == 0.0
    assert hypervolume([[2.0], [3.0]], ["min"], [5.0]) == pytest.approx(3.0)  # one metric: the best's distance
    assert hypervolume([[2.0], [3.0]], ["max"], [0.5]) == pytest.approx(2.5)


@pytest.mark.parametrize("metrics, count", [(2, 12), (3, 15), (4, 8)])
def test_hypervolume_matches_a_monte_carlo_estimate(metrics, count):
    rng = np.random.default_rng(metrics)
    modes = ["min", "max"] * 2
    points = rng.uniform(0.2, 1.0, size=(count, metrics))
    reference = np.array([1.1 if mode == "min" else 0.1 for mode in modes[:metrics]])
    minimised = to_minimise(points, modes[:metrics])
    reference_minimised = to_minimise([reference], modes[:metrics])[0]
    # sample the box between the best corner of the points and the reference; count the dominated samples
    low = minimised.min(axis=0)
    samples = rng.uniform(low, reference_minimised, size=(200_000, metrics))
    dominated = np.zeros(len(samples), dtype=bool)
    for point in minimised:
        dominated |= (point <= samples).all(axis=1)
    box = np.prod(reference_minimised - low)
    fraction = dominated.mean()
    tolerance = 5 * np.sqrt(fraction * (1 - fraction) / len(samples)) * box
    assert hypervolume(points, modes[:metrics], reference) == pytest.approx(fraction * box, abs=tolerance)


def test_hypervolume_does_not_change_with_dominated_points_or_their_order():
    rng = np.random.default_rng(11)
    points = rng.uniform(0, 1, size=(30, 3))
    volume = hypervolume(points, ["min"] * 3, [1, 1, 1])
    front = points[nondominated_ranks(points, ["min"] * 3) == 1]
    assert hypervolume(front, ["min"] * 3, [1, 1, 1]) == pytest.approx(volume)
    assert hypervolume(points[::-1], ["min"] * 3, [1, 1, 1]) == pytest.approx(volume)
