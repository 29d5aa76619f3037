"""Forced light curves of a stack's passing candidates: the detect stage's I/O for ``science.forced``.

For each frame of the stack (its calibrated product: SCI, VARIANCE, MASK and the photometry
stage's WCS, zero point and growth curve) and each passing candidate, only a box of
``2 * forced_half`` px around the candidate's sky position is read, through a memory map; the
reference frame is cut around the same sky, resampled onto the box's grid by SWarp and put on
the frame's zero point (``stages.cutouts``: the frames and the reference are opened once for
this and the detect stage's per-frame centroids); ``science.forced``
subtracts the two once and measures the flux at the fixed position. The stack's own difference
gives one more row at the same position. So memory and time grow with candidates x frames
times a cut-out, never with the frame size.

Products, beside the candidate's stamp: ``cand_NNNN.lc.ecsv`` (``science.forced.LC_COLUMNS``) and
``cand_NNNN.lc.png`` (``science.stamps.light_curve_png``).
"""

from __future__ import annotations

import io
import math

import numpy as np
from astropy.table import Table

from .. import config, log, storage
from ..errors import BadInputError
from ..science.wcsutil import has_celestial_wcs, wcs_of
from ..science import forced
from ..science.astrometry import observation_time
from ..science.detect import APER_FWHM, aperture_noise_factor, growth_correction, growth_radii
from ..science.stamps import light_curve_png
from .base import Night, Timer
from .cutouts import Reference, StackFrames, frame_cut, reference_cut, seeing_px
from .reference import image_zero_point

_log = log.get("forced")

FORCED_HALF = 128     # px: half the side of a cut-out
# A Gaussian kernel leaves a host galaxy's light where the PSFs are Moffats (15 % of a transient's
# flux 1.6" from a 14 mag host on the full-size night), so before falling back to it the native
# engine is tried on a box this many times wider, where a sparse field has its stamp stars.
KERNEL_WIDEN = 4


def psf_header(convolved: str | None, header, ref_header, pixscale: float):
    """The header whose growth curve describes a difference's PSF: the image not convolved, so the
    reference's where the new image was the one convolved and the reference has a curve."""
    if convolved == "new" and len(growth_radii(ref_header, pixscale)[0]) >= 2:
        return ref_header
    return header


def aperture(psf_header, fwhm: float, pixscale: float) -> tuple[float, float]:
    """(radius px, total / aperture flux) of a candidate's flux: ``APER_FWHM`` FWHM, kept inside
    the growth curve of the image whose PSF the difference has (``psf_header``)."""
    radii, _ = growth_radii(psf_header, pixscale)
    radius = APER_FWHM * fwhm
    if len(radii) >= 2:
        radius = float(np.clip(radius, radii[0], radii[-1]))
    return radius, growth_correction(psf_header, radius, pixscale) or 1.0


def _row(mjd, filt, name, kind, flux, err, zp, method, radius) -> dict:
    f, e = forced.to_microjansky(flux, err, zp)
    return {"mjd": mjd, "filter": filt, "frame": name, "kind": kind, "flux_ujy": f, "flux_err_ujy": e, "zp": zp,
            "method": method, "aper_px": radius} | forced.magnitudes(f, e)


def _difference_at(hdul, idx, x, y, ref, scale, seeing, ref_seeing, half):
    """(difference, its box) around (x, y): the native engine on the cut-out, then on a box
    ``KERNEL_WIDEN`` times wider, then the Gaussian kernel on the cut-out."""
    saturation = hdul[idx].header.get("SATURATE")
    cuts = {}
    for h in (half, KERNEL_WIDEN * half):
        box = forced.cutout_box(hdul[idx].data.shape, x, y, h)
        if box in cuts:
            continue
        new, var, mask, grid = frame_cut(hdul, idx, box)
        cuts[box] = (new, var, mask, *reference_cut(ref.data, ref.header, grid, new.shape, scale))
        try:
            return forced.native_difference(*cuts[box], saturation=saturation), box
        except BadInputError:
            continue
    box = forced.cutout_box(hdul[idx].data.shape, x, y, half)
    return forced.difference(*cuts[box], fwhm_new=seeing, fwhm_ref=ref_seeing, native=False), box


def _frame_rows(hdul, idx, name, cands, ref: Reference, filt, pixscale, half) -> tuple[dict[int, dict], list[dict]]:
    """{candidate id: light-curve row} of one frame, and notes for the candidates it could not measure."""
    header = hdul[idx].header
    if not has_celestial_wcs(header):
        return {}, [{"frame": name, "reason": "no celestial WCS"}]
    zp = image_zero_point(header)
    if zp is None:
        return {}, [{"frame": name, "reason": "no zero point"}]
    scale = 10 ** (0.4 * (zp - ref.zp)) if ref.zp is not None else 1.0
    when = observation_time(header)
    mjd = float(when.mjd) + float(header.get("EXPTIME", 0.0)) / 2 / 86400 if when is not None else math.nan
    seeing, ref_seeing = (seeing_px(h, pixscale) for h in (header, ref.header))
    xs, ys = wcs_of(header).world_to_pixel_values(np.asarray(cands["ra"], float), np.asarray(cands["dec"], float))
    rows, notes = {}, []
    for cid, x, y in zip(np.asarray(cands["id"], int), np.atleast_1d(xs), np.atleast_1d(ys)):
        box = forced.cutout_box(hdul[idx].data.shape, float(x), float(y), half)
        if box is None:
            notes.append({"frame": name, "id": int(cid), "reason": "position off the frame"})
            continue
        try:
            d, box = _difference_at(hdul, idx, float(x), float(y), ref, scale, seeing, ref_seeing, half)
        except BadInputError as exc:
            notes.append({"frame": name, "id": int(cid), "reason": exc.reason})
            continue
        # the difference has the PSF of the image not convolved; the reference's growth curve, where
        # it has one, describes it when that is the reference
        fwhm = (seeing or d.fwhm) if d.convolved == "ref" else d.fwhm
        radius, corr = aperture(psf_header(d.convolved, header, ref.header, pixscale), fwhm, pixscale)
        flux, err, ok = forced.forced_flux(d, float(x) - box[2], float(y) - box[0], radius, corr)
        if not ok:
            notes.append({"frame": name, "id": int(cid), "reason": "aperture masked or off the cut-out"})
            continue
        rows[int(cid)] = _row(mjd, filt, name, "frame", flux, err, zp, d.method, radius)
    return rows, notes


