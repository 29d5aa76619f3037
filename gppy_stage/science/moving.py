"""Moving objects: straight tracks through transient candidates, from per-frame source positions.

``link_tracks`` looks, for each candidate of a stack, for detections in the single frames of the
night (this stack's and the night's other stacks' of the field, every filter) that lie on one
straight track at constant speed passing the candidate while its stack was exposed. Only sources
that are not static take part (``static_sources``: a source found at the same place in more than
half of the other frames is a star, a galaxy or a transient that stays put), so a whole-frame
catalogue serves as it is. A track is a hypothesis drawn from a pair of detections (one in a frame
of the candidate's stack), scored by how many frames hold a detection within ``tol`` of where it
predicts; the best is refitted by least squares on its detections. A candidate moves when its
track holds at least ``min_points`` detections and carries it further than ``min_motion`` over
their time span: a slow mover that stays put within one stack still moves between stacks an hour
or two apart.

Everything is in one plane (the candidates' pixel grid) and one time unit; the caller turns the
velocity into a rate and a position angle on the sky (``rate_and_pa``).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.spatial import cKDTree


def static_sources(frames: list[tuple[np.ndarray, np.ndarray]], tol: float) -> list[np.ndarray]:
    """Per frame: True where a source has a counterpart within ``tol`` in more than half of the
    other frames (all of them when there are two or three frames)."""
    trees = [cKDTree(np.c_[x, y]) if len(x) else None for x, y in frames]
    out = []
    for k, (x, y) in enumerate(frames):
        hits = np.zeros(len(x), int)
        for j, tree in enumerate(trees):
            if j != k and tree is not None and len(x):
                d, _ = tree.query(np.c_[x, y], distance_upper_bound=tol)
                hits += np.isfinite(d)
        others = len(frames) - 1
        out.append(hits > others / 2 if others else np.zeros(len(x), bool))
    return out


def link_tracks(cx, cy, span: tuple[float, float], frames: list[tuple[np.ndarray, np.ndarray]], times, *,
                vmax: float, tol: float, r0: float, static_tol: float, min_points: int = 3,
                min_motion: float | None = None, groups=None, fit_tol: float | None = None) -> dict[str, np.ndarray]:
    """For candidates at (cx, cy), seen over the time ``span`` (start, end), and per-frame source
    positions ``frames`` at ``times``: ``moving``, the velocity ``vx``, ``vy`` (plane units per
    time unit, NaN when not moving), ``n_points`` (detections on the track) and ``t0`` (the time
    the fitted position ``x0``, ``y0`` refers to: the middle of the span).

    ``vmax``: the fastest motion looked for; ``tol``: how far a detection may sit from the track;
    ``r0``: how close the track must pass the candidate during its span; ``static_tol``: the
    radius of ``static_sources``, and the least a track must carry a source over its detections'
    time span (``min_motion``, when None) to be motion. ``min_points`` is lowered to the number of
    frames when fewer.
    ``fit_tol``: the farthest a detection may lie from the least-squares track (``tol`` when
    None; see ``_refit``). ``groups``: a label per frame (its stack); a group of two or more frames adds its detections
    to a track only when it holds two of them, since one stray source an hour away always lies
    within the slack a single stack leaves on the speed.
    """
    cx, cy = np.atleast_1d(np.asarray(cx, float)), np.atleast_1d(np.asarray(cy, float))
    m = len(cx)
    times = np.asarray(times, float)
    ta, tb = float(span[0]), float(span[1])
    t0 = 0.5 * (ta + tb)
    out = {"moving": np.zeros(m, bool), "vx": np.full(m, np.nan), "vy": np.full(m, np.nan),
           "n_points": np.zeros(m, int), "x0": np.full(m, np.nan), "y0": np.full(m, np.nan), "t0": t0}
    if m == 0 or len(frames) < 2:
        return out
    min_points = min(min_points, len(frames))
    min_motion = static_tol if min_motion is None else min_motion  # beyond "the same place"
    static = static_sources(frames, static_tol)
    pts = [(np.asarray(x, float)[~s], np.asarray(y, float)[~s]) for (x, y), s in zip(frames, static)]
    trees = [cKDTree(np.c_[x, y]) if len(x) else None for x, y in pts]
    eps = 1e-9 * max(1.0, abs(tb - ta))
    own = [k for k, t in enumerate(times) if ta - eps <= t <= tb + eps] or list(range(len(frames)))
    labels = np.unique(np.asarray(groups if groups is not None else np.zeros(len(frames))), return_inverse=True)[1]
    for i in range(m):
        best = _best_track(cx[i], cy[i], ta, tb, pts, trees, times, own, labels, vmax=vmax, tol=tol, r0=r0)
        if best is None:
            continue
        fit = _refit(*best, pts, times, labels, set(labels[own]), t0, fit_tol or tol)
        if fit is None:
            continue
        tt, (ax, bx), (ay, by) = fit
        if len(tt) < min_points or np.ptp(tt) <= 0:
            continue
        speed = math.hypot(bx, by)
        if speed * np.ptp(tt) > min_motion and speed <= 1.2 * vmax:
            out["moving"][i] = True
            out["vx"][i], out["vy"][i] = bx, by
            out["x0"][i], out["y0"][i] = ax, ay
        out["n_points"][i] = len(tt)
    return out


def _refit(k_idx, j_idx, pts, times, labels, own_groups, t0, fit_tol):
    """Least-squares track (times, (x0, vx), (y0, vy)) of the detections, leaving out the other
    stacks' (groups') detections, worst first, while one lies further than ``fit_tol`` from it:
    a track whose speed inside the candidate's stack disagrees with the speed between stacks
    joined two objects that happened to line up. None when no fit within ``fit_tol`` remains."""
    k_idx, j_idx = np.asarray(k_idx), np.asarray(j_idx)
    while True:
        tt = times[k_idx]
        px, py = pts_xy(pts, k_idx, j_idx)
        if len(tt) < 2 or np.ptp(tt) <= 0:
            return None
        cx_, cy_ = np.polyfit(tt - t0, px, 1), np.polyfit(tt - t0, py, 1)
        res = np.hypot(px - np.polyval(cx_, tt - t0), py - np.polyval(cy_, tt - t0))
        if res.max() <= fit_tol:
            return tt, (cx_[1], cx_[0]), (cy_[1], cy_[0])
        others = [g for g in set(labels[k_idx]) if g not in own_groups]
        if not others:
            return None
        worst = max(others, key=lambda g: res[labels[k_idx] == g].max())
        keep = labels[k_idx] != worst
        k_idx, j_idx = k_idx[keep], j_idx[keep]


def pts_xy(pts, k_idx, j_idx):
    return (np.array([pts[k][0][j] for k, j in zip(k_idx, j_idx)]),
            np.array([pts[k][1][j] for k, j in zip(k_idx, j_idx)]))


def _best_track(cx, cy, ta, tb, pts, trees, times, own, labels, *, vmax, tol, r0):
    """(frame indices, source indices) of the detections on the best track through (cx, cy), or
    None. Hypotheses: a seed in a frame of the candidate's span paired with any detection of
    another frame that a motion of at most ``vmax`` reaches."""
    best, best_key = None, (1, 0.0)
    c = np.array([cx, cy])
    r_seed = r0 + vmax * (tb - ta)
    own_rows = np.isin(labels, labels[own])
    for ks in own:
        tree = trees[ks]
        if tree is None:
            continue
        for js in tree.query_ball_point(c, r_seed):
            s = np.array([pts[ks][0][js], pts[ks][1][js]])
            ts = times[ks]
            for kl, tree_l in enumerate(trees):
                if kl == ks or tree_l is None or times[kl] == ts:
                    continue
                dt = times[kl] - ts
                cand = tree_l.query_ball_point(s, r0 + vmax * abs(dt))
                if not cand:
                    continue
                d = np.c_[pts[kl][0][cand], pts[kl][1][cand]]
                v = (d - s) / dt
                v = v[_passes(s, v, ts, c, ta, tb, r0)]
                if not len(v):
                    continue
                dist, idx = _inliers(s, v, ts, trees, times, tol)
                hit = np.isfinite(dist)
                for g in range(labels.max() + 1):
                    rows = labels == g
                    hit[rows] &= hit[rows].sum(axis=0) >= min(2, rows.sum())
                # the track must hold the candidate's own stack, not only the others it lines up with
                n = np.where(hit[own_rows].any(axis=0), hit.sum(axis=0), 0)
                res = np.where(hit, dist, 0.0).sum(axis=0)
                h = int(np.lexsort((res, -n))[0])  # most detections, then the closest
                key = (int(n[h]), -float(res[h]))
                if key > best_key:
                    best, best_key = (np.flatnonzero(hit[:, h]), idx[hit[:, h], h]), key
    return best


def _passes(s, v, ts, c, ta, tb, r0) -> np.ndarray:
    """Does the track s + v (t - ts) come within r0 of c for some t in [ta, tb]? (one per v)"""
    vv = np.einsum("ij,ij->i", v, v)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_star = ts + np.where(vv > 0, ((c - s) @ v.T) / vv, 0.0)
    t_star = np.clip(t_star, ta, tb)
    p = s + v * (t_star - ts)[:, None]
    return np.hypot(*(p - c).T) <= r0


def _inliers(s, v, ts, trees, times, tol):
    """Offset and index of the nearest detection within ``tol`` of each track (one per row of
    ``v``) in each frame: two (frames, tracks) arrays, inf / -1 where none."""
    dist = np.full((len(trees), len(v)), np.inf)
    idx = np.full((len(trees), len(v)), -1)
    for k, tree in enumerate(trees):
        if tree is not None:
            d, j = tree.query(s + v * (times[k] - ts), distance_upper_bound=tol)
            dist[k], idx[k] = d, np.where(np.isfinite(d), j, -1)
    return dist, idx


def rate_and_pa(wcs, x0, y0, vx, vy, per_hour: float) -> tuple[np.ndarray, np.ndarray]:
    """(rate arcsec/h, position angle deg east of north) of pixel velocities (vx, vy) at (x0, y0)
    through ``wcs``; ``per_hour`` converts the velocities' time unit to hours (24 for days).
    NaN where the velocity is."""
    x0, y0, vx, vy = (np.asarray(a, float) for a in (x0, y0, vx, vy))
    rate, pa = np.full(len(x0), np.nan), np.full(len(x0), np.nan)
    ok = np.isfinite(vx) & np.isfinite(vy) & np.isfinite(x0) & np.isfinite(y0)
    if not ok.any():
        return rate, pa
    step = 1.0 / per_hour  # one hour in the velocities' unit
    ra1, dec1 = wcs.pixel_to_world_values(x0[ok], y0[ok])
    ra2, dec2 = wcs.pixel_to_world_values(x0[ok] + vx[ok] * step, y0[ok] + vy[ok] * step)
    dra = (np.asarray(ra2) - np.asarray(ra1) + 180.0) % 360.0 - 180.0
    de = dra * np.cos(np.radians(0.5 * (np.asarray(dec1) + np.asarray(dec2)))) * 3600.0
    dn = (np.asarray(dec2) - np.asarray(dec1)) * 3600.0
    rate[ok] = np.hypot(de, dn)
    pa[ok] = np.degrees(np.arctan2(de, dn)) % 360.0
    return rate, pa


EPHEMERIS_COLUMNS = ("name", "ra", "dec", "mjd", "err_arcsec")


def read_ephemeris(raw: bytes, name: str):
    """A known-objects file (``ref_cat/sso/<night>.csv``): CSV with a header line and the
    columns ``name`` (the object's designation), ``ra``, ``dec`` (deg, ICRS, astrometric as seen
    from the site), ``mjd`` (UTC) and ``err_arcsec`` (1-sigma-ish positional error of the
    prediction), one row per object and epoch, as an ephemeris service (JPL Horizons, the MPC's,
    IMCCE's SkyBoT) gives them. A bad file is a ``BadInputError`` naming it."""
    import io

    from astropy.table import Table

    from gppy_stage.errors import BadInputError

    try:
        t = Table.read(io.BytesIO(raw), format="ascii.csv")
    except Exception as exc:  # astropy raises many kinds on a broken CSV
        raise BadInputError(f"known-objects file unreadable ({exc})", path=name) from None
    missing = [c for c in EPHEMERIS_COLUMNS if c not in t.colnames]
    if missing:
        raise BadInputError(f"known-objects file lacks column(s) {', '.join(missing)} "
                            f"(needs {', '.join(EPHEMERIS_COLUMNS)})", path=name)
    try:
        for c in EPHEMERIS_COLUMNS[1:]:
            t[c] = np.asarray(t[c], float)
    except (TypeError, ValueError):
        raise BadInputError(f"known-objects file has a non-numeric {c}", path=name) from None
    t["name"] = np.asarray(t["name"]).astype(str)
    return t


def predict(eph, mjd: float) -> list[tuple[str, float, float, float, float]]:
    """(name, ra, dec, err arcsec, rate arcsec/h) of each object at ``mjd``, linear between the
    two epochs around it; an object whose epochs do not bracket ``mjd`` is left out (an ephemeris
    is not extrapolated)."""
    out = []
    for name in sorted(set(eph["name"])):
        rows = eph[eph["name"] == name]
        rows = rows[np.argsort(rows["mjd"])]
        t = np.asarray(rows["mjd"], float)
        if len(t) < 2 or not t[0] <= mjd <= t[-1]:
            continue
        k = int(np.clip(np.searchsorted(t, mjd), 1, len(t) - 1))
        f = (mjd - t[k - 1]) / (t[k] - t[k - 1])
        ra0, ra1 = float(rows["ra"][k - 1]), float(rows["ra"][k])
        ra1 = ra0 + ((ra1 - ra0 + 180.0) % 360.0 - 180.0)  # across RA 0
        dec0, dec1 = float(rows["dec"][k - 1]), float(rows["dec"][k])
        dra = (ra1 - ra0) * math.cos(math.radians(0.5 * (dec0 + dec1)))
        rate = math.hypot(dra, dec1 - dec0) * 3600.0 / ((t[k] - t[k - 1]) * 24.0)
        err = float((1 - f) * rows["err_arcsec"][k - 1] + f * rows["err_arcsec"][k])
        out.append((str(name), (ra0 + f * (ra1 - ra0)) % 360.0, dec0 + f * (dec1 - dec0), err, rate))
    return out


def match_known(ra, dec, eph, span: tuple[float, float]) -> np.ndarray:
    """The known object's name for each (ra, dec) of a stack exposed over ``span`` (MJD), "" for
    none: within the prediction's error of its position at the stack's mid-time, widened by how
    far it moves in half the stack (a candidate on a stacked trail may be any part of it); the
    nearest when several."""
    ra, dec = np.asarray(ra, float), np.asarray(dec, float)
    names = np.array([""] * len(ra), dtype="U32")
    best = np.full(len(ra), np.inf)
    half_h = (span[1] - span[0]) * 12.0
    for name, pra, pdec, err, rate in predict(eph, 0.5 * (span[0] + span[1])):
        d = np.hypot(((ra - pra + 180.0) % 360.0 - 180.0) * np.cos(np.radians(pdec)), dec - pdec) * 3600.0
        hit = np.isfinite(d) & (d <= err + rate * half_h) & (d < best)
        names[hit], best[hit] = name[:32], d[hit]
    return names


def residual_centroid(diff, noise, bad, x: float, y: float, fwhm: float, *, reach: float | None = None,
                      min_snr: float = 2.0) -> tuple[float, float, float]:
    """(x, y, error px) of the flux on a difference cut-out near (x, y): a Gaussian-weighted first
    moment, recentred until it settles, first with a window twice the PSF's (a mover sits up to a
    few FWHM from where the stack saw its mean position), then the PSF's. NaNs when the weighted
    flux is under ``min_snr`` or the centroid wanders beyond ``reach`` (3 FWHM) of (x, y)."""
    nan = (math.nan, math.nan, math.nan)
    reach = 3.0 * fwhm if reach is None else reach
    good = ~np.asarray(bad, bool) & np.isfinite(diff) & np.isfinite(noise)
    d = np.where(good, diff, 0.0)
    v = np.where(good, np.asarray(noise, float) ** 2, 0.0)
    yy, xx = np.mgrid[: d.shape[0], : d.shape[1]]
    cx, cy, sig = float(x), float(y), fwhm / 2.3548
    for scale in (2.0,) * 3 + (1.0,) * 8:  # each step at 1x halves the distance to the fixed point
        w = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * (scale * sig) ** 2)) * good
        f = float((w * d).sum())
        if not f > min_snr * math.sqrt(float((w * w * v).sum())):
            return nan
        nx_, ny_ = float((w * d * xx).sum()) / f, float((w * d * yy).sum()) / f
        if math.hypot(nx_ - x, ny_ - y) > reach:
            return nan
        cx, cy = nx_, ny_
    # first-moment error sqrt(sum(w^2 (x - xc)^2 var)) / F, the larger axis, doubled: a window as
    # wide as the PSF pulls each moment halfway to its centre, so recentring to its fixed point
    # doubles any shift, the noise's too (measured: 0.53 px scatter for 0.26 px at S/N 5.8)
    ex = math.sqrt(float((w * w * (xx - cx) ** 2 * v).sum())) / f
    ey = math.sqrt(float((w * w * (yy - cy) ** 2 * v).sum())) / f
    return cx, cy, 2.0 * max(ex, ey)


