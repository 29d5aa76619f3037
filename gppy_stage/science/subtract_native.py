"""The native Alard-Lupton engine: PSF matching by a spatially varying kernel, tile by tile.

Model (Alard & Lupton 1998; Alard 2000): ``target(x, y) = (K_xy * source)(x, y) + B(x, y)``
where ``source`` is the sharper image (it is convolved, so the kernel never deconvolves),
``K_xy = sum_i a_i(x, y) b_i`` over a basis of Gaussians times polynomials, and ``B`` is a
low-order polynomial (the differential sky). All basis functions but the first have zero sum,
and only their coefficients vary over a tile, so the photometric scale (the kernel sum) is one
number per tile, as it must be for a transparency change.

Tiles, as HOTPANTS' regions: the frame is cut into tiles of about ``tile`` px. Each tile solves
its own kernel and background on stamps of its core plus a margin, and applies them on its core
plus ``tile_overlap`` px each side; across the overlap the two tiles' differences are blended by
linear weights that sum to one, so there is no step where one solution hands over to the next.
A tile's working set is a few of its own size, so a full 9576x6388 frame stays within a few
frame-sized float32 arrays (inputs and outputs), and tiles run in parallel threads on the CPU.

The fit uses stamps around isolated, unsaturated stars present in both images, spread over a
grid so the spatial terms are constrained everywhere; stamps whose fit is much worse than the
others (variables, blends, cosmic rays) are dropped and the fit redone. Applying the kernel
uses the linearity of the model: ``K_xy * S = sum_k P_k(x, y) (K_k * S)``, one FFT convolution
per spatial term instead of one per pixel. Images are float32; only the normal equations (small)
are float64.

Everything that touches pixels goes through the array namespace ``xp`` (NumPy or CuPy);
only star finding (sep, a handful of positions) runs on the host.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy

from gppy_stage.errors import BadInputError, ConfigError
from gppy_stage.science.kernel import (GAUSS_DEGREES, SubtractionResult, direction, find_stars, fwhm_of,
                                       half_light_diameters, kernel_half_width, matching_sigmas, sky_level)
from gppy_stage.science.photometry import NMAD
from gppy_stage.xp import to_numpy

DEFAULTS = dict(
    stamp_half=10,          # 21x21 px stamps
    kernel_half=None,       # None: from the Gaussian widths
    gauss_sigmas=None,      # None: (0.5, 1, 2) x sigma_match (HOTPANTS README's rule of thumb)
    gauss_degrees=GAUSS_DEGREES,
    spatial_order=None,     # within one tile; None: 2 for a frame in one tile, 1 for a frame in several
    bg_order=1,
    max_stamps=150,         # per tile
    stamp_grid=(6, 6),      # stamps are picked round-robin from these cells of a tile
    stamp_snr=30.0,         # minimum S/N of a stamp star in both images
    clip_sigma=3.0,
    max_iter=5,
    saturation=None,        # both images; or new_saturation / ref_saturation
    new_saturation=None,
    ref_saturation=None,
    new_fwhm=None,          # px; None: measured
    ref_fwhm=None,
    convolve=None,          # "ref" / "new" forces the direction
    min_stamps=8,
    tile=2048,              # px: tiles of about this size, each with its own kernel and background
    tile_overlap=32,        # px each side of a tile border over which two tiles' results are blended
    tile_margin=128,        # px beyond the blended area whose stamps also constrain a tile's fit
    threads=2,              # tiles solved at once on the CPU (FFT, BLAS and sep release the GIL)
)


# ---------------------------------------------------------------------------------------------
# Array helpers (namespace-generic)


def _fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT lengths with large prime factors are many times slower."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def _fft(xp):
    """scipy.fft for NumPy arrays (it keeps float32 as float32; numpy.fft would promote), else xp.fft."""
    if xp is numpy:
        import scipy.fft

        return scipy.fft
    return xp.fft


def fft_convolve(images, kernels, xp=numpy, *, fft_shape=None):
    """'same'-size convolution of ``images (..., H, W)`` by centred odd ``kernels (..., K, K)``.

    Zero padding (not wrap-around) outside the image; leading axes broadcast.
    """
    H, W = images.shape[-2:]
    hw = kernels.shape[-1] // 2
    if fft_shape is None:
        fft_shape = (_fast_len(H + hw + 1), _fast_len(W + hw + 1))
    fi = _fft(xp).rfft2(images, s=fft_shape)
    return _apply_kernel_fft(fi, kernels, fft_shape, (H, W), xp)


def _kernel_fft(kernels, fft_shape, xp):
    hw = kernels.shape[-1] // 2
    kp = xp.zeros(kernels.shape[:-2] + tuple(fft_shape), dtype=kernels.dtype)
    kp[..., : kernels.shape[-2], : kernels.shape[-1]] = kernels
    # the kernel's centre goes to pixel (0, 0) so the output is not shifted
    kp = xp.roll(kp, (-hw, -hw), axis=(-2, -1))
    return _fft(xp).rfft2(kp)


def _apply_kernel_fft(fi, kernels, fft_shape, out_hw, xp, offset=(0, 0)):
    out = _fft(xp).irfft2(fi * _kernel_fft(kernels, fft_shape, xp), s=fft_shape)
    return out[..., offset[0]:offset[0] + out_hw[0], offset[1]:offset[1] + out_hw[1]]


def _ndimage(xp):
    """scipy.ndimage for NumPy arrays, cupyx.scipy.ndimage for CuPy ones (the same functions)."""
    if xp is numpy:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


def box_dilate(mask, r: int, xp=numpy):
    """Grow a boolean mask by a (2r+1)^2 square: a running maximum along each axis (exact)."""
    if r <= 0:
        return mask.astype(bool)
    nd = _ndimage(xp)
    m = nd.maximum_filter1d(mask.astype(xp.uint8), 2 * r + 1, axis=0, mode="constant")
    return nd.maximum_filter1d(m, 2 * r + 1, axis=1, mode="constant") > 0


def poly_exponents(order: int) -> list[tuple[int, int]]:
    """(i, j) of u^i v^j for i + j <= order, lowest order first (1, u, v, u^2, uv, v^2, ...)."""
    return [(n - j, j) for n in range(order + 1) for j in range(n + 1)]


def poly_terms(u, v, order: int):
    """[u^i v^j for i + j <= order], in the order of ``poly_exponents``."""
    return [u ** i * v ** j for i, j in poly_exponents(order)]


def _poly_image(coeffs: dict, u, v, xp):
    """sum c_ij u^i v^j on the grid of 1-D ``u`` (columns) and ``v`` (rows), one row sum per power
    of v, so a full-size image costs a few array operations instead of one per term."""
    out = xp.zeros((v.shape[0], u.shape[0]), dtype=xp.float32)
    for j in sorted({j for _, j in coeffs}):
        row = sum(float(c) * u ** i for (i, jj), c in coeffs.items() if jj == j)
        out += (v ** j)[:, None].astype(xp.float32) * xp.asarray(row, dtype=xp.float32)[None, :]
    return out


def _norm_coords(x, y, box):
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


# ---------------------------------------------------------------------------------------------
# Tiles


@dataclass(frozen=True)
class Tile:
    """One tile: ``core`` partitions the frame; ``apply`` = core + overlap (where its result is
    used, with weights ``wy``/``wx``); ``fit`` = apply + margin (its stamps); ``cut`` = fit + the
    stamp and kernel reach (the pixels it reads). Boxes are (y0, y1, x0, x1) in frame pixels."""

    core: tuple
    apply: tuple
    fit: tuple
    wy: numpy.ndarray
    wx: numpy.ndarray


def _edges(n: int, tile: int) -> list[int]:
    k = max(1, math.ceil(n / max(int(tile), 1)))
    return [round(i * n / k) for i in range(k + 1)]


def _ramp(a: int, b: int, n: int, o: int):
    """1-D blending weight of core [a, b) over [a - o, b + o): neighbours' ramps sum to one."""
    lo, hi = max(a - o, 0), min(b + o, n)
    x = numpy.arange(lo, hi) + 0.5
    w = numpy.ones(hi - lo)
    if a > 0:
        w = numpy.minimum(w, numpy.clip((x - (a - o)) / (2 * o), 0, 1))
    if b < n:
        w = numpy.minimum(w, numpy.clip((b + o - x) / (2 * o), 0, 1))
    return lo, hi, w.astype(numpy.float32)


