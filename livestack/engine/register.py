"""Register a frame's stars to the reference frame's stars: Stars, Stars -> Transform.

Two ways, cheapest first:

1. predicted: map the frame's stars through a guess (usually the previous frame's transform), pair each with the
   mutually nearest reference star, refit and re-pair. Costs about a millisecond; used while the mount tracks.
2. pattern: triangle asterisms (astroalign's idea, re-written): each of the brightest stars and its nearest
   neighbours form triangles whose sorted side ratios do not change under shift, rotation (any angle, a
   meridian flip included) and scale. Triangles with close invariants give 3 ordered point pairs, hence a
   similarity hypothesis; the hypothesis that brings most stars onto reference stars wins (RANSAC, seeded by
   the caller's ``rng``) and is refined by least squares on all its star pairs.

Star lists are (N, 2) float arrays (x = column, y = row), brightest first. Nothing here modifies its inputs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from livestack.engine import geometry as geo
from livestack.engine.neighbours import Grid, k_nearest, poisson_tail

MODELS = ("auto", "affine", "similarity")


class RegistrationError(Exception):
    """The frame could not be registered; the message is a short reason with numbers."""


@dataclass(frozen=True, slots=True)
class RegisterParams:
    model: str = "auto"              # "auto" | "affine" | "similarity": the model of the final least-squares fit;
                                     # auto: a similarity unless the affine terms are significant (F-test, 1 %)
    pattern_stars: int = 40          # brightest stars of each list used to build asterisms
    neighbours: int = 5              # each star + this many nearest neighbours form triangles (astroalign: 5)
    invariant_tol: float = 0.02      # match radius in triangle-invariant space (side ratios, dimensionless)
    match_tol_px: float = 2.5        # a star pair within this distance after the transform is an inlier
    min_matches: int = 8             # fewer inlier pairs => RegistrationError
    predict_tol_px: float = 4.0      # search radius around the predicted positions in the fast path
    ransac_iters: int = 300          # most triangle hypotheses scored
    max_scale_change: float = 0.1    # |scale - 1| above this => hypothesis rejected (same optics)

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"register.model = {self.model!r}: must be one of {', '.join(MODELS)}")
        ints = (("pattern_stars", 3, 10_000), ("neighbours", 2, 50), ("min_matches", 3, 100_000),
                ("ransac_iters", 1, 1_000_000))
        for name, lo, hi in ints:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not lo <= v <= hi:
                raise ValueError(f"register.{name} = {v!r}: must be an integer in [{lo}, {hi}]")
        floats = (("invariant_tol", 0.0, 0.5), ("match_tol_px", 0.0, 100.0), ("predict_tol_px", 0.0, 1000.0),
                  ("max_scale_change", 0.0, 0.9))
        for name, lo, hi in floats:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not lo < v <= hi:
                raise ValueError(f"register.{name} = {v!r}: must be a number in ({lo}, {hi}]")


@dataclass(frozen=True, slots=True)
class Registration:
    matrix: np.ndarray   # (2, 3) float64, src -> ref pixel coordinates
    matches: int         # inlier pairs used in the final fit
    rms_px: float        # RMS residual of those pairs after the fit, px
    method: str          # "predicted" | "pattern"
    model: str           # "similarity" | "affine": what the final fit was (model = "auto" chooses per frame)
    src_idx: np.ndarray  # (matches,) int64 indices into src of the inlier pairs
    ref_idx: np.ndarray  # (matches,) int64 indices into ref, same order


def register(src_xy, ref_xy, p: RegisterParams, *, rng: np.random.Generator, predicted: np.ndarray | None = None,
             src_flux=None, ref_flux=None) -> Registration:
    """Find the transform mapping the frame's stars ``src_xy`` (N, 2) onto the reference stars ``ref_xy`` (M, 2).

    Both lists are float px, brightest first. ``predicted`` is an optional (2, 3) guess, or a list of guesses
    tried in order (the frame's own WCS, the previous frame's transform); if one pairs at least
    ``p.min_matches`` stars with a small residual the pattern match is skipped (``method == "predicted"``).
    ``src_flux``/``ref_flux`` ((N,), (M,)), when both given, weight the final fits: brighter stars have better
    centroids. ``rng`` orders the RANSAC hypotheses, so a given seed gives the same result.

    Raises RegistrationError (a reason with numbers) when no transform is found with ``p.min_matches`` pairs,
    and ValueError for malformed input (wrong shapes, non-finite coordinates).
    """
    src = _points(src_xy, "src_xy")
    ref = _points(ref_xy, "ref_xy")
    w_src = _flux(src_flux, len(src), "src_flux")
    w_ref = _flux(ref_flux, len(ref), "ref_flux")
    weigh = w_src is not None and w_ref is not None
    if len(src) < p.min_matches or len(ref) < p.min_matches:
        raise RegistrationError(f"only {len(src)} frame stars and {len(ref)} reference stars "
                                f"(need {p.min_matches} in each)")
    ref_tree = Grid(ref, p.match_tol_px)

    def weights(si, ri):
        # Clipped, so that a few saturated stars (poor centroids, huge flux) cannot dominate the fit.
        return np.minimum(w_src[si], w_ref[ri]) if weigh else None

    guesses = [] if predicted is None else [predicted] if np.ndim(predicted) == 2 else list(predicted)
    for guess in guesses:
        m0 = geo._check(guess)
        found = _refine(src, ref, ref_tree, m0, p, p.predict_tol_px, weights)
        if not isinstance(found, _Miss):
            m, si, ri, rms, model = found
            # A wrong guess can still pair a few stars by chance; those pairs fit badly.
            if len(si) >= p.min_matches and rms <= 0.5 * p.match_tol_px and _scale_ok(m, p):
                return Registration(m, len(si), rms, "predicted", model, si, ri)

    # A few widening passes: at ~30 % overlap the brightest stars of the two lists share too few triangles,
    # so when the first pass fails it is repeated with twice as many stars (a failure costs 3 passes).
    # The reason given for a failure is that of the hypothesis that came closest (most star pairs left) over
    # all passes: what refinement found, never a hypothesis's raw score, which counts every frame star near
    # some reference star (a failed frame once read "only 284 star pairs matched (need 8)").
    n_pattern, tested = p.pattern_stars, 0
    closest, reason = -1, ""
    while True:
        hyps, n_scored, why = _hypotheses(src[:n_pattern], ref[:n_pattern], src, ref_tree, p, rng)
        tested += n_scored
        best, miss = None, None
        for hyp in hyps:
            found = _refine(src, ref, ref_tree, hyp, p, p.match_tol_px, weights)
            if isinstance(found, _Miss):
                if miss is None or found.pairs > miss.pairs:
                    miss = found
            elif best is None or (len(found[1]), -found[3]) > (len(best[1]), -best[3]):
                best = found
        if best is not None:
            m, si, ri, rms, model = best
            why = _implausible(m, si, rms, src, ref, p, tested)
            if not why:
                return Registration(m, len(si), rms, "pattern", model, si, ri)
            pairs = len(si)
        elif miss is not None:
            why = f"no hypothesis held: the best of {len(hyps)} {miss.what}"
            pairs = miss.pairs
        else:
            pairs = -1
        if pairs >= closest:
            closest, reason = pairs, why
        # Two doublings at most: beyond ~4 × pattern_stars the triangles multiply (a failure at 300 stars
        # would cost ~0.1 s) and a field that still does not match is better reported as failed.
        if n_pattern >= max(len(src), len(ref)) or n_pattern >= 4 * p.pattern_stars:
            break
        n_pattern *= 2
    raise RegistrationError(f"{reason}; {tested} triangle matches tried")


def _implausible(m, si, rms, src, ref, p: RegisterParams, tested: int) -> str:
    """Why a refined pattern match is not believable, or "" when it is."""
    n = len(si)
    if n < p.min_matches:
        return f"only {n} star pairs matched (need {p.min_matches})"
    if not _scale_ok(m, p):
        _, _, _, scale = geo.decompose(m)
        return f"fitted scale {scale:.3f} is outside 1 ± {p.max_scale_change} with {n} star pairs"
    if rms > 0.5 * p.match_tol_px:
        return f"{n} star pairs matched with rms {rms:.2f} px > {0.5 * p.match_tol_px:.2f} px (half match_tol_px)"
    # In dense fields a wrong transform still drops some stars within match_tol_px of a reference star:
    # lam = stars landing on the reference area × chance that one lands within the tolerance of a ref star.
    # Require a count that chance reaches with probability < 1e-6 over all hypotheses tried; refinement can
    # collect a few more chance pairs, hence the extra margin of 2. (200 vs 200 stars on 800 × 600: ~16.)
    lo, hi = ref.min(axis=0), ref.max(axis=0)
    area = max(float(np.prod(hi - lo)), np.pi * p.match_tol_px ** 2 * len(ref))
    mapped = geo.apply(m, src)
    n_in = int(np.all((mapped >= lo) & (mapped <= hi), axis=1).sum())
    lam = n_in * min(1.0, len(ref) * np.pi * p.match_tol_px ** 2 / area)
    need = int(np.searchsorted(-poisson_tail(np.arange(400), lam), -1e-6 / max(tested, 1))) + 1 + 2
    if n < need:
        return (f"only {n} star pairs matched where {n_in} × {len(ref)} stars pair ~{lam:.1f} times by chance "
                f"(need {need})")
    return ""


def _points(xy, name: str) -> np.ndarray:
    a = np.asarray(xy, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2), got {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} has non-finite coordinates")
    return a


def _flux(flux, n: int, name: str) -> np.ndarray | None:
    if flux is None:
        return None
    f = np.asarray(flux, dtype=np.float64)
    if f.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},), got {f.shape}")
    good = np.isfinite(f) & (f > 0)
    if not good.any():
        return np.ones(n)
    rel = np.where(good, f, 0.0) / np.median(f[good])
    # Between 1/4 and 4 × the median star: faint stars still count, saturated ones do not dominate.
    return np.clip(rel, 0.25, 4.0)


def _scale_ok(m: np.ndarray, p: RegisterParams) -> bool:
    a = m[:, :2]
    det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
    return bool(det > 0 and abs(np.sqrt(det) - 1.0) <= p.max_scale_change)


def mutual_pairs(mapped: np.ndarray, ref: np.ndarray, ref_tree: Grid, tol: float):
    """Index pairs (si, ri) where ref[ri] is the nearest reference star to mapped[si] within ``tol`` and
    mapped[si] is the nearest mapped star to ref[ri]: one-to-one, so close doubles cannot pair twice.
    ``ref_tree``: a Grid of ``ref``."""
    d, ri = ref_tree.nearest(mapped, tol)
    si = np.flatnonzero(np.isfinite(d))
    if len(si) == 0:
        return si, si.copy()
    ri = ri[si]
    # (mapped[si] lies within tol of ref[ri]: the nearest mapped star to ref[ri] does too)
    _, back = Grid(mapped, tol).nearest(ref[ri], tol)
    keep = back == si
    return si[keep], ri[keep]


@dataclass(frozen=True, slots=True)
class _Miss:
    """Why refinement gave up on a hypothesis."""
    pairs: int   # mutual star pairs left at the step that failed
    what: str    # the sentence's end: "matched 5 of 17 frame stars within 2.5 px after refit 1 (need 8)"


def _refine(src, ref, ref_tree, m0, p: RegisterParams, first_tol: float, weights):
    """Pair stars through ``m0`` within ``first_tol``, fit ``p.model``, re-pair within ``p.match_tol_px`` and
    refit (3 rounds), then drop pairs beyond 3 × rms once.

    With model = "auto" every round chooses (_fit_auto): a real affine distortion (0.5 % differential scale is
    5 px at the corner of a 4000 px frame) leaves the outer stars beyond match_tol_px of a similarity, so they
    only pair once the affine terms are in. Returns (m, si, ri, rms, model), or a _Miss saying why not."""
    m, tol = m0, first_tol
    si = ri = np.zeros(0, dtype=np.int64)
    need = max(3, p.min_matches)
    of = f"of {len(src)} frame stars"
    for k in range(3):
        si, ri = mutual_pairs(geo.apply(m, src), ref, ref_tree, tol)
        if len(si) < need:
            stage = "of the triangle hypothesis" if k == 0 else f"after refit {k}"
            return _Miss(len(si), f"matched {len(si)} {of} within {tol:g} px {stage} (need {need})")
        try:
            m, model = _fit(src[si], ref[ri], weights(si, ri), p.model)
        except ValueError as err:
            return _Miss(len(si), f"matched {len(si)} {of}, but the fit to them failed ({err})")
        tol = p.match_tol_px
    # Final pairing with the refined transform, then one sigma clip: for Gaussian centroid errors 3 × rms of
    # the 2-D distances drops 1 true pair in ~10^4, and the rare wrong pair that slipped within match_tol_px.
    si, ri = mutual_pairs(geo.apply(m, src), ref, ref_tree, p.match_tol_px)
    if len(si) < need:
        return _Miss(len(si), f"matched {len(si)} {of} within {p.match_tol_px:g} px after the last refit "
                              f"(need {need})")
    try:
        m, model = _fit(src[si], ref[ri], weights(si, ri), p.model)
        r = np.linalg.norm(geo.apply(m, src[si]) - ref[ri], axis=1)
        keep = r <= 3.0 * np.sqrt(np.mean(r * r)) + 1e-12
        if keep.sum() >= need and not keep.all():
            si, ri = si[keep], ri[keep]
            m, model = _fit(src[si], ref[ri], weights(si, ri), p.model)
    except ValueError as err:
        return _Miss(len(si), f"matched {len(si)} {of}, but the final fit to them failed ({err})")
    r = np.linalg.norm(geo.apply(m, src[si]) - ref[ri], axis=1)
    return m, si.astype(np.int64), ri.astype(np.int64), float(np.sqrt(np.mean(r * r))), model


def _fit(src: np.ndarray, dst: np.ndarray, weights, model: str) -> tuple[np.ndarray, str]:
    """The (2, 3) least-squares fit of ``model`` ("auto" | "affine" | "similarity") and the model it is."""
    if model == "affine":
        return geo.fit_affine(src, dst, weights=weights), "affine"
    if model == "similarity":
        return geo.fit_similarity(src, dst, weights=weights), "similarity"
    return _fit_auto(src, dst, weights=weights)


def _fit_auto(src: np.ndarray, dst: np.ndarray, *, weights=None) -> tuple[np.ndarray, str]:
    """A similarity, unless the affine fit's two extra terms (shear, anisotropic scale) lower the residuals
    significantly for the number of pairs: an F-test at 1 % on the (weighted) residual sums of squares.
    Returns (matrix, "similarity" | "affine").

    An F-test rather than an information criterion because it is calibrated for any number of pairs: the
    similarity's 4 parameters are nested in the affine's 6, and under Gaussian centroid noise
    ((RSS_s - RSS_a) / 2) / (RSS_a / (2n - 6)) follows F(2, 2n - 6) whatever the noise level, which need not
    be known (with the noise known, BIC's 2 ln(2n) penalty lets 3 % of 16-pair similarities through as affine,
    AIC's 14 %). With few stars — a narrowband frame has 12–20 — an affine fit follows the centroid noise: on a
    simulated 7-filter night its RMS error against the truth was 0.048 px (0.08 px on single narrowband
    frames), a similarity's 0.037.

    The 1 %, from 400 draws of points on 2000 × 1500 px with 0.1 px noise per axis: with a similarity for
    truth the affine was chosen 1.0 % of the time with 16 pairs (0.7 % with 100), and costs those frames
    little (RMS error over the frame 0.071 px against the similarity's 0.053 with 16 pairs); a differential
    scale of ±1e-4 (0.1 px at the edges) was found 29 % of the time with 16 pairs and always with 100, ±2e-4
    96 % of the time with 16. In between (±1e-4, 16 pairs) the similarity kept is the worse fit (0.095 px
    against 0.070): the price of not following noise.
    """
    ms = geo.fit_similarity(src, dst, weights=weights)
    n = len(src)
    dof = 2 * n - 6
    if dof < 4:
        return ms, "similarity"
    try:
        ma = geo.fit_affine(src, dst, weights=weights)
    except ValueError:      # pairs on one line (a strip of sky, a star trail of a field): no affine to test
        return ms, "similarity"
    w = np.ones(n) if weights is None else np.asarray(weights, np.float64)
    rss_s = float(np.sum(w * np.sum((geo.apply(ms, src) - dst) ** 2, axis=1)))
    rss_a = float(np.sum(w * np.sum((geo.apply(ma, src) - dst) ** 2, axis=1)))
    if rss_a <= 0:
        return (ma, "affine") if rss_s > 0 else (ms, "similarity")
    stat = ((rss_s - rss_a) / 2.0) / (rss_a / dof)
    # F(2, d) has the closed form P(F > x) = (1 + 2x/d)^(-d/2): its 99th percentile without scipy.stats
    # (whose import costs 0.5 s at the first registration). d = 26 (16 pairs): 5.53, as scipy's f.isf.
    critical = dof / 2.0 * (0.01 ** (-2.0 / dof) - 1.0)
    return (ma, "affine") if stat > critical else (ms, "similarity")


def _triangles(xy: np.ndarray, neighbours: int) -> tuple[np.ndarray, np.ndarray]:
    """Triangles of each star with its ``neighbours`` nearest neighbours.

    Returns (tri, inv): tri (T, 3) int vertex indices ordered by the length of the opposite side, longest
    first, so two matching triangles give 3 ordered point pairs; inv (T, 2) invariants (L2 / L1, L1 / L0) of
    the sides sorted L0 >= L1 >= L2, both in (0, 1] (bounded, unlike astroalign's L0/L1, L1/L2, so one
    tolerance means the same everywhere). Triangles with a zero side (coincident stars) are dropped.
    """
    n = len(xy)
    k = min(neighbours + 1, n)
    nn = k_nearest(xy, k)
    combos = np.array(list(itertools.combinations(range(k), 3)), dtype=np.int64)
    tri = np.sort(nn[:, combos].reshape(-1, 3), axis=1)
    tri = np.unique(tri, axis=0)
    p0, p1, p2 = xy[tri[:, 0]], xy[tri[:, 1]], xy[tri[:, 2]]
    opp = np.column_stack([np.linalg.norm(p1 - p2, axis=1), np.linalg.norm(p0 - p2, axis=1),
                           np.linalg.norm(p0 - p1, axis=1)])
    order = np.argsort(-opp, axis=1, kind="stable")
    tri = np.take_along_axis(tri, order, axis=1)
    sides = np.take_along_axis(opp, order, axis=1)
    good = sides[:, 2] > 0
    tri, sides = tri[good], sides[good]
    inv = np.column_stack([sides[:, 2] / sides[:, 1], sides[:, 1] / sides[:, 0]])
    return tri, inv


def _orientation(xy: np.ndarray, tri: np.ndarray) -> np.ndarray:
    a, b, c = xy[tri[:, 0]], xy[tri[:, 1]], xy[tri[:, 2]]
    u, v = b - a, c - a
    return np.sign(u[:, 0] * v[:, 1] - u[:, 1] * v[:, 0])


def _hypotheses(ps, pr, src, ref_tree, p: RegisterParams, rng: np.random.Generator, keep: int = 3):
    """Similarities from matched triangles of the pattern stars ``ps``/``pr`` that put most of ``src`` within
    ``p.match_tol_px`` of a ref star (the ``keep`` best, best first; refinement picks among them because a
    hypothesis from a small, noisy triangle can be right yet score low far from the triangle).

    Returns (matrices, hypotheses scored, reason when there are none).
    """
    if len(ps) < 3 or len(pr) < 3:
        return [], 0, f"too few stars for triangles ({len(ps)} frame, {len(pr)} reference)"
    tri_s, inv_s = _triangles(ps, p.neighbours)
    tri_r, inv_r = _triangles(pr, p.neighbours)
    if len(tri_s) == 0 or len(tri_r) == 0:
        return [], 0, "no usable star triangles (coincident stars)"
    pi, pj = Grid(inv_r, p.invariant_tol).pairs(inv_s, p.invariant_tol)
    if len(pi) == 0:
        return [], 0, (f"no matching star triangles among the {len(ps)} frame and {len(pr)} reference "
                       f"brightest stars")
    ts, tr = tri_s[pi], tri_r[pj]
    # Side ratios cannot tell a triangle from its mirror image, but a rotation keeps the winding: dropping
    # mirrored matches halves the chance pairs for free and guarantees no reflection.
    same = _orientation(ps, ts) == _orientation(pr, tr)
    ts, tr = ts[same], tr[same]

    # Similarity of every matched triangle pair at once (the complex-number form of geometry.fit_similarity).
    zs = ps[ts, 0] + 1j * ps[ts, 1]
    zr = pr[tr, 0] + 1j * pr[tr, 1]
    ms, mr = zs.mean(axis=1, keepdims=True), zr.mean(axis=1, keepdims=True)
    cs, cr = zs - ms, zr - mr
    a = (np.conj(cs) * cr).sum(axis=1) / (np.abs(cs) ** 2).sum(axis=1)
    t = mr[:, 0] - a * ms[:, 0]
    resid = np.sqrt((np.abs(cr - a[:, None] * cs) ** 2).mean(axis=1))
    ok = (np.abs(np.abs(a) - 1.0) <= p.max_scale_change) & (resid <= p.match_tol_px)
    matched = len(a)
    a, t = a[ok], t[ok]
    if len(a) == 0:
        return [], 0, (f"none of {matched} matching star triangles has a scale within "
                       f"1 ± {p.max_scale_change} and a residual within {p.match_tol_px} px")

    order = rng.permutation(len(a))[:p.ransac_iters]
    a, t = a[order], t[order]
    # Score in batches, all src stars per hypothesis in one KD-tree query. Stop early once a hypothesis is far
    # beyond chance (4 × min_matches and half the possible pairs); refinement re-pairs from it anyway.
    z = src[:, 0] + 1j * src[:, 1]
    counts = np.zeros(len(a), dtype=np.int64)
    dsums = np.zeros(len(a))
    batch = 64
    scored = 0
    for b0 in range(0, len(a), batch):
        ab, tb = a[b0:b0 + batch], t[b0:b0 + batch]
        w = ab[:, None] * z[None, :] + tb[:, None]                      # (B, N) mapped src
        d, _ = ref_tree.nearest(np.column_stack([w.real.ravel(), w.imag.ravel()]), p.match_tol_px)
        d = d.reshape(len(ab), len(z))
        hit = np.isfinite(d)
        counts[b0:b0 + len(ab)] = hit.sum(axis=1)
        dsums[b0:b0 + len(ab)] = np.where(hit, d, 0.0).sum(axis=1)
        scored = b0 + len(ab)
        top = int(counts[:scored].max())
        if top >= 4 * p.min_matches and top >= 0.5 * min(len(src), ref_tree.n):
            break
    # Most inliers; among equals the tighter fit; among equals the earlier in rng order.
    best = np.lexsort((np.arange(scored), dsums[:scored], -counts[:scored]))[:keep]
    mats = [np.array([[a[j].real, -a[j].imag, t[j].real], [a[j].imag, a[j].real, t[j].imag]]) for j in best]
    return mats, scored, ""
