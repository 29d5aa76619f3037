"""The native Alard-Lupton engine: PSF matching by a spatially varying kernel.

Model (Alard & Lupton 1998; Alard 2000): ``target(x, y) = (K_xy * source)(x, y) + B(x, y)``
where ``source`` is the sharper image (it is convolved, so the kernel never deconvolves),
``K_xy = sum_i a_i(x, y) b_i`` over a basis of Gaussians times polynomials, and ``B`` is a
low-order polynomial (the differential sky). All basis functions but the first have zero sum,
and only their coefficients vary over the field, so the photometric scale (the kernel sum)
is one number for the whole image, as it must be for a transparency change.

The fit uses stamps around isolated, unsaturated stars present in both images, spread over a
grid so the spatial terms are constrained everywhere; stamps whose fit is much worse than the
others (variables, blends, cosmic rays) are dropped and the fit redone. Applying the kernel
uses the linearity of the model: ``K_xy * S = sum_k P_k(x, y) (K_k * S)``, one FFT convolution
per spatial term instead of one per pixel.

Everything that touches pixels goes through the array namespace ``xp`` (NumPy or CuPy);
only star finding (sep, a handful of positions) runs on the host.
"""

from __future__ import annotations

import math

import numpy

from gppy_stage.errors import BadInputError
from gppy_stage.xp import to_numpy

DEFAULTS = dict(
    stamp_half=10,          # 21x21 px stamps
    kernel_half=None,       # None: from the Gaussian widths
    gauss_sigmas=None,      # None: (0.5, 1, 2) x sigma_match (HOTPANTS README's rule of thumb)
    gauss_degrees=(6, 4, 2),
    spatial_order=2,
    bg_order=1,
    max_stamps=300,
    stamp_grid=(6, 6),      # stamps are picked round-robin from these cells
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
)

SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))




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


def fft_convolve(images, kernels, xp=numpy, *, fft_shape=None):
    """'same'-size convolution of ``images (..., H, W)`` by centred odd ``kernels (..., K, K)``.

    Zero padding (not wrap-around) outside the image; leading axes broadcast.
    """
    H, W = images.shape[-2:]
    K = kernels.shape[-1]
    hw = K // 2
    if fft_shape is None:
        fft_shape = (_fast_len(H + hw + 1), _fast_len(W + hw + 1))
    fi = xp.fft.rfft2(images, s=fft_shape)
    return _apply_kernel_fft(fi, kernels, fft_shape, (H, W), xp)


def _kernel_fft(kernels, fft_shape, xp):
    hw = kernels.shape[-1] // 2
    kp = xp.zeros(kernels.shape[:-2] + tuple(fft_shape), dtype=kernels.dtype)
    kp[..., : kernels.shape[-2], : kernels.shape[-1]] = kernels
    # the kernel's centre goes to pixel (0, 0) so the output is not shifted
    kp = xp.roll(kp, (-hw, -hw), axis=(-2, -1))
    return xp.fft.rfft2(kp)


def _apply_kernel_fft(fi, kernels, fft_shape, out_hw, xp):
    out = xp.fft.irfft2(fi * _kernel_fft(kernels, fft_shape, xp), s=fft_shape)
    return out[..., : out_hw[0], : out_hw[1]]


def box_dilate(mask, r: int, xp=numpy):
    """Grow a boolean mask by a (2r+1)^2 square, through cumulative sums (exact, any namespace)."""
    if r <= 0:
        return mask.astype(bool)
    m = mask.astype(xp.int32)
    for axis in (0, 1):
        c = xp.cumsum(m, axis=axis)
        n = m.shape[axis]
        pad_shape = list(m.shape)
        pad_shape[axis] = 1
        c = xp.concatenate([xp.zeros(pad_shape, dtype=c.dtype), c], axis=axis)
        hi = xp.clip(xp.arange(n) + r + 1, 0, n)
        lo = xp.clip(xp.arange(n) - r, 0, n)
        m = xp.take(c, hi, axis=axis) - xp.take(c, lo, axis=axis)
    return m > 0


def poly_terms(u, v, order: int):
    """[u^i v^j for i + j <= order], lowest order first (1, u, v, u^2, uv, v^2, ...)."""
    out = []
    for n in range(order + 1):
        for j in range(n + 1):
            out.append(u ** (n - j) * v ** j)
    return out


def _norm_coords(x, y, shape):
    ny, nx = shape
    return (x - (nx - 1) / 2.0) / max((nx - 1) / 2.0, 1.0), (y - (ny - 1) / 2.0) / max((ny - 1) / 2.0, 1.0)