def make_tiles(shape, tile: int, overlap: int, margin: int) -> list[Tile]:
    H, W = shape
    ey, ex = _edges(H, tile), _edges(W, tile)
    smallest = min(min(b - a for a, b in zip(e[:-1], e[1:])) for e in (ey, ex))
    o = max(min(int(overlap), (smallest - 1) // 2), 1)  # each tile keeps a plateau of its own
    out = []
    for a, b in zip(ey[:-1], ey[1:]):
        y0, y1, wy = _ramp(a, b, H, o)
        for c, d in zip(ex[:-1], ex[1:]):
            x0, x1, wx = _ramp(c, d, W, o)
            fit = (max(y0 - margin, 0), min(y1 + margin, H), max(x0 - margin, 0), min(x1 + margin, W))
            out.append(Tile(core=(a, b, c, d), apply=(y0, y1, x0, x1), fit=fit, wy=wy, wx=wx))
    return out


def _grow(box, r, shape):
    y0, y1, x0, x1 = box
    return max(y0 - r, 0), min(y1 + r, shape[0]), max(x0 - r, 0), min(x1 + r, shape[1])


def _local(box, origin):
    return box[0] - origin[0], box[1] - origin[0], box[2] - origin[2], box[3] - origin[2]


class _Frame:
    """One input image: its arrays as given (no full-frame copies), sky and saturation; ``cut``
    prepares one region as float32 (sky removed, bad pixels zero)."""

    def __init__(self, img, var, mask, sat, xp):
        self.img, self.var, self.mask, self.sat, self.xp = img, var, mask, sat, xp
        sample = self._bad(img[::4, ::4], None if mask is None else mask[::4, ::4],
                           None if var is None else var[::4, ::4])
        self.sky, self.sig = sky_level(xp.asarray(img[::4, ::4], dtype=xp.float32), sample, xp, step=1)

    def _bad(self, img, mask, var):
        xp = self.xp
        img = xp.asarray(img)
        bad = ~xp.isfinite(img)
        if mask is not None:
            bad |= xp.asarray(mask).astype(bool)
        if self.sat is not None:
            bad |= img >= self.sat
        if var is not None:
            var = xp.asarray(var)
            bad |= ~xp.isfinite(var) | (var <= 0)
        return bad

    def cut(self, box):
        xp = self.xp
        y0, y1, x0, x1 = box
        sl = (slice(y0, y1), slice(x0, x1))
        img = xp.asarray(self.img[sl], dtype=xp.float32)
        var = None if self.var is None else xp.asarray(self.var[sl], dtype=xp.float32)
        bad = self._bad(img, None if self.mask is None else self.mask[sl], var)
        img = xp.where(bad, xp.float32(0), img - xp.float32(self.sky))
        var = xp.where(bad, xp.float32(0), xp.float32(self.sig**2) if var is None else var)
        return img, var, bad


# ---------------------------------------------------------------------------------------------
# Stars (pass 1: every tile's core, on the host) and stamp choice


def _concat(cats):
    objs = numpy.concatenate([c[0] for c in cats]) if cats else numpy.zeros(0)
    return objs, numpy.concatenate([c[1] for c in cats]) if cats else numpy.zeros(0)


def _tile_stars(frame, tile, shape):
    """Stars whose centre is in the tile's core, in frame coordinates, and their half-light diameters."""
    box = _grow(tile.core, 16, shape)
    img, var, bad = (to_numpy(a) for a in frame.cut(box))
    objs, snr = find_stars(img, var, bad)
    diam, dsnr = half_light_diameters((objs, snr), img)
    good = (objs["flag"] == 0) & (objs["flux"] > 0)
    objs = objs.copy()
    objs["x"] += box[2]
    objs["y"] += box[0]
    a, b, c, d = tile.core
    inside = (objs["y"] >= a - 0.5) & (objs["y"] < b - 0.5) & (objs["x"] >= c - 0.5) & (objs["x"] < d - 0.5)
    return (objs[inside], snr[inside]), (diam[inside[good]], dsnr[inside[good]])


def _stars(frame, tiles, shape, pool):
    found = list(pool.map(lambda t: _tile_stars(frame, t, shape), tiles))
    cat = _concat([f[0] for f in found])
    fwhm = fwhm_of(numpy.concatenate([f[1][0] for f in found]), numpy.concatenate([f[1][1] for f in found]))
    return cat, fwhm


def _match(xa, ya, xb, yb, radius):
    """Index in b of the nearest b within radius of each a (-1 if none)."""
    from scipy.spatial import cKDTree

    if len(xb) == 0:
        return numpy.full(len(xa), -1)
    d, j = cKDTree(numpy.c_[xb, yb]).query(numpy.c_[xa, ya], distance_upper_bound=radius)
    return numpy.where(numpy.isfinite(d), j, -1)


def _in_box(cat, box):
    """The catalogue entries inside ``box``, shifted to its origin."""
    objs, snr = cat
    y0, y1, x0, x1 = box
    keep = (objs["x"] >= x0) & (objs["x"] < x1 - 1) & (objs["y"] >= y0) & (objs["y"] < y1 - 1)
    objs = objs[keep].copy()
    objs["x"] -= x0
    objs["y"] -= y0
    return objs, snr[keep]


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
    pu, pv = _norm_coords(px, py, box)
    bg_cols = [b.reshape(ns, S * S) for b in poly_terms(pu, pv, bg_order)]
    D = xp.concatenate([conv.reshape(ns, nb, S * S), xp.stack(bg_cols, axis=1)], axis=1)  # (ns, nc, npix)
    su, sv = _norm_coords(cxs, cys, box)
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


# ---------------------------------------------------------------------------------------------
# One tile: stamps, fit, apply


@dataclass
class _Match:
    """What every tile shares: the two frames in their roles, the basis and the settings."""

    src: _Frame
    tgt: _Frame
    cat_src: tuple
    cat_tgt: tuple
    basis: object
    spec: tuple
    hw: int
    convolved: str
    cfg: dict
    shape: tuple
    xp: object


def _tile_stamps(m: _Match, src_bad, tgt_bad, cut, region):
    """Stamp centres (cut coordinates) inside ``region`` of a tile's cut."""
    cfg = m.cfg
    bad = to_numpy(src_bad) | to_numpy(tgt_bad)
    sat = [None if f.sat is None else f.sat - f.sky for f in (m.src, m.tgt)]
    return choose_stamps(_in_box(m.cat_src, cut), _in_box(m.cat_tgt, cut), bad, bad.shape,
                         stamp_half=cfg["stamp_half"], kernel_half=m.hw, snr=cfg["stamp_snr"], sat_src=sat[0],
                         sat_tgt=sat[1], grid=cfg["stamp_grid"], max_stamps=cfg["max_stamps"], region=region)


def _solve_tile(m: _Match, tile: Tile):
    """Kernel and background of one tile; a tile short of stars widens its fit region until it
    has enough (or covers the frame), as a sparse field or a masked corner needs."""
    cfg, H, W = m.cfg, *m.shape
    reach, margin = cfg["stamp_half"] + m.hw, 0
    while True:
        fit_box = _grow(tile.fit, margin, m.shape)
        cut = _grow(fit_box, reach, m.shape)
        src, src_var, src_bad = m.src.cut(cut)
        tgt, tgt_var, tgt_bad = m.tgt.cut(cut)
        region = _local(fit_box, cut)
        centres = _tile_stamps(m, src_bad, tgt_bad, cut, region)
        if len(centres) >= 3 * max(cfg["min_stamps"], 3) or fit_box == (0, H, 0, W):
            break
        margin = 2 * margin + 256
    if len(centres) < cfg["min_stamps"]:
        raise BadInputError(f"only {len(centres)} usable stamp stars for the tile at rows {tile.core[0]}:"
                            f"{tile.core[1]}, columns {tile.core[2]}:{tile.core[3]} (need {cfg['min_stamps']})")
    order = cfg["spatial_order"]
    if order is None:  # a tile spans a fraction of the field: its PSF changes almost linearly
        order = 2 if tile.core == (0, m.shape[0], 0, m.shape[1]) else 1
    # each spatial order needs enough stamps to pin down its nb * nk unknowns across the tile
    while order > 0 and len(centres) < 3 * (order + 1) * (order + 2) // 2:
        order -= 1
    coef, fit = fit_kernel(src, tgt, src_var, tgt_var, centres, m.spec, stamp_half=cfg["stamp_half"],
                           spatial_order=order, bg_order=cfg["bg_order"], clip_sigma=cfg["clip_sigma"],
                           max_iter=cfg["max_iter"], min_stamps=cfg["min_stamps"], box=region, xp=m.xp)
    fit.update(order=order, stamp_xy=[[x + cut[2], y + cut[0]] for x, y in fit["stamp_xy"]])
    return coef, fit, cut, region, (src, src_var, src_bad, tgt, tgt_var, tgt_bad)


def _apply_tile(m: _Match, tile: Tile, coef, order, cut, region, arrays):
    """(diff, noise, mask) of a tile over its apply region: sum_k P_k (K_k * src) + B, and the
    variance tgt_var + (K^2 * src_var), the kernel's spatial change carried by sum K(x,y)^2."""
    xp, hw, nb = m.xp, m.hw, m.basis.shape[0]
    src, src_var, src_bad, tgt, tgt_var, tgt_bad = arrays
    ay0, ay1, ax0, ax1 = _local(tile.apply, cut)
    cy0, cy1, cx0, cx1 = max(ay0 - hw, 0), min(ay1 + hw, src.shape[0]), max(ax0 - hw, 0), min(ax1 + hw, src.shape[1])
    conv_in = src[cy0:cy1, cx0:cx1]
    fft_shape = (_fast_len(cy1 - cy0 + hw + 1), _fast_len(cx1 - cx0 + hw + 1))
    out_hw, off = (ay1 - ay0, ax1 - ax0), (ay0 - cy0, ax0 - cx0)
    kernels = xp.tensordot(coef[:nb].T, m.basis, axes=(1, 0)).astype(xp.float32)  # (nk, K, K)
    u, v = _norm_coords(xp.arange(ax0, ax1, dtype=xp.float64), xp.arange(ay0, ay1, dtype=xp.float64), region)
    f_src = _fft(xp).rfft2(conv_in, s=fft_shape)
    model = _poly_image({e: c for e, c in zip(poly_exponents(m.cfg["bg_order"]), to_numpy(coef[nb:, 0]))}, u, v, xp)
    for k, (i, j) in enumerate(poly_exponents(order)):
        conv = _apply_kernel_fft(f_src, kernels[k], fft_shape, out_hw, xp, off)
        if i or j:  # in place: a full-tile temporary per factor costs as much as the FFT
            conv *= (v ** j)[:, None].astype(xp.float32)
            conv *= (u ** i)[None, :].astype(xp.float32)
        model += conv
    del f_src
    gram = to_numpy(xp.einsum("kab,lab->kl", kernels.astype(xp.float64), kernels.astype(xp.float64)))
    ksq = {}
    for k, (i1, j1) in enumerate(poly_exponents(order)):
        for l, (i2, j2) in enumerate(poly_exponents(order)):
            ksq[(i1 + i2, j1 + j2)] = ksq.get((i1 + i2, j1 + j2), 0.0) + gram[k, l] / gram[0, 0]
    var_conv = fft_convolve(src_var[cy0:cy1, cx0:cx1], kernels[0] ** 2, xp, fft_shape=fft_shape)
    var = tgt_var[ay0:ay1, ax0:ax1] + xp.maximum(var_conv[off[0]:off[0] + out_hw[0], off[1]:off[1] + out_hw[1]], 0) \
        * _poly_image(ksq, u, v, xp)
    mask = box_dilate(src_bad[cy0:cy1, cx0:cx1], hw, xp)[off[0]:off[0] + out_hw[0], off[1]:off[1] + out_hw[1]]
    mask |= tgt_bad[ay0:ay1, ax0:ax1]
    ksum = float(coef[0, 0])  # b0 has unit sum and all other basis functions sum to zero
    if not ksum > 0:
        raise BadInputError(f"kernel sum {ksum} is not positive in the tile at rows {tile.core[0]}:{tile.core[1]}, "
                            f"columns {tile.core[2]}:{tile.core[3]}: the images do not match")
    tgt_a = tgt[ay0:ay1, ax0:ax1]
    if m.convolved == "ref":
        return (tgt_a - model) / xp.float32(ksum), xp.sqrt(var) / xp.float32(ksum), mask, kernels[0], gram[0, 0]
    return model - tgt_a, xp.sqrt(var), mask, kernels[0], gram[0, 0]


# ---------------------------------------------------------------------------------------------
# The engine


def _settings(settings):
    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        raise ConfigError(f"unknown native subtraction settings: {sorted(unknown)}")
    cfg = {**DEFAULTS, **settings}
    for key in ("new", "ref"):
        if cfg[f"{key}_saturation"] is None:
            cfg[f"{key}_saturation"] = cfg["saturation"]
    return cfg


def _ones(w):
    """[first, last + 1) of the weights equal to 1 (a ramp's plateau, never empty)."""
    idx = numpy.nonzero(w >= 1.0)[0]
    return int(idx[0]), int(idx[-1]) + 1


class _Mosaic:
    """The frame-sized outputs, filled tile by tile: weighted sums in the overlaps, the mask from
    each tile's core (it does not depend on the tile's solution)."""

    def __init__(self, shape, xp):
        self.diff = xp.zeros(shape, dtype=xp.float32)
        self.noise = xp.zeros(shape, dtype=xp.float32)
        self.mask = xp.zeros(shape, dtype=bool)
        self.xp, self.lock = xp, threading.Lock()

    def add(self, tile: Tile, diff, noise, mask):
        y0, y1, x0, x1 = tile.apply
        a, b, c, d = tile.core
        # where both weights are 1 no other tile reaches: copy; blend only the frame around it
        (r0, r1), (q0, q1) = _ones(tile.wy), _ones(tile.wx)
        strips = [(slice(0, r0), slice(None)), (slice(r1, None), slice(None)),
                  (slice(r0, r1), slice(0, q0)), (slice(r0, r1), slice(q1, None))]
        with self.lock:
            self.diff[y0 + r0:y0 + r1, x0 + q0:x0 + q1] = diff[r0:r1, q0:q1]
            self.noise[y0 + r0:y0 + r1, x0 + q0:x0 + q1] = noise[r0:r1, q0:q1]
            for sy, sx in strips:
                w = self.xp.asarray(tile.wy[sy])[:, None] * self.xp.asarray(tile.wx[sx])[None, :]
                out = (slice(y0 + sy.indices(y1 - y0)[0], y0 + sy.indices(y1 - y0)[1]),
                       slice(x0 + sx.indices(x1 - x0)[0], x0 + sx.indices(x1 - x0)[1]))
                self.diff[out] += w * diff[sy, sx]
                self.noise[out] += w * noise[sy, sx]
            self.mask[a:b, c:d] = mask[a - y0:b - y0, c - x0:d - x0]

    def finish(self, hw: int):
        xp = self.xp
        for sl in (numpy.s_[:hw, :], numpy.s_[-hw:, :], numpy.s_[:, :hw], numpy.s_[:, -hw:]):
            self.mask[sl] = True  # edges where the convolution is partial
        self.diff[self.mask] = 0.0
        self.noise[~(self.noise > 0)] = xp.inf
        return self.diff, self.noise, self.mask


def _setup(new, ref, new_var, ref_var, new_mask, ref_mask, cfg, xp, pool, tiles):
    frames = {"new": _Frame(new, new_var, new_mask, cfg["new_saturation"], xp),
              "ref": _Frame(ref, ref_var, ref_mask, cfg["ref_saturation"], xp)}
    stars = {k: _stars(f, tiles, new.shape, pool) for k, f in frames.items()}
    fw = {k: cfg[f"{k}_fwhm"] or stars[k][1] for k in frames}
    if fw["new"] is None or fw["ref"] is None:
        raise BadInputError("too few stars to measure the seeing of both images")
    convolved = direction(fw["new"], fw["ref"], cfg["convolve"])
    target = "new" if convolved == "ref" else "ref"
    sigmas = matching_sigmas(fw[convolved], fw[target], cfg["gauss_sigmas"])
    hw = kernel_half_width(sigmas, cfg["kernel_half"])
    basis = kernel_basis(sigmas, tuple(cfg["gauss_degrees"]), hw, xp)
    m = _Match(src=frames[convolved], tgt=frames[target], cat_src=stars[convolved][0], cat_tgt=stars[target][0],
               basis=basis, spec=(sigmas, tuple(cfg["gauss_degrees"]), hw), hw=hw, convolved=convolved, cfg=cfg, shape=new.shape, xp=xp)
    return m, fw, sigmas


def _one_blas_thread(xp):
    """Each BLAS call on one core: the matrices are small (a few hundred rows), the parallelism
    is the tiles', and OpenBLAS's own threads spinning against busy cores made the fit 3-15x
    slower on two shared cores."""
    if xp is not numpy:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # an older environment: correct, only slower
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


class _Serial:
    """The executor interface without threads: one tile (or a GPU) gains nothing from a pool."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def map(fn, items):
        return map(fn, items)


def subtract_native(new, ref, *, new_var=None, ref_var=None, new_mask=None, ref_mask=None, xp=numpy,
                    **settings):
    cfg = _settings(settings)
    tiles = make_tiles(new.shape, cfg["tile"], cfg["tile_overlap"], cfg["tile_margin"])
    n_threads = min(max(1, int(cfg["threads"])) if xp is numpy else 1, len(tiles))
    with (ThreadPoolExecutor(max_workers=n_threads) if n_threads > 1 else _Serial()) as pool, _one_blas_thread(xp):
        m, fw, sigmas = _setup(new, ref, new_var, ref_var, new_mask, ref_mask, cfg, xp, pool, tiles)
        out = _Mosaic(new.shape, xp)

        def one(tile):
            coef, fit, cut, region, arrays = _solve_tile(m, tile)
            d, n, k, kern, ksq = _apply_tile(m, tile, coef, fit["order"], cut, region, arrays)
            out.add(tile, d, n, k)
            return dict(fit, sum=float(coef[0, 0]), kernel=to_numpy(kern), kernel_sq_sum=float(ksq),
                        bg=[float(c) for c in to_numpy(coef[basis_n(m):, 0])])

        solved = list(pool.map(one, tiles))
    diff, noise, mask = out.finish(m.hw)
    return SubtractionResult(diff=diff, noise=noise, mask=mask, convolved=m.convolved,
                             kernel_info=_kernel_info(m, solved, tiles, fw, sigmas))


def basis_n(m: _Match) -> int:
    return int(m.basis.shape[0])


def _kernel_info(m: _Match, fits, tiles, fw, sigmas):
    """One description of the whole frame: the flux scale is the stamp-weighted mean of the tiles'
    (a transparency change is one number), the kernel the one at the centre of the central tile."""
    sums = numpy.array([f["sum"] for f in fits])
    n = numpy.array([f["n_stamps"] for f in fits], float)
    ksum = float(numpy.sum(sums * n) / n.sum())
    H, W = m.shape
    centre = min(range(len(tiles)), key=lambda i: (sum(tiles[i].core[:2]) / 2 - H / 2) ** 2
                 + (sum(tiles[i].core[2:]) / 2 - W / 2) ** 2)
    c = fits[centre]
    return dict(
        engine="native", sum=ksum, flux_scale=ksum if m.convolved == "ref" else 1.0 / ksum,
        chi2=float(numpy.sum([f["chi2"] * f["n_stamps"] for f in fits]) / n.sum()), n_stamps=int(n.sum()),
        n_stamps_rejected=int(sum(f["n_stamps_rejected"] for f in fits)), n_iter=max(f["n_iter"] for f in fits),
        stamp_xy=[xy for f in fits for xy in f["stamp_xy"]], fwhm_new=float(fw["new"]), fwhm_ref=float(fw["ref"]),
        gauss_sigmas=list(sigmas), gauss_degrees=list(m.cfg["gauss_degrees"]), half_width=m.hw,
        stamp_half=m.cfg["stamp_half"], spatial_order=min(f["order"] for f in fits), bg_order=m.cfg["bg_order"],
        n_basis=basis_n(m), kernel=c["kernel"].astype(numpy.float64), kernel_sq_sum=c["kernel_sq_sum"],
        bg_coeffs=c["bg"], sky_new=(m.src if m.convolved == "new" else m.tgt).sky,
        sky_ref=(m.src if m.convolved == "ref" else m.tgt).sky, n_tiles=len(tiles),
        tile_sums=[float(s) for s in sums], tile_cores=[list(t.core) for t in tiles],
    )
