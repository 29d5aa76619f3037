"""The Alard-Lupton least squares on stamps: the kernel basis and its fit.

``K = sum_i a_i(x, y) b_i`` over Gaussians times polynomials (Alard & Lupton 1998), b0 of unit sum
and the rest of zero sum, so only the shape varies over the field and the flux scale is one
number; stamps are isolated, unsaturated stars in both images, spread over the region, and the
fit drops stamps much worse than the rest (variables, blends, cosmic rays) and solves again.
Array code through the namespace ``xp``; stamp choice (a few hundred positions) on the host.
"""

from __future__ import annotations

import numpy

from gppy_stage.science.photometry import NMAD
from gppy_stage.xp import to_numpy


def poly_exponents(order: int) -> list[tuple[int, int]]:
    """(i, j) of u^i v^j for i + j <= order, lowest order first (1, u, v, u^2, uv, v^2, ...)."""
    return [(n - j, j) for n in range(order + 1) for j in range(n + 1)]


def poly_terms(u, v, order: int):
    """[u^i v^j for i + j <= order], in the order of ``poly_exponents``."""
    return [u ** i * v ** j for i, j in poly_exponents(order)]


def norm_coords(x, y, box):
    """Coordinates scaled to [-1, 1] over ``box = (y0, y1, x0, x1)``: high powers stay near 1."""
    y0, y1, x0, x1 = box
    hx, hy = max((x1 - x0 - 1) / 2.0, 1.0), max((y1 - y0 - 1) / 2.0, 1.0)
    return (x - (x0 + x1 - 1) / 2.0) / hx, (y - (y0 + y1 - 1) / 2.0) / hy


def _basis_map(sigmas, degrees, half: int, xp=numpy):
    """(raw, M): the raw separable functions g_s(x) g_s(y) (x/h)^a (y/h)^b, one (s, a, b) per row,
    and the matrix that makes them the basis (b0 unit sum, the rest zero sum and unit norm)."""
    yy, xx = xp.mgrid[-half:half + 1, -half:half + 1].astype(xp.float64)
    xs, ys = xx / half, yy / half  # polynomial in scaled coordinates keeps x^6 near 1
    raw = []
    for s, deg in zip(sigmas, degrees):
        g = xp.exp(-(xx**2 + yy**2) / (2.0 * s * s))
        raw += [g * xs ** a * ys ** b for a, b in poly_exponents(deg)]
    raw = xp.stack(raw)
    sums = to_numpy(raw.sum(axis=(1, 2)))
    b0 = raw[0] / sums[0]
    M = numpy.zeros((len(sums), len(sums)))
    M[0, 0] = 1.0 / sums[0]
    for i in range(1, len(sums)):
        b = raw[i] - sums[i] * b0  # zero sum: these may vary over the field without changing flux
        norm = float(xp.sqrt((b * b).sum()))
        M[i, i], M[i, 0] = 1.0 / norm, -sums[i] / (sums[0] * norm)
    return raw, M


def kernel_basis(sigmas, degrees, half: int, xp=numpy):
    """(n, 2h+1, 2h+1) basis: b0 a unit-sum Gaussian, the rest zero-sum and unit-norm."""
    raw, M = _basis_map(sigmas, degrees, half, xp)
    return xp.tensordot(xp.asarray(M), raw, axes=(1, 0))