def kernel_basis(sigmas, degrees, half: int, xp=numpy):
    """(n, 2h+1, 2h+1) basis: b0 a unit-sum Gaussian, the rest zero-sum and unit-norm."""
    yy, xx = xp.mgrid[-half:half + 1, -half:half + 1].astype(xp.float64)
    xs, ys = xx / half, yy / half  # polynomial in scaled coordinates keeps x^6 near 1
    basis = []
    for s, deg in zip(sigmas, degrees):
        g = xp.exp(-(xx**2 + yy**2) / (2.0 * s * s))
        for n in range(deg + 1):
            for j in range(n + 1):
                basis.append(g * xs ** (n - j) * ys ** j)
    b0 = basis[0] / basis[0].sum()
    out = [b0]
    for b in basis[1:]:
        b = b - b.sum() * b0  # zero sum: these may vary over the field without changing flux
        out.append(b / xp.sqrt((b * b).sum()))
    return xp.stack(out)


# ---------------------------------------------------------------------------------------------
# Star finding and stamp choice (host side, a few hundred positions)


def find_stars(image, var, bad, *, snr: float = 5.0):
    """sep detections on a background-subtracted host image: a structured array."""
    import sep

    data = numpy.ascontiguousarray(image, dtype=numpy.float64)
    err = numpy.ascontiguousarray(numpy.sqrt(var), dtype=numpy.float64)
    sep.set_extract_pixstack(max(300000, data.size // 4))
    objs = sep.extract(data, snr, err=err, mask=numpy.ascontiguousarray(bad, dtype=bool), minarea=5,
                       deblend_cont=0.005)
    # aperture S/N with the real per-pixel errors: sep's isophotal flux carries no error
    flux, ferr, _ = sep.sum_circle(data, objs["x"], objs["y"], 5.0, err=err, mask=bad, subpix=1)
    return objs, flux / numpy.maximum(ferr, 1e-30)


def _fwhm_from(cat, image):
    import sep

    objs, snr_all = cat
    good = (objs["flag"] == 0) & (objs["flux"] > 0)
    if good.sum() < 3:
        return None
    o = objs[good]
    rhalf, _ = sep.flux_radius(numpy.ascontiguousarray(image, dtype=numpy.float64), o["x"], o["y"],
                               6.0 * o["a"], 0.5, subpix=5)
    snr = snr_all[good]
    top = numpy.argsort(-snr)[: max(10, len(o) // 3)]
    # half-light diameter: equals the FWHM for a Gaussian; for Moffat a little larger, which
    # biases both images alike and so does not change which one is sharper
    return float(numpy.median(2.0 * rhalf[top]))


def _match(xa, ya, xb, yb, radius):
    """Index in b of the nearest b within radius of each a (-1 if none)."""
    from scipy.spatial import cKDTree

    if len(xb) == 0:
        return numpy.full(len(xa), -1)
    d, j = cKDTree(numpy.c_[xb, yb]).query(numpy.c_[xa, ya], distance_upper_bound=radius)
    return numpy.where(numpy.isfinite(d), j, -1)


def choose_stamps(src_cat, tgt_cat, bad_host, shape, *, stamp_half, kernel_half, snr, sat_src, sat_tgt,
                  grid, max_stamps):
    """Integer centres of stamp stars: in both images, isolated, unsaturated, clear of masks."""
    from scipy.spatial import cKDTree

    ny, nx = shape
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
    keep &= (cx >= edge) & (cx < nx - edge) & (cy >= edge) & (cy < ny - edge)
    # isolation: no other detection (in either image) inside the stamp
    allxy = numpy.r_[numpy.c_[src_objs["x"], src_objs["y"]], numpy.c_[tgt_objs["x"], tgt_objs["y"]]]
    tree = cKDTree(allxy)
    counts = numpy.array([len(tree.query_ball_point((a, b), stamp_half)) for a, b in zip(s["x"], s["y"])])
    keep &= counts <= 2  # itself, once per image
    idx = numpy.nonzero(keep)[0]
    r = stamp_half + kernel_half
    idx = numpy.array([i for i in idx if not bad_host[cy[i] - r:cy[i] + r + 1, cx[i] - r:cx[i] + r + 1].any()], int)
    if len(idx) == 0:
        return numpy.zeros((0, 2), int)
    # spread over the field: best S/N first within each cell, cells taken in turn
    gx, gy = grid
    cell = (cx[idx] * gx // nx) * gy + (cy[idx] * gy // ny)
    order = numpy.argsort(-s_snr[idx])
    ranked = {}
    for k in order:
        ranked.setdefault(cell[k], []).append(idx[k])
    picked, depth = [], 0
    while len(picked) < max_stamps and any(depth < len(v) for v in ranked.values()):
        for v in ranked.values():
            if depth < len(v) and len(picked) < max_stamps:
                picked.append(v[depth])
        depth += 1
    picked = numpy.array(picked, int)
    return numpy.c_[cx[picked], cy[picked]]



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


def fit_kernel(src, tgt, src_var, tgt_var, centres, basis, *, stamp_half, spatial_order, bg_order,
               clip_sigma, max_iter, min_stamps, xp=numpy):
    """Least-squares kernel + background coefficients with stamp-level clipping.

    Returns (coef (nb + nbg, nk) array with unfitted combinations zero, info dict).
    """
    nb, K = basis.shape[0], basis.shape[-1]
    hw = K // 2
    S = 2 * stamp_half + 1
    shape = src.shape
    ns = len(centres)
    src_cut = _stamp_stack(src, centres, stamp_half + hw, xp)
    conv = fft_convolve(src_cut[:, None], basis[None], xp)[..., hw:hw + S, hw:hw + S]  # (ns, nb, S, S)
    t = _stamp_stack(tgt, centres, stamp_half, xp).reshape(ns, S * S)
    vt = _stamp_stack(tgt_var, centres, stamp_half, xp).reshape(ns, S * S)
    vs = _stamp_stack(src_var, centres, stamp_half, xp).reshape(ns, S * S)
    off = xp.arange(-stamp_half, stamp_half + 1, dtype=xp.float64)
    cxs = xp.asarray(centres[:, 0], dtype=xp.float64)
    cys = xp.asarray(centres[:, 1], dtype=xp.float64)
    px = cxs[:, None, None] + off[None, None, :] + 0 * off[None, :, None]
    py = cys[:, None, None] + off[None, :, None] + 0 * off[None, None, :]
    pu, pv = _norm_coords(px, py, shape)
    bg_cols = [b.reshape(ns, S * S) for b in poly_terms(pu, pv, bg_order)]
    D = xp.concatenate([conv.reshape(ns, nb, S * S), xp.stack(bg_cols, axis=1)], axis=1)  # (ns, nc, npix)
    D = xp.transpose(D, (0, 2, 1))
    nc = D.shape[-1]
    su, sv = _norm_coords(cxs, cys, shape)
    P = xp.stack(poly_terms(su, sv, spatial_order), axis=1)  # (ns, nk)
    nk = P.shape[1]
    # unknowns: b0 constant; b1.. with every spatial term; background terms are per-pixel already
    sel = [0] + [i * nk + k for i in range(1, nb) for k in range(nk)] + [(nb + j) * nk for j in range(nc - nb)]
    sel = xp.asarray(sel)

    good = numpy.ones(ns, bool)
    ksq = 1.0
    coef_full = None
    chi2 = None
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        # the convolved source's variance is var * sum(K^2); a first guess of 1 is refined below
        w = 1.0 / (vt + vs * ksq)
        gmask = xp.asarray(good)
        Dg, wg, tg, Pg = D[gmask], w[gmask], t[gmask], P[gmask]
        G = xp.einsum("spi,sp,spj->sij", Dg, wg, Dg)
        r = xp.einsum("spi,sp,sp->si", Dg, wg, tg)
        Q = Pg[:, :, None] * Pg[:, None, :]
        N = xp.tensordot(G, Q, axes=([0], [0]))  # (nc, nc, nk, nk)
        N = xp.transpose(N, (0, 2, 1, 3)).reshape(nc * nk, nc * nk)
        R = (r[:, :, None] * Pg[:, None, :]).sum(axis=0).reshape(nc * nk)
        Ns = N[sel][:, sel]
        Rs = R[sel]
        d = 1.0 / xp.sqrt(xp.maximum(xp.diag(Ns), 1e-300))
        # Jacobi scaling, then lstsq: Gaussians times high-degree polynomials are nearly
        # collinear, and a pseudo-inverse is the safe way through that
        y = xp.linalg.lstsq(Ns * d[:, None] * d[None, :], Rs * d, rcond=1e-12)[0]
        coef = xp.zeros(nc * nk, dtype=xp.float64)
        coef[sel] = y * d
        coef_full = coef.reshape(nc, nk)
        alpha = P @ coef_full.T  # (ns, nc): per-stamp effective coefficients
        model = xp.einsum("spi,si->sp", D, alpha)
        kern_c = xp.tensordot(coef_full[:nb, 0], basis, axes=(0, 0))
        ksq_new = float((kern_c * kern_c).sum())
        resid = t - model
        chi2 = to_numpy(((resid * resid) * (1.0 / (vt + vs * ksq_new))).mean(axis=1))
        g = chi2[good]
        med = numpy.median(g)
        mad = 1.4826 * numpy.median(numpy.abs(g - med))
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
    return coef_full, info


# ---------------------------------------------------------------------------------------------
# The engine


def _prepare(img, var, mask, sat, xp):
    img = xp.asarray(img, dtype=xp.float64)
    bad = ~xp.isfinite(img)
    if mask is not None:
        bad |= xp.asarray(mask).astype(bool)
    if sat is not None:
        bad |= img >= sat
    sub = img[::4, ::4][~bad[::4, ::4]]
    if sub.size < 100:
        raise BadInputError("fewer than 100 good pixels in an input image")
    sky = float(xp.median(sub))
    sig = float(1.4826 * xp.median(xp.abs(sub - sky)))
    if var is None:
        var = xp.full(img.shape, sig * sig, dtype=xp.float64)
    else:
        var = xp.asarray(var, dtype=xp.float64)
        bad |= ~xp.isfinite(var) | (var <= 0)
    img = xp.where(bad, 0.0, img - sky)
    var = xp.where(bad, 0.0, var)
    return img, var, bad, sky


def subtract_native(new, ref, *, new_var=None, ref_var=None, new_mask=None, ref_mask=None, xp=numpy,
                    **settings):
    from gppy_stage.science.subtract import SubtractionResult

    unknown = set(settings) - set(DEFAULTS)
    if unknown:
        from gppy_stage.errors import ConfigError

        raise ConfigError(f"unknown native subtraction settings: {sorted(unknown)}")
    cfg = {**DEFAULTS, **settings}
    sat_new = cfg["new_saturation"] if cfg["new_saturation"] is not None else cfg["saturation"]
    sat_ref = cfg["ref_saturation"] if cfg["ref_saturation"] is not None else cfg["saturation"]
    n_img, n_var, n_bad, n_sky = _prepare(new, new_var, new_mask, sat_new, xp)
    r_img, r_var, r_bad, r_sky = _prepare(ref, ref_var, ref_mask, sat_ref, xp)
    shape = n_img.shape

    h_new, h_ref = to_numpy(n_img), to_numpy(r_img)
    h_nbad, h_rbad = to_numpy(n_bad), to_numpy(r_bad)
    o_new = find_stars(h_new, to_numpy(n_var) + h_nbad, h_nbad)
    o_ref = find_stars(h_ref, to_numpy(r_var) + h_rbad, h_rbad)
    fw_new = cfg["new_fwhm"] or _fwhm_from(o_new, h_new)
    fw_ref = cfg["ref_fwhm"] or _fwhm_from(o_ref, h_ref)
    if fw_new is None or fw_ref is None:
        raise BadInputError("too few stars to measure the seeing of both images")
    convolved = cfg["convolve"] or ("ref" if fw_ref <= fw_new else "new")
    if convolved == "ref":
        src, src_var, src_bad, o_src, sat_src = r_img, r_var, r_bad, o_ref, sat_ref
        tgt, tgt_var, tgt_bad, o_tgt, sat_tgt = n_img, n_var, n_bad, o_new, sat_new
        fw_src, fw_tgt = fw_ref, fw_new
    else:
        src, src_var, src_bad, o_src, sat_src = n_img, n_var, n_bad, o_new, sat_new
        tgt, tgt_var, tgt_bad, o_tgt, sat_tgt = r_img, r_var, r_bad, o_ref, sat_ref
        fw_src, fw_tgt = fw_new, fw_ref
    sky_sub = {"new": n_sky, "ref": r_sky}

    s_match = math.sqrt(max((fw_tgt * SIGMA_PER_FWHM) ** 2 - (fw_src * SIGMA_PER_FWHM) ** 2, 0.5**2))
    sigmas = tuple(cfg["gauss_sigmas"] or (max(0.5 * s_match, 0.6), max(s_match, 0.9), max(2.0 * s_match, 1.5)))
    degrees = tuple(cfg["gauss_degrees"])
    hw = int(cfg["kernel_half"] or min(max(math.ceil(3.0 * max(sigmas)), 5), 25))
    basis = kernel_basis(sigmas, degrees, hw, xp)

    centres = choose_stamps(o_src, o_tgt, h_nbad | h_rbad, shape, stamp_half=cfg["stamp_half"], kernel_half=hw,
                            snr=cfg["stamp_snr"], sat_src=None if sat_src is None else sat_src - sky_sub[convolved],
                            sat_tgt=None if sat_tgt is None else sat_tgt - sky_sub["new" if convolved == "ref" else "ref"],
                            grid=cfg["stamp_grid"], max_stamps=cfg["max_stamps"])
    spatial_order = cfg["spatial_order"]
    nb = basis.shape[0]
    # each spatial order needs enough stamps to pin down its nb * nk unknowns across the field
    while spatial_order > 0 and len(centres) < 3 * (spatial_order + 1) * (spatial_order + 2) // 2:
        spatial_order -= 1
    if len(centres) < cfg["min_stamps"]:
        raise BadInputError(f"only {len(centres)} usable stamp stars (need {cfg['min_stamps']})")
    coef, fit = fit_kernel(src, tgt, src_var, tgt_var, centres, basis, stamp_half=cfg["stamp_half"],
                           spatial_order=spatial_order, bg_order=cfg["bg_order"], clip_sigma=cfg["clip_sigma"],
                           max_iter=cfg["max_iter"], min_stamps=cfg["min_stamps"], xp=xp)

    # ---- apply: sum_k P_k(x, y) (K_k * src) + B(x, y)
    kernels = xp.tensordot(coef[:nb].T, basis, axes=(1, 0))  # (nk, K, K)
    nk = kernels.shape[0]
    H, W = shape
    fft_shape = (_fast_len(H + hw + 1), _fast_len(W + hw + 1))
    f_src = xp.fft.rfft2(src, s=fft_shape)
    yy = xp.arange(H, dtype=xp.float64)[:, None]
    xx = xp.arange(W, dtype=xp.float64)[None, :]
    u, v = _norm_coords(xx, yy, shape)
    model = xp.zeros(shape, dtype=xp.float64)
    for k, pk in enumerate(poly_terms(u, v, spatial_order)):
        model += pk * _apply_kernel_fft(f_src, kernels[k], fft_shape, shape, xp)
    del f_src
    for j, pj in enumerate(poly_terms(u, v, cfg["bg_order"])):
        model += float(coef[nb + j, 0]) * pj
    ksum = float(coef[0, 0])  # b0 has unit sum and all other basis functions sum to zero
    if not ksum > 0:
        raise BadInputError(f"kernel sum {ksum} is not positive: the images do not match")

    # ---- noise: var_tgt + var_src * K^2. The convolution uses the central kernel; its
    # spatial change is carried by sum K(x,y)^2 (exact on a flat-variance sky)
    gram = xp.einsum("kab,lab->kl", kernels, kernels)
    ksq_c = float(gram[0, 0])
    terms = poly_terms(u, v, spatial_order)
    ksq_map = xp.zeros(shape, dtype=xp.float64)
    for k in range(nk):
        for l in range(nk):
            ksq_map += float(gram[k, l]) * (terms[k] * terms[l])
    var_conv = fft_convolve(src_var, kernels[0] ** 2, xp, fft_shape=fft_shape)
    var_conv = xp.maximum(var_conv, 0.0) * (ksq_map / ksq_c)
    var = tgt_var + var_conv

    mask = box_dilate(src_bad, hw, xp) | tgt_bad
    border = xp.zeros(shape, dtype=bool)
    border[:hw, :] = True
    border[-hw:, :] = True
    border[:, :hw] = True
    border[:, -hw:] = True
    mask |= border

    if convolved == "ref":
        diff = (tgt - model) / ksum
        noise = xp.sqrt(var) / ksum
        flux_scale = ksum
    else:
        diff = model - tgt
        noise = xp.sqrt(var)
        flux_scale = 1.0 / ksum
    diff = xp.where(mask, 0.0, diff)
    noise = xp.where(noise > 0, noise, xp.inf)

    kernel_info = dict(
        engine="native", sum=ksum, flux_scale=flux_scale, chi2=fit["chi2"], n_stamps=fit["n_stamps"],
        n_stamps_rejected=fit["n_stamps_rejected"], n_iter=fit["n_iter"], stamp_xy=fit["stamp_xy"],
        fwhm_new=float(fw_new), fwhm_ref=float(fw_ref), gauss_sigmas=list(sigmas), gauss_degrees=list(degrees),
        half_width=hw, stamp_half=cfg["stamp_half"], spatial_order=spatial_order, bg_order=cfg["bg_order"],
        n_basis=int(nb), kernel=to_numpy(kernels[0]), kernel_sq_sum=ksq_c,
        bg_coeffs=[float(c) for c in to_numpy(coef[nb:, 0])], sky_new=n_sky, sky_ref=r_sky,
    )
    return SubtractionResult(diff=diff, noise=noise, mask=mask, convolved=convolved, kernel_info=kernel_info)
