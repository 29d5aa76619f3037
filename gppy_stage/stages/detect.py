"""The detect stage: transient candidates on a stack's difference image.

``science.detect.detect_candidates`` runs on ``<stem>.diff.fits`` with the difference's WCS and
zero point, the field's reference catalogue (``ref_cat/gaiaxp_dr3_synphot_<OBJECT>.csv``: a
candidate on a catalogued star is flagged ``ref_star``) and, for the ``moving`` flag, the
photometry stage's catalogue of every science frame of the field that night (``phot/*.phot.cat``,
sources above the detection threshold; every filter, so the night's other stacks too): an asteroid
lies on a straight track through the frames while a real transient stays put
(``science.moving``). A moving candidate gets ``rate_arcsec_h`` and ``pa_deg`` (east of north; NaN
otherwise), and where ``ref_cat/sso/<night>.csv`` (predicted positions of known solar-system
objects: name, ra, dec, mjd, err_arcsec; ``science.moving.read_ephemeris``) is in storage, a
candidate within its error of an object's position at the stack's mid-time gets its ``sso_name``.
The moving candidates go in the result (``moving``) for the night report to link across stacks.
A candidate too faint for the frames' catalogues (a mover of S/N ~10 in a stack is ~6 in each of
three frames) is measured where the frames are: ``centroid_movers`` differences a small cut-out of
each frame of its stack (``stages.forced``'s) and fits a line through the flux's centroids.

Products beside the stack: ``<stem>.cand.ecsv`` (every candidate: ra, dec, mag, magerr, snr,
flags, score and the flag columns), ``<stem>.cand.reg`` (DS9) and ``<stem>.stamps/cand_<id>.png``
for the candidates that pass: the trained real/bogus probability ``rb_score``
(``science.realbogus``) at least ``rb_threshold`` and no flag outside ``pass_flags``. Each candidate
carries its host in the reference (``science.host``: ``host_ra``, ``host_dec``, ``host_sep`` arcsec,
``host_dlr`` offset in directional light radii, ``host_mag``, ``host_rh`` arcsec).
Images are memory-mapped: the stack and the reference are only cut out for stamps.
"""

from __future__ import annotations

import io
import math

import numpy as np
from astropy.table import Table

from .. import config, log, storage
from ..config import settings
from ..errors import BadInputError
from ..science.astrometry import observation_time
from ..science.detect import APER_FWHM, FLAG_BITS, candidate_score, detect_candidates, growth_correction, growth_radii
from ..science.stamps import candidate_stamps, region_text
from ..science.wcsutil import wcs_of
from .base import Night, Timer, input_hash, is_done, read_sidecar, write_sidecar
from .cutouts import Reference, StackFrames, frame_cut, primary_images, reference_cut, seeing_px, stack_frames
from .forced import light_curves
from .photometry import product_keys as phot_keys
from .stack import stem
from .subtract import product_keys, without_difference

_log = log.get("detect")


def candidate_keys(stack_key: str) -> dict[str, str]:
    s = stem(stack_key)
    return {"table": f"{s}.cand.ecsv", "regions": f"{s}.cand.reg", "stamps": f"{s}.stamps"}


def reference_catalogue(root: str, field: str, when, obs: str = "") -> Table | None:
    """ra/dec of the field's reference catalogue at the observation epoch (None when storage has
    none): the site's catalogue (refcat.locate; 7DT's Gaia XP where ``obs`` names no other), read
    as every stage reads it, so column maps and proper motions apply here too."""
    from ..science import refcat

    found = refcat.locate(obs, field, lambda key: storage.exists(storage.join(root, key)))
    if found is None:
        return None
    key, kind = found
    table = refcat.read_refcat(storage.get_bytes(storage.join(root, key)), kind=kind, name=key)
    if when is not None:
        table = refcat.at_epoch(table, when)
    return Table({"ra": np.asarray(table["ra"], float), "dec": np.asarray(table["dec"], float)})


def passing(table: Table, rb_threshold: float, pass_flags: int) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(0, bool)
    flags = np.asarray(table["flags"], int)
    return (np.asarray(table["rb_score"], float) >= rb_threshold) & ((flags & ~int(pass_flags)) == 0)


def add_realbogus_and_hosts(t: Table, img: dict, fwhm: float, wcs, refcat, pixscale: float, zp: float) -> None:
    """``rb_score`` and the host columns, in place, from the stamps of the images in ``img``."""
    from ..science import host, realbogus

    stars = wcs.world_to_pixel_values(np.asarray(refcat["ra"]), np.asarray(refcat["dec"])) if refcat is not None else None
    t["rb_score"] = realbogus.score_candidates(t, img["diff"][0], img["noise"][0], img["mask"][0], img["ref"][0],
                                               fwhm, star_xy=stars)
    h = host.associate(img["ref"][0], t["x"], t["y"], fwhm=fwhm, pixel_scale=pixscale,
                       zp=float(img["ref"][1].get("ZP", zp)))
    found = np.asarray(h["host_x"]) >= 0
    hra, hdec = (wcs.pixel_to_world_values(np.asarray(h["host_x"]), np.asarray(h["host_y"])) if len(t)
                 else (np.zeros(0), np.zeros(0)))
    t["host_ra"] = np.where(found, hra, np.nan)
    t["host_dec"] = np.where(found, hdec, np.nan)
    for col in ("host_sep", "host_dlr", "host_mag", "host_rh"):
        t[col] = np.asarray(h[col], float)


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
            raise BadInputError(f"photometry catalogue unreadable ({exc})", path=ctx.url(key)) from None
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


