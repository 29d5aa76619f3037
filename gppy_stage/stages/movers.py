"""The detect stage's moving objects, read where earlier stages left them: the photometry
stage's catalogues of the night's frames (``frame_catalogues``, for ``science.moving``'s tracks
through frames and stacks), the stack's time span, known solar-system objects from
``ref_cat/sso/<night>.csv`` (``known_objects``) and, for a candidate too faint for the frames'
catalogues (a mover of S/N ~10 in a stack is ~6 in each of three frames), per-frame centroids on
cut-outs of each frame of its stack minus the reference (``centroid_movers``, ``stages.cutouts``).
"""

from __future__ import annotations

import io

import numpy as np
from astropy.table import Table

from .. import storage
from ..config import settings
from ..errors import BadInputError
from ..names import phot_keys
from ..science.detect import FLAG_BITS, candidate_score
from ..science.wcsutil import has_celestial_wcs, wcs_of
from .base import Night
from .cutouts import Reference, StackFrames, frame_cut, reference_cut, seeing_px
from .reference import image_zero_point


# SExtractor FLAGS: the object is truncated at the image boundary (8), an aperture incomplete (16)
TRUNCATED = 8 | 16
# what the moving search reads of a frame's catalogue: half the time of reading all ~90 columns
# (2.6 s for 30 000 rows, a full-size frame's), and the night's frames are read one by one
CATALOGUE_COLUMNS = ("ALPHA_J2000", "DELTA_J2000", "FLUX_AUTO", "FLUXERR_AUTO", "FLAGS")


def frame_catalogues(ctx: Night, field: str, threshold: float) -> tuple[list[Table], list[str], list[dict]]:
    """ra/dec of the sources above ``threshold`` (S/N of FLUX_AUTO) of every science frame of
    ``field`` this night (every filter, so the night's other stacks' frames too: photometry has run
    on all of them before any stack), from the photometry stage's catalogues; each table's meta
    ``MJD`` is its frame's mid-exposure, ``STACK`` the stack it belongs to. With the catalogue keys used and a note per frame left out."""
    tables, keys, notes = [], [], []
    for fr in sorted((f for f in ctx.plan()["frames"] if f.get("object") == field), key=lambda f: f["date_obs"]):
        key = phot_keys(fr["output"])[0]
        if not storage.exists(ctx.url(key)):
            notes.append({"frame": fr["id"], "reason": "no photometry catalogue"})
            continue
        try:
            cat = Table.read(io.BytesIO(storage.get_bytes(ctx.url(key))), format="ascii.ecsv",
                             include_names=list(CATALOGUE_COLUMNS))
            flux, err = np.asarray(cat["FLUX_AUTO"], float), np.asarray(cat["FLUXERR_AUTO"], float)
            ra, dec = np.asarray(cat["ALPHA_J2000"], float), np.asarray(cat["DELTA_J2000"], float)
            flags = np.asarray(cat["FLAGS"], int) if "FLAGS" in cat.colnames else np.zeros(len(cat), int)
        except (ValueError, KeyError) as exc:
            raise BadInputError(f"photometry catalogue unreadable ({exc})", path=ctx.url(key)) from exc
        with np.errstate(divide="ignore", invalid="ignore"):
            keep = (err > 0) & (flux / err >= threshold) & np.isfinite(ra) & np.isfinite(dec)
        keep &= (flags & TRUNCATED) == 0  # a source cut by the frame's edge has a centroid off its track
        table = Table({"ra": ra[keep], "dec": dec[keep]})
        table.meta["MJD"] = _mjd(fr["date_obs"]) + float(fr["exptime"]) / 2 / 86400.0
        table.meta["STACK"] = fr.get("stack") or fr["filter"]
        tables.append(table)
        keys.append(key)
    return tables, keys, notes


def _mjd(iso: str) -> float:
    from astropy.time import Time

    return float(Time(iso, scale="utc").mjd)


def stack_span(ctx: Night, frame_ids: list[str]) -> tuple[float, float]:
    """MJD of the first start and the last end of the stack's frames."""
    frames = {f["id"]: f for f in ctx.plan()["frames"]}
    mine = [frames[f] for f in frame_ids if f in frames]
    return (min(_mjd(f["date_obs"]) for f in mine),
            max(_mjd(f["date_obs"]) + float(f["exptime"]) / 86400.0 for f in mine))


def sso_key(night: str) -> str:
    return f"ref_cat/sso/{night}.csv"


def known_objects(ctx: Night, t: Table, span: tuple[float, float]) -> str | None:
    """``sso_name`` in place: the known solar-system object (``ref_cat/sso/<night>.csv``, see
    ``science.moving.read_ephemeris``) each candidate lies within the positional error of, at
    the stack's mid-time; "" for none. The file's key, or None when storage has none."""
    from ..science import moving as mv

    url = ctx.url(sso_key(ctx.night))
    if not storage.exists(url):
        t["sso_name"] = np.array([""] * len(t), dtype="U32")
        return None
    eph = mv.read_ephemeris(storage.get_bytes(url), url)
    t["sso_name"] = mv.match_known(np.asarray(t["ra"], float), np.asarray(t["dec"], float), eph, span)
    return sso_key(ctx.night)


# per-frame centroids on cut-outs: the most candidates measured (by S/N) and the cut-out's half side
CENTROID_MAX = 20
CENTROID_HALF = 32


