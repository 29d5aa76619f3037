"""The completeness stage: how faint a transient this stack's search finds, measured every night.

Artificial point sources made from the stack's own PSF (``science.completeness``: the median of
its bright isolated stars) are put at random sites and magnitudes into a COPY of a window of the
stack; the reference is resampled onto that window by the subtract stage's own function, the
window is subtracted by the same engine and settings as the real difference and searched by
``detect_candidates`` with the detect stage's threshold, area and aperture. The fraction found
within ``match_fwhm`` FWHM of its site, against magnitude, is fitted by a logistic.

The window (``window`` px square, centred; the whole stack when smaller) bounds the cost: on a
full 9576x6388 stack a 4096 px window is a quarter of the pixels; measured there (a 2-frame
stack, 600 sources) the stage took 47 CPU s against 103 for its subtract + detect, and peaked
at 2.27 GiB (the reference is read and resampled whole window, the stack rewritten through a
memory map). Sites are spaced
``spacing_fwhm`` FWHM apart so no two blend; magnitudes are drawn uniformly from
``mag_below`` brighter to ``mag_above`` fainter than the stack's 5-sigma point-source depth
estimated from its own variance and PSF. The draw is seeded by ``seed`` and the stack's id,
so a rerun makes the same products.

Products beside the stack (``<stem>`` = its name without ``.fits``): ``<stem>.completeness.json``
(the binned table of mag, injected, recovered, every source, the fit) and
``<stem>.completeness.png``; ``CMPL50``/``CMPL90`` (and ``CMPLHASH``, which marks the work
done) in the stack's primary header, rewritten whole through ``fitsio.put_hdul``. The stack's
pixels and its sidecar stay as they were, so subtract and detect, whose skip-if-done reads the
sidecar's hash, are not made to redo anything. Nothing else is written: the products of subtract
and detect are read, never changed.
"""

from __future__ import annotations

import io
import json
import math
import zlib

import numpy as np
from astropy.io import fits

from .. import config, log, storage
from ..config import settings
from ..errors import BadInputError
from ..fitsio import put_hdul, read_hdul
from ..names import completeness_keys, difference_keys, stem
from ..report import read_header
from ..science import completeness as cm
from ..science.detect import detect_candidates
from ..science.subtract_native import DEFAULTS as NATIVE_DEFAULTS
from ..science.wcsutil import wcs_of
from .base import Night, Timer, input_hash, is_done, read_sidecar, write_sidecar
from .detect import candidate_aperture
from .reference import find_reference, image_zero_point, reference_on_grid, without_difference
from .subtract import choose_engine, run_subtraction

_log = log.get("completeness")

NOT_MEASURED = "not measured"


class Unmeasurable(Exception):
    """A stack whose completeness cannot be measured (too few stars for its PSF, no room for
    sources): said in the result, as a stack without a reference is; no failure of the night."""