def candidate_aperture(diff_header, stack_header, ref_header, fwhm: float, pixscale: float) -> tuple[float, float]:
    """(radius px, total / aperture flux) for candidate fluxes: ``APER_FWHM`` FWHM, kept inside
    the growth curve the photometry stage measured on the image whose PSF the difference has
    (the stack's, unless the stack was the one convolved and the reference has a curve)."""
    psf_header = stack_header
    if diff_header.get("CONVOLV") == "new" and len(growth_radii(ref_header, pixscale)[0]) >= 2:
        psf_header = ref_header
    radii, _ = growth_radii(psf_header, pixscale)
    radius = APER_FWHM * fwhm
    if len(radii) >= 2:
        radius = float(np.clip(radius, radii[0], radii[-1]))
    return radius, growth_correction(psf_header, radius, pixscale) or 1.0


def run(ctx: Night, stack: str) -> dict:
    entry = ctx.item("stack", stack)
    cfg = settings("detect")
    keys = product_keys(entry["output"])
    ckeys = candidate_keys(entry["output"])
    result = {"stack": stack, "output": ckeys["table"]}
    diff_url = ctx.url(keys["diff"])
    if not storage.exists(diff_url):
        return result | without_difference(ctx, entry, diff_url, "search")
    diff_meta = read_sidecar(diff_url) or {}
    stack_meta = read_sidecar(ctx.url(entry["output"])) or {}
    moving = cfg.get("moving", "catalogues") != "none" and bool(stack_meta.get("frames"))
    frame_cats, cat_keys, notes = (frame_catalogues(ctx, entry["field"], float(cfg["threshold"])) if moving
                                   else ([], [], []))
    if moving and len(frame_cats) < 2:
        notes.append({"frame": "*", "reason": "fewer than 2 frame catalogues of the field: no moving flag"})
        frame_cats = []
    span = stack_span(ctx, stack_meta.get("frames") or entry["frames"])
    sso_url = ctx.url(sso_key(ctx.night))
    sso = (config.settings_hash(storage.get_bytes(sso_url).decode(errors="replace")) if storage.exists(sso_url)
           else None)
    work = input_hash("detect", [{"diff": keys["diff"], "hash": diff_meta.get("hash")}, cat_keys, sso], cfg)
    table_url = ctx.url(ckeys["table"])
    if is_done(table_url, work, ctx.force):
        log.event(_log, "already searched from the same inputs and settings", stack=stack)
        return result | {"status": "done", "skipped": True, **(read_sidecar(table_url) or {}).get("summary", {})}
    timer = Timer()
    urls = {"diff": diff_url, "noise": ctx.url(keys["noise"]), "mask": ctx.url(keys["mask"]),
            "new": ctx.url(entry["output"]), "ref": ctx.url(keys["ref"])}
    with primary_images(urls) as img, stack_frames(ctx, entry) as frames:
        header, stack_header = img["diff"][1].copy(), img["new"][1].copy()
        wcs = wcs_of(header)
        zp = float(header.get("ZP", 0.0))
        pixscale = config.instrument(ctx.unit).pixscale
        fwhm = float(header.get("FWHM") or 0) or float(stack_header.get("SEEINGIN", 2.5)) / pixscale
        refcat = reference_catalogue(ctx.root, entry["field"], observation_time(stack_header), ctx.unit)
        aper_radius, aper_corr = candidate_aperture(header, stack_header, img["ref"][1], fwhm, pixscale)
        # memory-mapped in: the kernel reads each image once, the stamps only their cut-outs
        t = detect_candidates(img["diff"][0], img["noise"][0], img["mask"][0], fwhm=fwhm, wcs=wcs, zp=zp,
                              threshold=float(cfg["threshold"]), minarea=int(cfg["minarea"]), ref_catalog=refcat,
                              frame_detections=frame_cats or None, aper_radius=aper_radius, aper_corr=aper_corr,
                              frame_times=[c.meta["MJD"] for c in frame_cats] if frame_cats else None, span=span,
                              frame_groups=[c.meta["STACK"] for c in frame_cats] if frame_cats else None,
                              max_rate_arcsec_h=float(cfg.get("max_rate_arcsec_h", 400.0)))
        sso_used = known_objects(ctx, t, span)
        add_realbogus_and_hosts(t, img, fwhm, wcs, refcat, pixscale, zp)
        cen_notes = centroid_movers(frames, stack_meta.get("frames") or [], t, wcs, fwhm, span,
                                    float(cfg["threshold"]), pixscale) if moving else []
        ok = passing(t, float(cfg["rb_threshold"]), int(cfg["pass_flags"]))
        stamps = candidate_stamps(img["new"][0], img["ref"][0], img["diff"][0], t[ok], half=int(cfg["stamp_half"]),
                                  noise=img["noise"][0], max_stamps=int(cfg["max_stamps"]))
        curves, lc_notes = light_curves(ctx, entry, frames, stack_meta.get("frames") or [], t[ok], img, aper_radius,
                                        aper_corr, max_candidates=int(cfg["max_stamps"]))
    t["pass"] = ok
    t.meta.update({"STACK": storage.basename(entry["output"]), "DIFF": storage.basename(keys["diff"]),
                   "FWHM_PX": fwhm, "THRESH": float(cfg["threshold"]), "MINSCORE": float(cfg["min_score"]),
                   "RBTHRESH": float(cfg["rb_threshold"]),
                   "MOVING": "catalogues" if frame_cats else "none", "NFRAMES": len(frame_cats),
                   "MJDSTART": span[0], "MJDEND": span[1], "SSOFILE": sso_used or "",
                   "APER_PX": aper_radius, "APERCORR": aper_corr})
    buf = io.StringIO()
    t.write(buf, format="ascii.ecsv")
    for old in storage.list_objects(ctx.url(ckeys["stamps"])):  # a re-run may pass other candidates
        storage.delete(old.url)
    for cid, png in stamps.items():
        storage.put_bytes(ctx.url(ckeys["stamps"], f"cand_{cid:04d}.png"), png)
    for name, data in curves.items():  # cand_NNNN.lc.ecsv and .lc.png beside the stamp
        storage.put_bytes(ctx.url(ckeys["stamps"], name), data)
    storage.put_bytes(ctx.url(ckeys["regions"]), region_text(t, good_score=float(cfg["min_score"])).encode())
    storage.put_bytes(table_url, buf.getvalue().encode())
    order = np.argsort(-np.asarray(t["rb_score"], float)) if len(t) else []
    top = [_row(t[i]) for i in order if ok[i]][: int(settings("notify")["top_candidates"]) * 2]
    for row in top:
        if row["id"] in stamps:
            row["stamp"] = f"{ckeys['stamps']}/cand_{row['id']:04d}.png"
        if f"cand_{row['id']:04d}.lc.ecsv" in curves:  # the night report lists it with the candidate
            row["light_curve"] = f"{ckeys['stamps']}/cand_{row['id']:04d}.lc.ecsv"
    summary = {"status": "done", "n_candidates": len(t), "n_pass": int(ok.sum()), "zp": zp, "fwhm_px": round(fwhm, 3),
               "flag_counts": {name: int(np.sum(np.asarray(t[name], bool))) for name in FLAG_BITS} if len(t) else {},
               "moving_from": len(frame_cats), "moving": moving_rows(t, span), "notes": notes + cen_notes, "top": top,
               "stamps": len(stamps),
               "light_curves": len(curves) // 2, "forced_notes": lc_notes}
    write_sidecar(table_url, work, stack=stack, summary=summary, products=ckeys)
    log.event(_log, "searched", stack=stack, candidates=len(t), passing=int(ok.sum()), seconds=timer.seconds)
    return result | summary | {"products": ckeys, "seconds": timer.seconds}


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
    from .stack import has_celestial_wcs, zero_point

    header = hdul[idx].header
    zp, _ = zero_point(header, ("ZP",) + tuple(settings("stack")["zp_keys"]))
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


def moving_rows(t: Table, span: tuple[float, float]) -> list[dict]:
    """The moving candidates, for the night report's linking (``report.link_movers``): where
    each was at the stack's mid-time (its position on the stacked difference), its rate, angle,
    magnitude and known name."""
    mid = 0.5 * (span[0] + span[1])
    rows = []
    for r in t[np.asarray(t["moving"], bool)] if len(t) else []:
        row = _row(r)
        rows.append({k: row[k] for k in ("id", "ra", "dec", "mag", "snr", "rb_score")} |
                    {"mjd": round(mid, 6), "half_span_h": round((span[1] - span[0]) * 12.0, 4),
                     "rate_arcsec_h": round(float(r["rate_arcsec_h"]), 2), "pa_deg": round(float(r["pa_deg"]), 1),
                     "sso_name": str(r["sso_name"]) if "sso_name" in r.colnames and r["sso_name"] else None})
    return rows


def _row(r) -> dict:
    def num(v, nd):
        v = float(v)
        return round(v, nd) if math.isfinite(v) else None

    return {"id": int(r["id"]), "ra": num(r["ra"], 6), "dec": num(r["dec"], 6), "mag": num(r["mag"], 3),
            "magerr": num(r["magerr"], 3), "snr": num(r["snr"], 1), "score": num(r["score"], 3), "flags": int(r["flags"]),
            "rb_score": num(r["rb_score"], 3), "host_sep": num(r["host_sep"], 2), "host_dlr": num(r["host_dlr"], 2),
            "host_mag": num(r["host_mag"], 2)}