def centroid_movers(frames: StackFrames, frame_ids: list[str], t: Table, wcs, fwhm: float,
                    span: tuple[float, float], threshold: float, pixscale: float) -> list[dict]:
    """Flag ``moving`` in place the candidates the catalogues could not link (a faint mover is
    under the photometry catalogues' S/N in each frame) whose position changes across the frames
    of their own stack: each frame minus the reference on a small cut-out (``stages.cutouts``),
    the flux's centroid there (``science.moving.residual_centroid``) taken to the stack's grid
    through the two WCSs, and a straight line fitted (``science.moving.centroid_motion``). A
    static transient's centroids agree within their errors and it stays put. Notes on frames
    that could not be measured."""
    todo = np.flatnonzero(~np.asarray(t["moving"], bool) & ~np.asarray(t["negative"], bool)
                          & (np.asarray(t["snr"], float) >= threshold)) if len(t) else []
    todo = sorted(todo, key=lambda i: -float(t["snr"][i]))[:CENTROID_MAX]
    if not len(todo) or len(frame_ids) < 2 or frames.reference() is None:
        return []
    ra, dec = np.asarray(t["ra"], float)[todo], np.asarray(t["dec"], float)[todo]
    cols, ts, notes = _centroid_columns(frames, frame_ids, ra, dec, wcs, fwhm, pixscale)
    if len(ts) < 2:
        return notes
    _flag_centroid_movers(t, todo, ts, cols, wcs, fwhm, span)
    t["score"] = candidate_score(t, threshold)
    return notes


def _centroid_columns(frames: StackFrames, frame_ids, ra, dec, wcs, fwhm, pixscale):
    """([(x, y, error) columns of each measured frame], its mid-exposure MJDs, notes on the others)."""
    cols, ts, notes = [], [], []
    for fid in frame_ids:
        if frames.frame_url(fid) is None:
            notes.append({"frame": fid, "reason": "no calibrated frame for centroids"})
            continue
        with frames.frame(fid) as (hdul, idx):
            c = _frame_centroids(hdul, idx, ra, dec, frames.reference(), wcs, fwhm, pixscale)
        if c is None:
            notes.append({"frame": fid, "reason": "no WCS, zero point or VARIANCE for centroids"})
            continue
        cols.append(c)
        fr = frames.plan_frame(fid)
        ts.append(_mjd(fr["date_obs"]) + float(fr["exptime"]) / 2 / 86400.0)
    frames.release_reference()
    return cols, ts, notes


def _flag_centroid_movers(t: Table, todo, ts, cols, wcs, fwhm: float, span: tuple[float, float]) -> None:
    """``moving``, its rate and angle and flag bit, in place, for the candidates ``todo`` whose
    centroids ``cols`` (per frame, at times ``ts``) lie on a line that beats staying put."""
    from ..science import moving as mv

    t0 = 0.5 * (span[0] + span[1])
    max_rate = float(settings("detect").get("max_rate_arcsec_h", 400.0)) * 1.2
    for k, i in enumerate(todo):
        moves, vx, vy, x0, y0 = mv.centroid_motion(ts, [c[0][k] for c in cols], [c[1][k] for c in cols],
                                                   [c[2][k] for c in cols], t0, min_motion=0.3 * fwhm)
        if not moves:
            continue
        rate, pa = mv.rate_and_pa(wcs, [x0], [y0], [vx], [vy], per_hour=24.0)
        if not rate[0] <= max_rate:
            continue
        t["moving"][i] = True
        t["rate_arcsec_h"][i], t["pa_deg"][i] = rate[0], pa[0]
        t["flags"][i] = int(t["flags"][i]) | FLAG_BITS["moving"]


def _frame_centroids(hdul, idx, ra, dec, ref: Reference, wcs, fwhm, pixscale):
    """(x, y, error) on the stack's grid of the difference flux near each (ra, dec) in one frame
    (NaN where none), or None when the frame cannot be differenced."""
    from ..science import forced, moving as mv

    header = hdul[idx].header
    zp = image_zero_point(header)
    if not has_celestial_wcs(header) or zp is None or "VARIANCE" not in [h.name for h in hdul]:
        return None
    scale = 10 ** (0.4 * (zp - ref.zp)) if ref.zp is not None else 1.0
    seeing, ref_seeing = (seeing_px(h, pixscale) for h in (header, ref.header))
    fw = wcs_of(header)
    px, py = fw.world_to_pixel_values(ra, dec)
    out = np.full((3, len(ra)), np.nan)
    for k, (x, y) in enumerate(zip(np.atleast_1d(px), np.atleast_1d(py))):
        box = forced.cutout_box(hdul[idx].data.shape, float(x), float(y), CENTROID_HALF)
        if box is None:
            continue
        # the Gaussian kernel, not the native engine the light curves try first: what it leaves of a
        # host is the same in every frame, so it moves no centroid, and it costs a fraction
        try:
            new, var, mask, grid = frame_cut(hdul, idx, box)
            d = forced.difference(new, var, mask, *reference_cut(ref.data, ref.header, grid, new.shape, scale),
                                  fwhm_new=seeing, fwhm_ref=ref_seeing, native=False)
        except BadInputError:
            continue
        cx, cy, err = mv.residual_centroid(d.diff, d.noise, d.mask, float(x) - box[2], float(y) - box[0],
                                           seeing or d.fwhm or fwhm)
        if np.isfinite(cx):
            sra, sdec = fw.pixel_to_world_values(cx + box[2], cy + box[0])
            sx, sy = wcs.world_to_pixel_values(sra, sdec)
            out[:, k] = float(sx), float(sy), err  # the frame's and the stack's pixels are alike in size
    return out