def window(shape: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """(y0, y1, x0, x1): the centred square of ``size`` px, clipped to the image."""
    (ny, nx), size = shape, int(size)
    h, w = min(ny, size), min(nx, size)
    y0, x0 = (ny - h) // 2, (nx - w) // 2
    return y0, y0 + h, x0, x0 + w


def window_header(header: fits.Header, box) -> fits.Header:
    """The WCS of the window ``box`` of an image with ``header``'s WCS."""
    h = wcs_of(header).to_header(relax=True)
    h["CRPIX1"] = float(h["CRPIX1"]) - box[2]
    h["CRPIX2"] = float(h["CRPIX2"]) - box[0]
    return h


def _window_arrays(url: str, box, names) -> dict[str, np.ndarray]:
    """The window of each named HDU of a product, read through a memory map."""
    sl = (slice(box[0], box[1]), slice(box[2], box[3]))
    with storage.local_copy(url) as path, fits.open(path, memmap=True) as hdul:
        try:
            return {n: np.array(hdul[n].data[sl]) for n in names}
        except (KeyError, TypeError, ValueError, OSError) as exc:
            raise BadInputError(f"cannot read {', '.join(map(str, names))} ({exc})", path=url) from None


def _seed(cfg: dict, stack: str) -> int:
    return (int(cfg["seed"]) * 1_000_003 + zlib.crc32(stack.encode())) % 2**32


def _det_xy(t) -> np.ndarray:
    return np.c_[np.asarray(t["x"], float), np.asarray(t["y"], float)] if len(t) else np.zeros((0, 2))


def measure(ctx: Night, entry: dict, cfg: dict, det_cfg: dict, sub_cfg: dict, diff_meta: dict) -> dict:
    """Inject, subtract, detect and fit on a window of one stack; the record the products hold."""
    keys = difference_keys(entry["output"])
    stack_url, diff_url = ctx.url(entry["output"]), ctx.url(keys["diff"])
    (header, diff_header, ref_header), box, (new, new_var, new_mask), real = _load_window(ctx, keys, stack_url, cfg)
    fwhm = float(diff_header.get("FWHM") or 0) or float(header.get("PEEING") or 0)
    if not fwhm > 0:
        raise BadInputError("no FWHM in the difference's header", path=diff_url)
    fwhm_new = float(diff_header.get("FWHMNEW") or 0) or fwhm
    zp_new = image_zero_point(header)
    zp_diff = float(diff_header.get("ZP", zp_new or 0.0))
    if zp_new is None:
        raise BadInputError("the stack has no zero point: magnitudes cannot be injected", path=stack_url)
    rng = np.random.default_rng(_seed(cfg, entry["id"]))
    saturation = header.get("SATURATE")
    psf, n_psf, stars = cm.empirical_psf(new, new_var, new_mask, fwhm=fwhm_new, saturation=saturation)
    if psf is None:
        raise Unmeasurable(f"only {n_psf} bright isolated unsaturated stars for the PSF (need {cm.PSF_MIN_STARS})")
    good = ~new_mask & np.isfinite(new_var) & (new_var > 0)
    sigma = math.sqrt(float(np.median(new_var[::2, ::2][good[::2, ::2]])))
    depth = cm.point_source_depth(zp_new, sigma, psf)
    threshold, minarea = float(det_cfg["threshold"]), int(det_cfg["minarea"])
    pixscale = config.instrument(ctx.unit).pixscale
    aper_radius, aper_corr = candidate_aperture(diff_header, header, ref_header or fits.Header(), fwhm, pixscale)
    search = dict(fwhm=fwhm, zp=zp_diff, threshold=threshold, minarea=minarea, aper_radius=aper_radius,
                  aper_corr=aper_corr)
    # what the real difference already holds: sites keep clear of it, so a find is an injection
    before = detect_candidates(real["diff"], real["noise"], real["mask"] != 0, **search)
    xy, mags = _place_sources(cfg, sub_cfg, box, (real["mask"] != 0) | new_mask, psf, stars, before, fwhm, depth, rng)
    del real
    n = len(xy)
    cm.inject(new, new_var, psf, xy, 10 ** (-0.4 * (mags - zp_new)),
              gain=float(header["EGAIN"]) if header.get("EGAIN") else None, rng=rng)
    res = _subtract_injected(ctx, entry, diff_meta, sub_cfg, (header, diff_header), box, (new, new_var, new_mask))
    del new, new_var
    # the real search's noise correction: the artificial stars are signal, and hundreds of them
    # in a small window would widen the S/N map's scatter that measures it (0.94 -> 1.05)
    after = detect_candidates(res.diff, res.noise, res.mask, noise_factor=float(before.meta["NOISECOR"]), **search)
    positive = after[~np.asarray(after["negative"], bool)] if len(after) else after
    found = cm.matched(xy, _det_xy(positive), float(cfg["match_fwhm"]) * fwhm)
    recovered = found >= 0
    mag_found = np.where(recovered, np.asarray(positive["mag"], float)[found] if len(positive) else np.nan, np.nan)
    bright = recovered & (mags < depth - 1.0)  # S/N above ~12: the offset is the flux scale's, not noise
    fit = cm.fit_completeness(mags, recovered)
    ul5 = header.get("UL5_APER")
    return {"stack": entry["id"], "image": storage.basename(entry["output"]), "window": list(box),
            "seed": _seed(cfg, entry["id"]), "psf_stars": n_psf, "psf_size_px": int(psf.shape[0]),
            "fwhm_px": round(fwhm, 3), "zp": round(zp_new, 4), "depth_psf_5sigma": round(depth, 3),
            "ul5_aper": None if ul5 is None else round(float(ul5), 3), "threshold": threshold,
            "n_injected": n, "n_recovered": int(recovered.sum()),
            "mag_offset_bright": _round(float(np.median(mag_found[bright] - mags[bright])) if bright.any() else None),
            "cmpl50": _round(fit["cmpl50"]), "cmpl90": _round(fit["cmpl90"]),
            "fit": {k: _round(v, 4) for k, v in fit.items()},
            "bins": cm.recovery_table(mags, recovered, float(cfg["bin_mag"])),
            "sources": [[round(float(x) + box[2], 2), round(float(y) + box[0], 2), round(float(m), 3), bool(r),
                         _round(float(f))] for (x, y), m, r, f in zip(xy, mags, recovered, mag_found)],
            "sources_columns": ["x", "y", "mag", "recovered", "mag_found"]}


def _load_window(ctx: Night, keys: dict, stack_url: str, cfg: dict):
    """The headers of the stack, its difference and reference; the window measured; the stack's
    pixels, variance and mask there, and the real difference, noise and mask there."""
    diff_url = ctx.url(keys["diff"])
    header, diff_header, ref_header = (read_header(u) for u in (stack_url, diff_url, ctx.url(keys["ref"])))
    if header is None or diff_header is None:
        raise BadInputError("stack or difference header unreadable", path=stack_url if header is None else diff_url)
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    box = window(shape, int(cfg["window"]))
    stack_px = _window_arrays(stack_url, box, (0, "VARIANCE", "MASK"))
    new = stack_px[0].astype(np.float32)
    new_var = stack_px["VARIANCE"].astype(np.float32)
    new_mask = stack_px["MASK"] != 0
    real = {n: _window_arrays(ctx.url(keys[k]), box, (0,))[0] for n, k in (("diff", "diff"), ("noise", "noise"),
                                                                              ("mask", "mask"))}
    return (header, diff_header, ref_header), box, (new, new_var, new_mask), real


def _place_sources(cfg: dict, sub_cfg: dict, box, masked, psf, stars, before, fwhm: float, depth: float, rng):
    """(positions, magnitudes) of the artificial sources: apart, off masked pixels, clear of what
    the real difference holds (so a find is an injection) and of the kernel's stamp stars."""
    spacing = max(float(cfg["spacing_fwhm"]) * fwhm, float(psf.shape[0]))  # two stars' boxes never overlap
    # clear of the stars the subtraction may fit its kernel on: an artificial star in a stamp
    # tilted the fitted background by 0.3 ADU across a small stack (its light has no match in
    # the reference), which made every artificial star 0.1-0.3 mag too faint to find
    stamp_half = int((sub_cfg.get("settings") or {}).get("stamp_half", NATIVE_DEFAULTS["stamp_half"]))
    sites = cm.injection_sites(masked.shape, masked, spacing=spacing,
                               margin=int(math.ceil(float(cfg["edge_fwhm"]) * fwhm)) + psf.shape[0] // 2,
                               clear=float(cfg["clear_fwhm"]) * fwhm, rng=rng,
                               avoid=((_det_xy(before), spacing / 2),
                                      (stars, stamp_half + float(cfg["star_clear_fwhm"]) * fwhm)))
    n = min(int(cfg["n_sources"]), len(sites))
    if n < int(cfg["min_sources"]):
        raise Unmeasurable(f"room for only {n} artificial sources in the {box[1] - box[0]}x{box[3] - box[2]} px "
                           f"window (need {cfg['min_sources']})")
    xy = sites[np.sort(rng.choice(len(sites), n, replace=False))]
    mags = rng.uniform(depth - float(cfg["mag_below"]), depth + float(cfg["mag_above"]), n)
    return xy, mags


def _subtract_injected(ctx: Night, entry: dict, diff_meta: dict, sub_cfg: dict, headers, box, stack_px):
    """The window of the stack, artificial sources in, minus the night's reference, as the
    subtract stage made it (same engine, settings and reference scale)."""
    (header, diff_header), (new, new_var, new_mask) = headers, stack_px
    ref_key = (diff_meta.get("summary") or {}).get("reference") or find_reference(ctx.root, entry["field"],
                                                                                   entry["filter"])
    with read_hdul(ctx.url(ref_key)) as hdul:
        ref_raw, ref_raw_header = np.asarray(hdul[0].data, np.float32), hdul[0].header.copy()
    ref, ref_var, ref_mask = reference_on_grid(ref_raw, ref_raw_header, window_header(header, box), new.shape,
                                               float(diff_header.get("REFSCALE", 1.0)))
    del ref_raw
    res, _ = run_subtraction(new, new_var, new_mask, ref, ref_var, ref_mask, engine=choose_engine(sub_cfg),
                             settings_=sub_cfg.get("settings") or {}, new_saturation=header.get("SATURATE"))
    return res


def _round(v, nd: int = 3):
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def write_header_keys(url: str, cards: dict) -> None:
    """The stack rewritten with ``cards`` in its primary header (None removes a key); its pixels
    and extensions as they were."""
    with storage.local_copy(url) as path, fits.open(path, memmap=True) as hdul:
        h = hdul[0].header
        for key, value in cards.items():
            h.remove(key, ignore_missing=True)
            if value is not None:
                h[key] = value
        put_hdul(url, hdul)


def run(ctx: Night, stack: str) -> dict:
    entry = ctx.item("stack", stack)
    cfg, det_cfg, sub_cfg = settings("completeness"), settings("detect"), settings("subtract")
    keys, out = difference_keys(entry["output"]), completeness_keys(entry["output"])
    result = {"stack": stack, "output": out["table"]}
    diff_url, stack_url, table_url = ctx.url(keys["diff"]), ctx.url(entry["output"]), ctx.url(out["table"])
    if not storage.exists(diff_url):
        return result | without_difference(ctx, entry, diff_url, "measure")
    diff_meta = read_sidecar(diff_url) or {}
    work = input_hash("completeness", [{"diff": keys["diff"], "hash": diff_meta.get("hash")}],
                      {"cfg": cfg, "detect": {k: det_cfg[k] for k in ("threshold", "minarea")}})
    if is_done(table_url, work, ctx.force) and (read_header(stack_url) or {}).get("CMPLHASH") == work:
        log.event(_log, "completeness already measured from the same inputs and settings", stack=stack)
        return result | {"status": "done", "skipped": True, **(read_sidecar(table_url) or {}).get("summary", {})}
    timer = Timer()
    try:
        record = measure(ctx, entry, cfg, det_cfg, sub_cfg, diff_meta)
    except Unmeasurable as exc:
        log.event(_log, NOT_MEASURED, level=30, stack=stack, reason=str(exc))
        return result | {"status": NOT_MEASURED, "reason": str(exc), "output": None, "seconds": timer.seconds}
    storage.put_bytes(ctx.url(out["plot"]), cm.recovery_plot(
        record["bins"], record["fit"], depth=record["depth_psf_5sigma"],
        title=f"{storage.basename(stem(entry['output']))}: {record['n_recovered']} of {record['n_injected']} found"))
    buf = io.StringIO()
    json.dump(record, buf, indent=1)
    storage.put_bytes(table_url, buf.getvalue().encode())
    write_header_keys(stack_url, {
        "CMPL50": None if record["cmpl50"] is None else (record["cmpl50"], "[mag] 50% completeness (injections)"),
        "CMPL90": None if record["cmpl90"] is None else (record["cmpl90"], "[mag] 90% completeness (injections)"),
        "CMPLHASH": (work, "hash of completeness inputs and settings")})
    summary = {"status": "done", "cmpl50": record["cmpl50"], "cmpl90": record["cmpl90"],
               "n_injected": record["n_injected"], "n_recovered": record["n_recovered"],
               "depth_psf_5sigma": record["depth_psf_5sigma"]}
    write_sidecar(table_url, work, stack=stack, summary=summary, products=out)
    log.event(_log, "completeness measured", stack=stack, cmpl50=record["cmpl50"], cmpl90=record["cmpl90"],
              injected=record["n_injected"], recovered=record["n_recovered"], seconds=timer.seconds)
    return result | summary | {"products": out, "seconds": timer.seconds}
