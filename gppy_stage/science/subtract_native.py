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
only star finding (sep, a handful of positions) runs on the host. The basis and the stamp fit
are in ``kernel_fit``, the tiling and stitching in ``tiles``, the FFT convolution in ``convolve``.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy

from gppy_stage.errors import BadInputError, ConfigError
from gppy_stage.science.convolve import apply_kernel_fft, box_dilate, fast_len, fft_convolve, fft_module
from gppy_stage.science.kernel import (GAUSS_DEGREES, SubtractionResult, direction, find_stars, fwhm_of,
                                       half_light_diameters, kernel_half_width, matching_sigmas, sky_level)
from gppy_stage.science.kernel_fit import choose_stamps, fit_kernel, kernel_basis, norm_coords, poly_exponents
from gppy_stage.science.tiles import Mosaic, Tile, grow, local, make_tiles
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


def _poly_image(coeffs: dict, u, v, xp):
    """sum c_ij u^i v^j on the grid of 1-D ``u`` (columns) and ``v`` (rows), one row sum per power
    of v, so a full-size image costs a few array operations instead of one per term."""
    out = xp.zeros((v.shape[0], u.shape[0]), dtype=xp.float32)
    for j in sorted({j for _, j in coeffs}):
        row = sum(float(c) * u ** i for (i, jj), c in coeffs.items() if jj == j)
        out += (v ** j)[:, None].astype(xp.float32) * xp.asarray(row, dtype=xp.float32)[None, :]
    return out


# ---------------------------------------------------------------------------------------------
# The inputs


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
    box = grow(tile.core, 16, shape)
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


def _in_box(cat, box):
    """The catalogue entries inside ``box``, shifted to its origin."""
    objs, snr = cat
    y0, y1, x0, x1 = box
    keep = (objs["x"] >= x0) & (objs["x"] < x1 - 1) & (objs["y"] >= y0) & (objs["y"] < y1 - 1)
    objs = objs[keep].copy()
    objs["x"] -= x0
    objs["y"] -= y0
    return objs, snr[keep]


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
        fit_box = grow(tile.fit, margin, m.shape)
        cut = grow(fit_box, reach, m.shape)
        src, src_var, src_bad = m.src.cut(cut)
        tgt, tgt_var, tgt_bad = m.tgt.cut(cut)
        region = local(fit_box, cut)
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
    ay0, ay1, ax0, ax1 = local(tile.apply, cut)
    cy0, cy1, cx0, cx1 = max(ay0 - hw, 0), min(ay1 + hw, src.shape[0]), max(ax0 - hw, 0), min(ax1 + hw, src.shape[1])
    conv_in = src[cy0:cy1, cx0:cx1]
    fft_shape = (fast_len(cy1 - cy0 + hw + 1), fast_len(cx1 - cx0 + hw + 1))
    out_hw, off = (ay1 - ay0, ax1 - ax0), (ay0 - cy0, ax0 - cx0)
    kernels = xp.tensordot(coef[:nb].T, m.basis, axes=(1, 0)).astype(xp.float32)  # (nk, K, K)
    u, v = norm_coords(xp.arange(ax0, ax1, dtype=xp.float64), xp.arange(ay0, ay1, dtype=xp.float64), region)
    f_src = fft_module(xp).rfft2(conv_in, s=fft_shape)
    model = _poly_image({e: c for e, c in zip(poly_exponents(m.cfg["bg_order"]), to_numpy(coef[nb:, 0]))}, u, v, xp)
    for k, (i, j) in enumerate(poly_exponents(order)):
        conv = apply_kernel_fft(f_src, kernels[k], fft_shape, out_hw, xp, off)
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
    from threadpoolctl import threadpool_limits

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
        out = Mosaic(new.shape, xp)

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
