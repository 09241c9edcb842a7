"""Pareto ranking of trials measured by several metrics: non-dominated fronts, crowding distances, an order
best first, and the hypervolume of a front.

Numpy on purpose: the scheduler, the leaderboard and the report all rank trials the same way, so this sits
just above the metric catalogue and imports nothing else of ours. Each function takes the points in the metrics'
own units with one mode (a direction's name: "min" or "max") per column, and turns them into minimisation itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aesearch.metrics import DIRECTIONS


def to_minimise(points, modes: Sequence[str]) -> np.ndarray:
    """The points as a float (n, m) array with the "max" columns negated, so that smaller is better everywhere."""
    modes = list(modes)
    if not modes or any(mode not in DIRECTIONS for mode in modes):
        raise ValueError(f"modes must be a non-empty sequence of {' or '.join(DIRECTIONS)}, got {modes!r}")
    points = np.array(points, dtype=float)
    if points.size == 0:
        points = points.reshape(0, len(modes))
    if points.ndim != 2 or points.shape[1] != len(modes):
        raise ValueError(f"points must be an (n, {len(modes)}) array for {len(modes)} modes, got shape {points.shape}")
    signs = np.array([DIRECTIONS[mode].sign for mode in modes])
    return points * signs


def _ranked(points: np.ndarray) -> np.ndarray:
    """Rows that take part in the ranking: a NaN metric cannot be compared with anything."""
    return ~np.isnan(points).any(axis=1)


def nondominated_ranks(points, modes: Sequence[str]) -> np.ndarray:
    """Front number of each point: 1 for the Pareto front, 2 for the front once the first is removed, ...; 0 for
    rows with a NaN, which are not ranked and dominate nothing. Equal points share a front (neither dominates).

    Fast non-dominated sorting (Deb et al. 2002), with the dominance matrix built at once by numpy.
    """
    points = to_minimise(points, modes)
    ranks = np.zeros(len(points), dtype=int)
    rows = np.flatnonzero(_ranked(points))
    valid = points[rows]
    no_worse = (valid[:, None, :] <= valid[None, :, :]).all(axis=2)
    better_somewhere = (valid[:, None, :] < valid[None, :, :]).any(axis=2)
    dominates = no_worse & better_somewhere  # dominates[i, j]: point i dominates point j
    dominated_by = dominates.sum(axis=0)  # how many not yet ranked points dominate each point
    unranked = np.ones(len(rows), dtype=bool)
    front_number = 1
    while unranked.any():
        front = unranked & (dominated_by == 0)
        ranks[rows[front]] = front_number
        dominated_by -= dominates[front].sum(axis=0)
        unranked &= ~front
        front_number += 1
    return ranks


def crowding_distances(points, modes: Sequence[str], ranks=None) -> np.ndarray:
    """NSGA-II crowding distance of each point within its own front: the sum over metrics of the gap between its
    two neighbours, relative to the front's range. A point at a front's minimum or maximum of some metric (all of
    a front of one or two points) gets inf, so the front's ends are kept. Rows not ranked (NaN) get 0.

    Every point that holds an extreme value gets inf, not only the first in sorted order, so that equal points
    are treated alike and a single metric reduces to the plain order (ties then fall back to the index).
    """
    points = to_minimise(points, modes)
    ranks = nondominated_ranks(points, ["min"] * points.shape[1]) if ranks is None else np.asarray(ranks)
    distances = np.zeros(len(points))
    for front_number in np.unique(ranks[ranks > 0]):
        members = np.flatnonzero(ranks == front_number)
        front = points[members]
        distance = np.zeros(len(members))
        for column in front.T:
            low, high = column.min(), column.max()
            order = np.argsort(column, kind="stable")
            ordered = column[order]
            span = high - low
            if len(members) > 2 and 0 < span < np.inf:
                distance[order[1:-1]] += (ordered[2:] - ordered[:-2]) / span
            distance[(column == low) | (column == high)] = np.inf
        distances[members] = distance
    return distances


def pareto_order(points, modes: Sequence[str]) -> np.ndarray:
    """Indices of the points best first: by front, then by crowding distance (more isolated first, as NSGA-II
    keeps them), then by index; rows with a NaN last. With one metric this is a stable sort by value."""
    ranks = nondominated_ranks(points, modes)
    crowding = crowding_distances(points, modes, ranks)
    front_key = np.where(ranks > 0, ranks, len(ranks) + 1)
    return np.lexsort((np.arange(len(ranks)), -crowding, front_key))


def hypervolume(points, modes: Sequence[str], reference) -> float:
    """Volume of the region the points dominate, bounded by the reference point (given in the metrics' own
    units). Points not strictly better than the reference in every metric add nothing; NaN rows are ignored.

    Exact, by slicing along the last metric (HSO) down to a sweep in two dimensions: fronts here have at most a
    few hundred points and a handful of metrics.
    """
    points = to_minimise(points, modes)
    reference = to_minimise([reference], modes)[0]
    if np.isnan(reference).any():
        raise ValueError(f"the reference point has a NaN: {reference!r}")
    inside = points[_ranked(points) & (points < reference).all(axis=1)]
    return float(_dominated_volume(inside, reference))


def _dominated_volume(points: np.ndarray, reference: np.ndarray) -> float:
    """Hypervolume of points that are all strictly better than the reference (minimisation)."""
    if len(points) == 0:
        return 0.0
    if points.shape[1] == 1:
        return float(reference[0] - points[:, 0].min())
    if points.shape[1] == 2:  # sweep along the first metric; each point adds the strip below the best so far
        volume, best_second = 0.0, reference[1]
        for first, second in points[np.lexsort((points[:, 1], points[:, 0]))]:
            if second < best_second:
                volume += (reference[0] - first) * (best_second - second)
                best_second = second
        return volume
    ordered = points[np.argsort(points[:, -1], kind="stable")]
    tops = np.append(ordered[1:, -1], reference[-1])  # each slice runs from one point's last metric to the next
    volume = 0.0
    for count, (bottom, top) in enumerate(zip(ordered[:, -1], tops, strict=True), start=1):
        if top > bottom:
            volume += (top - bottom) * _dominated_volume(ordered[:count, :-1], reference[:-1])
    return volume