def stamp_convolutions(cuts, sigmas, degrees, half: int, xp=numpy):
    """(ns, nb, S, S): stamps ``cuts (ns, S + 2h, S + 2h)`` convolved ('valid') with every basis
    function. Each raw function is separable, so two matrix products per Gaussian do the work of
    ns * nb small 2-D FFTs; the basis is then a linear map of the raw results."""
    ns, R = cuts.shape[0], cuts.shape[-1]
    S = R - 2 * half
    t = xp.arange(-half, half + 1, dtype=xp.float64)
    shift = xp.arange(S)[None, :] + half - xp.arange(R)[:, None]  # (R, S): kernel offset of c -> x
    inside = xp.abs(shift) <= half
    idx = xp.clip(shift + half, 0, 2 * half)
    flat = cuts.reshape(ns * R, R)
    out = []
    for s, deg in zip(sigmas, degrees):
        k1 = [xp.exp(-t * t / (2.0 * s * s)) * (t / half) ** a for a in range(deg + 1)]
        T = xp.stack([xp.where(inside, k[idx], 0.0) for k in k1])  # (n, R, S) Toeplitz matrices
        X = (flat @ xp.transpose(T, (1, 0, 2)).reshape(R, -1)).reshape(ns, R, deg + 1, S)  # along x
        X = xp.ascontiguousarray(xp.transpose(X, (2, 1, 0, 3))).reshape(deg + 1, R, ns * S)
        Ty = xp.transpose(T, (0, 2, 1)).reshape((deg + 1) * S, R)
        # along y, only the powers b <= deg - a that the basis has
        Y = [(Ty[: (deg - a + 1) * S] @ X[a]).reshape(deg - a + 1, S, ns, S) for a in range(deg + 1)]
        out += [Y[a][b] for a, b in poly_exponents(deg)]
    raw = xp.transpose(xp.stack(out), (2, 0, 1, 3))  # (ns, nraw, S, S)
    _, M = _basis_map(sigmas, degrees, half, xp)
    return xp.transpose(xp.tensordot(raw, xp.asarray(M), axes=([1], [1])), (0, 3, 1, 2))


def _match(xa, ya, xb, yb, radius):
    """Index in b of the nearest b within radius of each a (-1 if none)."""
    from scipy.spatial import cKDTree

    if len(xb) == 0:
        return numpy.full(len(xa), -1)
    d, j = cKDTree(numpy.c_[xb, yb]).query(numpy.c_[xa, ya], distance_upper_bound=radius)
    return numpy.where(numpy.isfinite(d), j, -1)


def choose_stamps(src_cat, tgt_cat, bad_host, shape, *, stamp_half, kernel_half, snr, sat_src, sat_tgt,
                  grid, max_stamps, region=None):
    """Integer centres of stamp stars: in both images, isolated, unsaturated, clear of masks, and
    inside ``region`` (y0, y1, x0, x1) when given."""
    from scipy.spatial import cKDTree

    ny, nx = shape
    ry0, ry1, rx0, rx1 = region or (0, ny, 0, nx)
    src_objs, src_snr = src_cat
    tgt_objs, tgt_snr = tgt_cat
    j = _match(src_objs["x"], src_objs["y"], tgt_objs["x"], tgt_objs["y"], 1.5)
    ok = j >= 0
    s, t = src_objs[ok], tgt_objs[j[ok]]
    s_snr = src_snr[ok]
    keep = (s["flag"] == 0) & (t["flag"] == 0) & (s["flux"] > 0) & (t["flux"] > 0)
    keep &= (s_snr >= snr) & (tgt_snr[j[ok]] >= snr)
    if sat_src is not None:
        keep &= s["peak"] < 0.8 * sat_src
    if sat_tgt is not None:
        keep &= t["peak"] < 0.8 * sat_tgt
    cx = numpy.rint(s["x"]).astype(int)
    cy = numpy.rint(s["y"]).astype(int)
    edge = stamp_half + kernel_half + 1
    keep &= (cx >= max(edge, rx0)) & (cx < min(nx - edge, rx1)) & (cy >= max(edge, ry0)) & (cy < min(ny - edge, ry1))
    if not keep.any():
        return numpy.zeros((0, 2), int)
    # isolation: no other detection (in either image) inside the stamp
    tree = cKDTree(numpy.r_[numpy.c_[src_objs["x"], src_objs["y"]], numpy.c_[tgt_objs["x"], tgt_objs["y"]]])
    counts = tree.query_ball_point(numpy.c_[s["x"], s["y"]], stamp_half, return_length=True)
    keep &= counts <= 2  # itself, once per image
    r = stamp_half + kernel_half
    idx = numpy.array([i for i in numpy.nonzero(keep)[0]
                       if not bad_host[cy[i] - r:cy[i] + r + 1, cx[i] - r:cx[i] + r + 1].any()], int)
    if len(idx) == 0:
        return numpy.zeros((0, 2), int)
    picked = _spread(cx[idx] - rx0, cy[idx] - ry0, s_snr[idx], (rx1 - rx0, ry1 - ry0), grid, max_stamps)
    return numpy.c_[cx[idx[picked]], cy[idx[picked]]]


