"""Nearest neighbours among a few thousand 2-D points, exactly, for registration: a grid of square cells.

Registration asks only bounded questions — the nearest reference star within a few pixels of each of tens of
thousands of mapped stars (every hypothesis scored), every pair of triangle invariants within a tolerance, the
few nearest stars of each of a few hundred — and scipy's cKDTree answered them.  But importing scipy.spatial
(and scipy.special, for one Poisson tail) cost 0.28–0.34 s of CPU and 34 MB of memory in every process that
registers a frame — most of it scipy's array-API layer importing numpy.testing and numpy.f2py —, a tenth of a
`livestack stack` of eight 24 MP frames.  A grid of cells as wide as the search radius answers a bounded query
exactly by looking at the few cells around each point (a star field holds well under one point per cell), in a
few numpy passes.
"""
from __future__ import annotations

import math

import numpy as np


class Grid:
    """Points (N, 2) binned in square cells at least ``cell`` wide: ``nearest`` and ``pairs`` within any radius.
    The cells are a table (a start per cell, the points sorted by cell): a query's cell is an index, not a
    search.  At most MAX_CELLS cells — wider cells beyond, so that a field of 6000 × 4000 px costs half a MB (cells of 19 px there: a star field still holds ~0.03 stars a cell)."""

    MAX_CELLS = 1 << 16

    def __init__(self, points: np.ndarray, cell: float):
        pts = np.asarray(points, np.float64).reshape(-1, 2)
        if not cell > 0 or not math.isfinite(cell):
            raise ValueError(f"cell size must be a positive number, got {cell}")
        self.points, self.n = pts, len(pts)
        lo = pts.min(axis=0) if self.n else np.zeros(2)
        extent = (pts.max(axis=0) - lo) if self.n else np.zeros(2)
        # The smallest width s with (e0 / s + 1)(e1 / s + 1) ≤ MAX_CELLS (a root of the quadratic in s): not
        # sqrt(e0 · e1 / MAX_CELLS), which leaves a line of points — all on one row, or one mapped star at 1e12 px
        # beside the others — 1.5e8 cells (3.5 GB) long.
        e0, e1, m = float(extent[0]), float(extent[1]), self.MAX_CELLS - 1
        wide = ((e0 + e1) + math.sqrt((e0 + e1) ** 2 + 4.0 * m * e0 * e1)) / (2.0 * m)
        self.cell = max(float(cell), wide * (1.0 + 1e-9))     # (a margin for the floor's rounding)
        self.lo = lo
        self.shape = (np.floor(extent / self.cell).astype(np.int64) + 1) if self.n else np.zeros(2, np.int64)
        ij = np.floor((pts - lo) / self.cell).astype(np.int64)
        keys = ij[:, 0] * self.shape[1] + ij[:, 1]
        self.order = np.argsort(keys, kind="stable")          # points of a cell: in their own order
        counts = np.bincount(keys, minlength=int(np.prod(self.shape)))
        self.start = np.concatenate([[0], np.cumsum(counts)])

    def _cells(self, q: np.ndarray, r: float):
        """For each cell offset within ``r``: (queries whose neighbour cell holds points, the first of those
        points in self.order, their number)."""
        reach = int(math.ceil(r / self.cell))
        ij = np.floor((q - self.lo) / self.cell).astype(np.int64)
        for dx in range(-reach, reach + 1):
            for dy in range(-reach, reach + 1):
                cx, cy = ij[:, 0] + dx, ij[:, 1] + dy
                inside = np.flatnonzero((cx >= 0) & (cx < self.shape[0]) & (cy >= 0) & (cy < self.shape[1]))
                if not len(inside):
                    continue
                key = cx[inside] * self.shape[1] + cy[inside]
                first = self.start[key]
                count = self.start[key + 1] - first
                has = count > 0
                if has.any():
                    yield inside[has], first[has], count[has]

    def nearest(self, q: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
        """(distance, index) of the nearest point closer than ``r`` to each point of ``q`` (M, 2); (inf, n) where
        there is none — as cKDTree.query(q, k=1, distance_upper_bound=r), which leaves out a point at exactly
        ``r``.  Of points at one distance, the first."""
        q = np.asarray(q, np.float64).reshape(-1, 2)
        dist = np.full(len(q), np.inf)
        idx = np.full(len(q), self.n, np.int64)
        if self.n == 0 or len(q) == 0:
            return dist, idx
        for qi, first, count in self._cells(q, r):
            for t in range(int(count.max())):          # (a star field: one point a cell, rarely two)
                more = count > t
                qt = qi[more]
                pt = self.order[first[more] + t]
                d = np.hypot(q[qt, 0] - self.points[pt, 0], q[qt, 1] - self.points[pt, 1])
                better = (d < r) & ((d < dist[qt]) | ((d == dist[qt]) & (pt < idx[qt])))
                dist[qt[better]] = d[better]
                idx[qt[better]] = pt[better]
        return dist, idx

    def pairs(self, q: np.ndarray, r: float) -> tuple[np.ndarray, np.ndarray]:
        """(i, j): every point q[i] within ``r`` of point j (at ``r`` included, as cKDTree's
        sparse_distance_matrix), sorted by i then j."""
        q = np.asarray(q, np.float64).reshape(-1, 2)
        qs, ps = [], []
        if self.n and len(q):
            for qi, first, count in self._cells(q, r):
                rep = np.repeat(qi, count)
                # first, first + 1, … first + count − 1 of each query, flat
                pt = self.order[np.repeat(first - np.cumsum(count) + count, count) + np.arange(count.sum())]
                ok = np.hypot(q[rep, 0] - self.points[pt, 0], q[rep, 1] - self.points[pt, 1]) <= r
                qs.append(rep[ok])
                ps.append(pt[ok])
        if not qs:
            empty = np.zeros(0, np.int64)
            return empty, empty
        qi, pi = np.concatenate(qs), np.concatenate(ps)
        order = np.lexsort((pi, qi))
        return qi[order], pi[order]


def k_nearest(points: np.ndarray, k: int) -> np.ndarray:
    """(N, k) indices of each point's k nearest points, itself first (distance 0), by distance then index —
    as cKDTree(points).query(points, k).  All distances, a block of rows at a time (~1 M of them: 8 MB), and
    only the few within each row's k-th smallest sorted: the whole (N, N) table and its lexsort took
    1.5 GB and 7.7 s for the 8000 stars of `pattern_stars = 2000` doubled twice, where cKDTree took 9 ms."""
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    n = len(pts)
    k = min(k, n)
    out = np.zeros((n, k), np.int64)
    if k == 0:
        return out
    rows = max(1, (1 << 20) // n)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        d2 = (pts[r0:r1, None, 0] - pts[None, :, 0]) ** 2 + (pts[r0:r1, None, 1] - pts[None, :, 1]) ** 2
        d2[np.arange(r1 - r0), np.arange(r0, r1)] = -1.0        # itself first, even beside a coincident point
        kth = np.partition(d2, k - 1, axis=1)[:, k - 1:k]
        r, c = np.nonzero(d2 <= kth)                # ≥ k a row (more on a tie at the k-th): row, then index order
        order = np.lexsort((c, d2[r, c], r))        # by row, distance, index
        r, c = r[order], c[order]
        first = np.searchsorted(r, np.arange(r1 - r0))
        take = first[:, None] + np.arange(k)[None, :]
        out[r0:r1] = c[take]
    return out


def poisson_tail(k: np.ndarray, lam: float) -> np.ndarray:
    """P(X > k) for X ~ Poisson(``lam``), k = 0, 1, … (scipy.special.pdtrc): the pmf summed from the far tail
    inwards, so that the small probabilities registration compares (1e-6 / hypotheses) keep their precision."""
    k = np.asarray(k, np.int64)
    top = int(max(k.max(initial=0) + 1, lam + 40.0 * math.sqrt(lam) + 50.0))
    i = np.arange(top + 1, dtype=np.float64)
    if lam <= 0:
        pmf = (i == 0).astype(np.float64)
    else:
        logfact = np.concatenate([[0.0], np.cumsum(np.log(i[1:]))])
        pmf = np.exp(i * math.log(lam) - lam - logfact)
    tail = np.cumsum(pmf[::-1])[::-1]            # tail[j] = P(X ≥ j)
    return np.where(k + 1 <= top, tail[np.minimum(k + 1, top)], 0.0)
