"""The registration's neighbour searches (engine/neighbours.py) give what scipy's cKDTree and pdtrc gave, on
random fields of every density and on the cases a grid gets wrong first: points on cell edges, queries far
outside, coincident points, a radius wider than a cell."""
import numpy as np
import pytest
from scipy.spatial import cKDTree
from scipy.special import pdtrc

from livestack.engine.neighbours import Grid, k_nearest, poisson_tail


@pytest.mark.parametrize("seed", range(40))
def test_nearest_and_pairs_are_ckdtrees(seed):
    rng = np.random.default_rng(seed)
    m, n = int(rng.integers(1, 500)), int(rng.integers(1, 3000))
    scale = [1.0, 100.0, 6000.0][seed % 3]
    ref = rng.uniform(-0.1, 1, (m, 2)) * scale
    q = rng.uniform(-0.3, 1.3, (n, 2)) * scale
    k = min(n, m)
    q[:k] = ref[:k] + rng.normal(0, 0.002 * scale, (k, 2))       # most with a neighbour
    if seed % 4 == 0:
        ref[: m // 2] = np.round(ref[: m // 2])                    # on the cells' edges
        ref[m // 2:] = ref[0]                                      # coincident
    r = [0.02, 0.5, 2.5][seed % 3] * scale / 100 if scale > 1 else 0.02
    grid = Grid(ref, r if seed % 2 else r / 3)                     # cells narrower than the radius too
    d, i = grid.nearest(q, r)
    d2, i2 = cKDTree(ref).query(q, k=1, distance_upper_bound=r)
    found = np.isfinite(d2)
    assert np.array_equal(np.isfinite(d), found)
    assert np.array_equal(i[~found], i2[~found]) and (i[~found] == m).all()
    # among coincident points any is the nearest: the same distance, and the first of them here
    np.testing.assert_allclose(d[found], d2[found], rtol=0, atol=1e-12)
    pi, pj = grid.pairs(q, r)
    sp = cKDTree(q).sparse_distance_matrix(cKDTree(ref), r, output_type="ndarray")
    assert sorted(zip(sp["i"].tolist(), sp["j"].tolist())) == list(zip(pi.tolist(), pj.tolist()))


def test_empty_and_far_away():
    g = Grid(np.zeros((0, 2)), 1.0)
    d, i = g.nearest(np.array([[1.0, 2.0]]), 5.0)
    assert np.isinf(d).all() and (i == 0).all()
    g = Grid(np.array([[10.0, 10.0]]), 1.0)
    d, i = g.nearest(np.array([[1e9, -1e9], [10.5, 10.0]]), 1.0)
    assert np.isinf(d[0]) and i[0] == 1 and d[1] == 0.5 and i[1] == 0
    assert [len(a) for a in g.pairs(np.array([[1e9, 0.0]]), 1.0)] == [0, 0]


@pytest.mark.parametrize("seed", range(10))
def test_k_nearest_is_ckdtrees(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 250))
    xy = rng.uniform(0, 500, (n, 2))
    k = int(rng.integers(1, 8))
    _, want = cKDTree(xy).query(xy, k=min(k, n))
    assert np.array_equal(k_nearest(xy, k), want.reshape(n, -1))


@pytest.mark.parametrize("lam", [0.0, 1e-3, 0.5, 3.0, 16.0, 120.0, 399.0, 800.0])
def test_poisson_tail_is_pdtrc(lam):
    k = np.arange(400)
    np.testing.assert_allclose(poisson_tail(k, lam), pdtrc(k, lam), rtol=1e-9, atol=1e-300)


@pytest.mark.parametrize("far", [[1e12, 0.0], [1e9, 5.0], [0.0, 1e7], [1e7, 4000.0], [6000.0, 4000.0], [3.0, 0.0]])
def test_the_cell_table_stays_within_its_cap_for_any_extent(far):
    # A line of points (all on one row, or one mapped star at 1e12 px beside the rest) once made a table of
    # 1.5e8 cells (3.5 GB) while a square field of the same width made 65536: the cap was sqrt(area / cells).
    pts = np.array([[0.0, 0.0], far, [far[0] / 2, far[1] / 2]])
    g = Grid(pts, 3.0)
    assert int(np.prod(g.shape)) <= Grid.MAX_CELLS
    assert len(g.start) <= Grid.MAX_CELLS + 1
    d, i = g.nearest(pts + 0.5, 1.0)
    assert np.allclose(d, np.hypot(0.5, 0.5)) and (i == np.arange(3)).all()


def test_k_nearest_of_many_points_in_bounded_memory_and_ties_by_index():
    """`pattern_stars` may be up to 10 000 and is doubled twice on a frame that does not match: the whole
    (N, N) table and its lexsort took 1.5 GB and 7.7 s at N = 8000 (cKDTree: 9 ms).  Ties — a lattice, coincident
    points — are ordered by index, as the whole table's lexsort ordered them."""
    import tracemalloc

    rng = np.random.default_rng(3)
    xy = rng.uniform(0, 6000, (8000, 2))
    tracemalloc.start()
    try:
        got = k_nearest(xy, 6)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100e6, peak
    _, want = cKDTree(xy).query(xy, k=6)
    assert np.array_equal(got, want)
    lattice = np.array([(x, y) for x in range(12) for y in range(9)], np.float64)
    lattice = np.concatenate([lattice, lattice[::7]])               # coincident points too
    d2 = ((lattice[:, None] - lattice[None]) ** 2).sum(axis=2)
    np.fill_diagonal(d2, -1.0)
    n = len(lattice)
    want = np.lexsort((np.broadcast_to(np.arange(n), (n, n)), d2), axis=1)[:, :7]
    assert np.array_equal(k_nearest(lattice, 7), want)


def test_a_point_at_exactly_the_radius_is_as_ckdtree_has_it():
    """cKDTree's query leaves out a point at exactly distance_upper_bound (and a coincident one with a radius
    of 0); its sparse_distance_matrix keeps one at max_distance."""
    ref, q = np.array([[0.0, 0.0]]), np.array([[3.0, 4.0], [0.0, 0.0]])
    grid = Grid(ref, 5.0)
    d, i = grid.nearest(q, 5.0)
    d2, i2 = cKDTree(ref).query(q, k=1, distance_upper_bound=5.0)
    assert i.tolist() == i2.tolist() == [1, 0]
    assert grid.nearest(ref, 0.0)[1].tolist() == cKDTree(ref).query(ref, k=1, distance_upper_bound=0.0)[1].tolist()
    assert [a.tolist() for a in grid.pairs(q[:1], 5.0)] == [[0], [0]]