def _spread(x, y, snr, size, grid, n_max):
    """Indices of at most n_max stars, spread over a grid: best S/N first within each cell, cells in turn."""
    gx, gy = grid
    cell = (numpy.clip(x * gx // size[0], 0, gx - 1)) * gy + numpy.clip(y * gy // size[1], 0, gy - 1)
    ranked = {}
    for k in numpy.argsort(-snr):
        ranked.setdefault(cell[k], []).append(k)
    picked, depth = [], 0
    while len(picked) < n_max and any(depth < len(v) for v in ranked.values()):
        for v in ranked.values():
            if depth < len(v) and len(picked) < n_max:
                picked.append(v[depth])
        depth += 1
    return numpy.array(picked, int)


# ---------------------------------------------------------------------------------------------
# The fit


def _stamp_stack(img, centres, half, xp):
    """(n, 2h+1, 2h+1) cutouts around integer centres (all inside the image)."""
    n = 2 * half + 1
    off = xp.arange(-half, half + 1)
    cx = xp.asarray(centres[:, 0])[:, None, None]
    cy = xp.asarray(centres[:, 1])[:, None, None]
    yy = cy + off[None, :, None]
    xx = cx + off[None, None, :]
    return img[yy, xx].reshape(len(centres), n, n)


def _design(src, tgt, src_var, tgt_var, centres, spec, box, *, stamp_half, bg_order, spatial_order, xp):
    """Per-stamp design matrices (ns, nc, npix), targets, variances and spatial terms (ns, nk);
    ``spec`` = (sigmas, degrees, half) of the basis."""
    hw = spec[2]
    S = 2 * stamp_half + 1
    ns = len(centres)
    src_cut = xp.asarray(_stamp_stack(src, centres, stamp_half + hw, xp), dtype=xp.float64)
    conv = stamp_convolutions(src_cut, *spec, xp=xp)  # (ns, nb, S, S)
    nb = conv.shape[1]
    cut = [xp.asarray(_stamp_stack(a, centres, stamp_half, xp), dtype=xp.float64).reshape(ns, S * S)
           for a in (tgt, tgt_var, src_var)]
    off = xp.arange(-stamp_half, stamp_half + 1, dtype=xp.float64)
    cxs = xp.asarray(centres[:, 0], dtype=xp.float64)
    cys = xp.asarray(centres[:, 1], dtype=xp.float64)
    px = cxs[:, None, None] + off[None, None, :] + 0 * off[None, :, None]
    py = cys[:, None, None] + off[None, :, None] + 0 * off[None, None, :]
    pu, pv = norm_coords(px, py, box)
    bg_cols = [b.reshape(ns, S * S) for b in poly_terms(pu, pv, bg_order)]
    D = xp.concatenate([conv.reshape(ns, nb, S * S), xp.stack(bg_cols, axis=1)], axis=1)  # (ns, nc, npix)
    su, sv = norm_coords(cxs, cys, box)
    P = xp.stack(poly_terms(su, sv, spatial_order), axis=1)  # (ns, nk)
    return xp.ascontiguousarray(D), cut[0], cut[1], cut[2], P


def _pinv_solve(A, b, xp, rcond=1e-12):
    """Pseudo-inverse solution of a symmetric positive semi-definite system. Gaussians times
    high-degree polynomials are nearly collinear, so directions below rcond of the largest
    eigenvalue are dropped, as lstsq would; an eigendecomposition does it at a third of the cost."""
    lam, V = xp.linalg.eigh(A)
    keep = lam > rcond * float(lam.max())
    inv = xp.where(keep, 1.0 / xp.where(keep, lam, 1.0), 0.0)
    return V @ (inv * (V.T @ b))


def _solve(D, w, t, P, good, sel, xp):
    """Coefficients (nc, nk) of the stamps flagged good (Jacobi-scaled pseudo-inverse);
    ``D`` is (ns, nc, npix), contiguous, so every product below is a BLAS call."""
    nc, nk = D.shape[1], P.shape[1]
    gmask = xp.asarray(good)
    Dg, wg, tg, Pg = D[gmask], w[gmask], t[gmask], P[gmask]
    Dw = Dg * wg[:, None, :]
    G = xp.einsum("sip,sjp->sij", Dw, Dg)  # (ns, nc, nc); numpy's batched matmul of a transpose is far slower
    r = xp.matmul(Dw, tg[:, :, None])[..., 0]
    Q = Pg[:, :, None] * Pg[:, None, :]
    N = xp.tensordot(G, Q, axes=([0], [0]))  # (nc, nc, nk, nk)
    N = xp.transpose(N, (0, 2, 1, 3)).reshape(nc * nk, nc * nk)
    R = (r[:, :, None] * Pg[:, None, :]).sum(axis=0).reshape(nc * nk)
    Ns = N[sel][:, sel]
    d = 1.0 / xp.sqrt(xp.maximum(xp.diag(Ns), 1e-300))
    y = _pinv_solve(Ns * d[:, None] * d[None, :], R[sel] * d, xp)
    coef = xp.zeros(nc * nk, dtype=xp.float64)
    coef[sel] = y * d
    return coef.reshape(nc, nk)


def fit_kernel(src, tgt, src_var, tgt_var, centres, spec, *, stamp_half, spatial_order, bg_order,
               clip_sigma, max_iter, min_stamps, box=None, xp=numpy):
    """Least-squares kernel + background coefficients with stamp-level clipping. ``spec`` =
    (sigmas, degrees, half) of the basis; ``box`` is the region (y0, y1, x0, x1) the spatial
    polynomials are scaled to (default: the whole image).

    Returns (coef (nb + nbg, nk) array with unfitted combinations zero, info dict).
    """
    basis = kernel_basis(*spec, xp=xp)
    nb = basis.shape[0]
    box = box or (0, src.shape[0], 0, src.shape[1])
    D, t, vt, vs, P = _design(src, tgt, src_var, tgt_var, centres, spec, box, stamp_half=stamp_half,
                              bg_order=bg_order, spatial_order=spatial_order, xp=xp)
    nc, nk, ns = D.shape[1], P.shape[1], len(centres)
    # unknowns: b0 constant; b1.. with every spatial term; background terms are per-pixel already
    sel = xp.asarray([0] + [i * nk + k for i in range(1, nb) for k in range(nk)]
                     + [(nb + j) * nk for j in range(nc - nb)])
    good = numpy.ones(ns, bool)
    ksq, n_iter = 1.0, 0
    for n_iter in range(1, max_iter + 1):
        # the convolved source's variance is var * sum(K^2); a first guess of 1 is refined below
        coef = _solve(D, 1.0 / (vt + vs * ksq), t, P, good, sel, xp)
        model = xp.matmul((P @ coef.T)[:, None, :], D)[:, 0, :]
        kern_c = xp.tensordot(coef[:nb, 0], basis, axes=(0, 0))
        ksq_new = float((kern_c * kern_c).sum())
        resid = t - model
        chi2 = to_numpy(((resid * resid) / (vt + vs * ksq_new)).mean(axis=1))
        g = chi2[good]
        med = numpy.median(g)
        mad = NMAD * numpy.median(numpy.abs(g - med))
        bad_now = good & (chi2 > med + clip_sigma * max(mad, 0.05 * med))
        converged = not bad_now.any() and abs(ksq_new - ksq) < 1e-3 * ksq
        ksq = ksq_new
        if converged:
            break
        if bad_now.any() and good.sum() - bad_now.sum() >= min_stamps:
            good &= ~bad_now
        elif n_iter > 1:
            break
    info = dict(chi2=float(numpy.mean(chi2[good])), n_stamps=int(good.sum()), n_stamps_rejected=int((~good).sum()),
                n_iter=n_iter, stamp_xy=centres[good].tolist(), stamp_chi2=chi2.tolist())
    return coef, info