def _stack_rows(img, cands, aper_radius, aper_corr, half) -> dict[int, dict]:
    """The same measurement on the stack's difference, with its noise correlation (SWarp's
    resampling) measured by random apertures around the candidate, as the detect stage does."""
    diff, header = img["diff"]
    zp = float(header.get("ZP", 0.0))
    when = observation_time(img["new"][1])
    mjd = float(when.mjd) if when is not None else math.nan
    rows = {}
    for r in cands:
        box = forced.cutout_box(diff.shape, float(r["x"]), float(r["y"]), half)
        if box is None:
            continue
        sl = (slice(box[0], box[1]), slice(box[2], box[3]))
        d = np.asarray(diff[sl], np.float32)
        n = np.asarray(img["noise"][0][sl], np.float32)
        bad = (np.asarray(img["mask"][0][sl]) != 0) | ~(n > 0)
        x, y = float(r["x"]) - box[2], float(r["y"]) - box[0]
        factor = aperture_noise_factor(np.where(bad, 0, d), np.where(bad, 0, n), bad, aper_radius, [x], [y])
        flux, err, ok = forced.aperture_flux(d, n, bad, x, y, aper_radius, aper_corr)
        if ok:
            rows[int(r["id"])] = _row(mjd, str(header.get("FILTER", "")), storage.basename(str(header.get("STACK", ""))),
                                      "stack", flux, err * factor, zp, "stack", aper_radius)
    return rows


def light_curves(ctx: Night, entry: dict, frames: StackFrames, frame_ids: list[str], cands: Table, img: dict,
                 aper_radius: float, aper_corr: float, *, max_candidates: int | None = None,
                 half: int = FORCED_HALF) -> tuple[dict[str, bytes], list[dict]]:
    """{file name in the stamps folder: bytes} for each candidate's light curve (the best
    ``max_candidates`` by score, as the stamps), and notes on what could not be measured.
    ``frames`` holds the stack's calibrated frames and reference (``stages.cutouts``), ``img``
    the detect stage's memory-mapped images of the stack."""
    if "score" in cands.colnames:
        cands = cands[np.argsort(-np.asarray(cands["score"], float), kind="stable")]
    cands = cands[:max_candidates]
    if len(cands) == 0:
        return {}, []
    timer = Timer()
    ref = frames.reference()
    if ref is None:
        return {}, [{"frame": "*", "reason": "no reference frame"}]
    per_cand, notes = _frames_rows(frames, frame_ids, cands, ref, entry["filter"],
                                   config.instrument(ctx.unit).pixscale, half)
    for cid, row in _stack_rows(img, cands, aper_radius, aper_corr, half).items():
        per_cand[cid].append(row)
    files = {}
    for r in cands:
        files |= _curve_files(r, per_cand[int(r["id"])], entry)
    log.event(_log, "forced light curves", stack=entry["id"], candidates=len(cands), frames=len(frame_ids),
              notes=len(notes), seconds=timer.seconds)
    return files, notes


def _frames_rows(frames: StackFrames, frame_ids, cands, ref: Reference, filt, pixscale,
                 half) -> tuple[dict[int, list[dict]], list[dict]]:
    """{candidate id: its rows on the single frames}, and notes on what could not be measured."""
    per_cand: dict[int, list[dict]] = {int(c): [] for c in cands["id"]}
    notes = []
    for fid in frame_ids:
        url = frames.frame_url(fid)
        if url is None:
            notes.append({"frame": fid, "reason": "no calibrated frame"})
            continue
        with frames.frame(fid) as (hdul, idx):
            if "VARIANCE" not in [h.name for h in hdul]:
                notes.append({"frame": fid, "reason": "no VARIANCE extension"})
                continue
            rows, why = _frame_rows(hdul, idx, storage.basename(url), cands, ref, filt, pixscale, half)
        notes += why
        for cid, row in rows.items():
            per_cand[cid].append(row)
    frames.release_reference()
    return per_cand, notes


def _curve_files(r, rows: list[dict], entry: dict) -> dict[str, bytes]:
    """The light-curve table (ECSV) and panel (PNG) of candidate row ``r``: frames by time, then the stack."""
    cid = int(r["id"])
    rows = sorted(rows, key=lambda row: (row["kind"] == "stack", row["mjd"]))
    t = forced.light_curve_table(rows, {"CAND": cid, "RA": float(r["ra"]), "DEC": float(r["dec"]),
                                        "STACK": storage.basename(entry["output"])})
    buf = io.StringIO()
    t.write(buf, format="ascii.ecsv")
    png = light_curve_png(t, title=f"#{cid}  {entry['filter']}  RA {float(r['ra']):.5f} Dec {float(r['dec']):.5f}")
    return {f"cand_{cid:04d}.lc.ecsv": buf.getvalue().encode(), f"cand_{cid:04d}.lc.png": png}