def centroid_motion(times, x, y, err, t0: float, *, min_motion: float, nsigma: float = 4.0,
                    floor: float = 0.1) -> tuple[bool, float, float, float, float]:
    """(moving, vx, vy, x0, y0 at ``t0``) from per-frame centroids with errors (px): a weighted
    straight line, moving when it carries the source further than ``min_motion`` over the frames
    and the line beats staying put by more than ``nsigma`` (chi-square drop for the two velocity
    terms). ``floor`` (px) is added in quadrature to each error: frame-to-frame astrometry, which
    a bright static source's tiny centroid errors would otherwise read as motion."""
    t, x, y, e = (np.asarray(a, float) for a in (times, x, y, err))
    ok = np.isfinite(t) & np.isfinite(x) & np.isfinite(y) & np.isfinite(e)
    t, x, y, e = t[ok] - t0, x[ok], y[ok], np.hypot(e[ok], floor)
    if len(t) < 2 or np.ptp(t) <= 0:
        return False, math.nan, math.nan, math.nan, math.nan
    w = 1.0 / e**2
    (bx, ax), (by, ay) = np.polyfit(t, x, 1, w=np.sqrt(w)), np.polyfit(t, y, 1, w=np.sqrt(w))
    chi_line = float((w * ((x - ax - bx * t) ** 2 + (y - ay - by * t) ** 2)).sum())
    mx, my = float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())
    chi_still = float((w * ((x - mx) ** 2 + (y - my) ** 2)).sum())
    # a chi-square drop of 2 dof beyond nsigma's Gaussian tail probability
    drop = -2.0 * math.log(math.erfc(nsigma / math.sqrt(2.0)))
    moves = chi_still - chi_line > drop and math.hypot(bx, by) * np.ptp(t) > min_motion
    return bool(moves), float(bx), float(by), float(ax), float(ay)
