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
three frames) is measured where the frames are: ``stages.movers.centroid_movers`` differences a
small cut-out of each frame of its stack and fits a line through the flux's centroids. It and the
forced light curves (``stages.forced``) are served by one opening of each frame of the stack and
of the reference (``stages.cutouts.StackFrames``).

Products beside the stack: ``<stem>.cand.ecsv`` (every candidate: ra, dec, mag, magerr, snr,
flags, score and the flag columns), ``<stem>.cand.reg`` (DS9) and ``<stem>.stamps/cand_<id>.png``
for the candidates that pass: the trained real/bogus probability ``rb_score``
(``science.realbogus``) at least ``rb_threshold`` and no flag outside ``pass_flags``. Each candidate
carries its host in the reference (``science.host``: ``host_ra``, ``host_dec``, ``host_sep`` arcsec,
``host_dlr`` offset in directional light radii, ``host_mag``, ``host_rh`` arcsec).
Images are memory-mapped: the stack and the reference are only cut out for stamps.

``run`` reads the inputs and decides whether the work is done (``_inputs``), searches
(``_search``), turns what it found into product files (``_product_files``) and writes them.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from astropy.table import Table

from .. import config, log, storage
from ..names import candidate_keys, difference_keys
from ..config import settings
from ..science.astrometry import observation_time
from ..science.detect import FLAG_BITS, detect_candidates
from ..science.stamps import candidate_stamps, region_text
from ..science.wcsutil import wcs_of
from .base import Night, Timer, input_hash, is_done, read_sidecar, write_sidecar
from .cutouts import StackFrames, primary_images, stack_frames
from . import forced
from .movers import centroid_movers, frame_catalogues, known_objects, sso_key, stack_span
from .reference import without_difference

_log = log.get("detect")


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


def candidate_aperture(diff_header, stack_header, ref_header, fwhm: float, pixscale: float) -> tuple[float, float]:
    """(radius px, total / aperture flux) for candidate fluxes: ``APER_FWHM`` FWHM, kept inside
    the growth curve the photometry stage measured on the image whose PSF the difference has
    (the stack's, unless the stack was the one convolved and the reference has a curve)."""
    return forced.aperture(forced.psf_header(diff_header.get("CONVOLV"), stack_header, ref_header, pixscale), fwhm,
                           pixscale)


def run(ctx: Night, stack: str) -> dict:
    entry = ctx.item("stack", stack)
    cfg = settings("detect")
    keys, ckeys = difference_keys(entry["output"]), candidate_keys(entry["output"])
    result = {"stack": stack, "output": ckeys["table"]}
    diff_url = ctx.url(keys["diff"])
    if not storage.exists(diff_url):
        return result | without_difference(ctx, entry, diff_url, "search")
    inputs = _inputs(ctx, entry, cfg, keys["diff"])
    table_url = ctx.url(ckeys["table"])
    if is_done(table_url, inputs.work, ctx.force):
        log.event(_log, "already searched from the same inputs and settings", stack=stack)
        return result | {"status": "done", "skipped": True, **(read_sidecar(table_url) or {}).get("summary", {})}
    timer = Timer()
    urls = {"diff": diff_url, "noise": ctx.url(keys["noise"]), "mask": ctx.url(keys["mask"]),
            "new": ctx.url(entry["output"]), "ref": ctx.url(keys["ref"])}
    with primary_images(urls) as img, stack_frames(ctx, entry) as frames:
        found = _search(ctx, entry, cfg, inputs, img, frames)
    for old in storage.list_objects(ctx.url(ckeys["stamps"])):  # a re-run may pass other candidates
        storage.delete(old.url)
    for key, data in _product_files(found, entry, keys, ckeys, cfg, inputs).items():  # the table last
        storage.put_bytes(ctx.url(key), data)
    summary = _summary(found, inputs, ckeys)
    write_sidecar(table_url, inputs.work, stack=stack, summary=summary, products=ckeys)
    log.event(_log, "searched", stack=stack, candidates=len(found.t), passing=int(found.ok.sum()),
              seconds=timer.seconds)
    return result | summary | {"products": ckeys, "seconds": timer.seconds}


@dataclass(frozen=True)
class _Inputs:
    """What a search is made from, known before the images are opened."""
    frames: list[str]          # the stack's frames, by its sidecar ([] without one)
    span: tuple[float, float]  # MJD of the first start and the last end of the stack's frames
    moving: bool               # whether to look for movers
    frame_cats: list[Table]    # the night's frame catalogues for the moving flag ([] for none)
    notes: list[dict]
    work: str                  # the input hash the skip rule compares


def _inputs(ctx: Night, entry: dict, cfg: dict, diff_key: str) -> _Inputs:
    diff_meta = read_sidecar(ctx.url(diff_key)) or {}
    stack_meta = read_sidecar(ctx.url(entry["output"])) or {}
    moving = cfg.get("moving", "catalogues") != "none" and bool(stack_meta.get("frames"))
    frame_cats, cat_keys, notes = (frame_catalogues(ctx, entry["field"], float(cfg["threshold"])) if moving
                                   else ([], [], []))
    if moving and len(frame_cats) < 2:
        notes.append({"frame": "*", "reason": "fewer than 2 frame catalogues of the field: no moving flag"})
        frame_cats = []
    sso_url = ctx.url(sso_key(ctx.night))
    sso = (config.settings_hash(storage.get_bytes(sso_url).decode(errors="replace")) if storage.exists(sso_url)
           else None)
    work = input_hash("detect", [{"diff": diff_key, "hash": diff_meta.get("hash")}, cat_keys, sso], cfg)
    return _Inputs(stack_meta.get("frames") or [], stack_span(ctx, stack_meta.get("frames") or entry["frames"]),
                   moving, frame_cats, notes, work)


@dataclass(frozen=True)
class _Found:
    """A search's results: the candidate table (with ``pass``) and what the passing ones get."""
    t: Table
    ok: np.ndarray
    fwhm: float
    zp: float
    aperture: tuple[float, float]  # (radius px, total / aperture flux)
    sso_used: str | None
    stamps: dict[int, bytes]
    curves: dict[str, bytes]
    centroid_notes: list[dict]
    forced_notes: list[dict]


def _search(ctx: Night, entry: dict, cfg: dict, inputs: _Inputs, img: dict, frames: StackFrames) -> _Found:
    """Candidates on the difference in ``img``, flagged, scored and given hosts; stamps and light
    curves of those that pass."""
    header, stack_header = img["diff"][1].copy(), img["new"][1].copy()
    wcs, zp = wcs_of(header), float(header.get("ZP", 0.0))
    pixscale = config.instrument(ctx.unit).pixscale
    fwhm = float(header.get("FWHM") or 0) or float(stack_header.get("SEEINGIN", 2.5)) / pixscale
    refcat = reference_catalogue(ctx.root, entry["field"], observation_time(stack_header), ctx.unit)
    aper_radius, aper_corr = candidate_aperture(header, stack_header, img["ref"][1], fwhm, pixscale)
    cats = inputs.frame_cats
    # memory-mapped in: the kernel reads each image once, the stamps only their cut-outs
    t = detect_candidates(img["diff"][0], img["noise"][0], img["mask"][0], fwhm=fwhm, wcs=wcs, zp=zp,
                          threshold=float(cfg["threshold"]), minarea=int(cfg["minarea"]), ref_catalog=refcat,
                          frame_detections=cats or None, aper_radius=aper_radius, aper_corr=aper_corr,
                          frame_times=[c.meta["MJD"] for c in cats] if cats else None, span=inputs.span,
                          frame_groups=[c.meta["STACK"] for c in cats] if cats else None,
                          max_rate_arcsec_h=float(cfg.get("max_rate_arcsec_h", 400.0)))
    sso_used = known_objects(ctx, t, inputs.span)
    add_realbogus_and_hosts(t, img, fwhm, wcs, refcat, pixscale, zp)
    cen_notes = centroid_movers(frames, inputs.frames, t, wcs, fwhm, inputs.span, float(cfg["threshold"]),
                                pixscale) if inputs.moving else []
    ok = passing(t, float(cfg["rb_threshold"]), int(cfg["pass_flags"]))
    stamps = candidate_stamps(img["new"][0], img["ref"][0], img["diff"][0], t[ok], half=int(cfg["stamp_half"]),
                              noise=img["noise"][0], max_stamps=int(cfg["max_stamps"]))
    curves, lc_notes = forced.light_curves(ctx, entry, frames, inputs.frames, t[ok], img, aper_radius, aper_corr,
                                           max_candidates=int(cfg["max_stamps"]))
    t["pass"] = ok
    return _Found(t, ok, fwhm, zp, (aper_radius, aper_corr), sso_used, stamps, curves, cen_notes, lc_notes)


def _product_files(found: _Found, entry: dict, keys: dict, ckeys: dict, cfg: dict, inputs: _Inputs) -> dict[str, bytes]:
    """{key: bytes} of the products, in the order they are written: stamps, light curves
    (``cand_NNNN.lc.ecsv`` and ``.lc.png`` beside the stamp), regions, and the table last."""
    t = found.t
    t.meta.update({"STACK": storage.basename(entry["output"]), "DIFF": storage.basename(keys["diff"]),
                   "FWHM_PX": found.fwhm, "THRESH": float(cfg["threshold"]), "MINSCORE": float(cfg["min_score"]),
                   "RBTHRESH": float(cfg["rb_threshold"]),
                   "MOVING": "catalogues" if inputs.frame_cats else "none", "NFRAMES": len(inputs.frame_cats),
                   "MJDSTART": inputs.span[0], "MJDEND": inputs.span[1], "SSOFILE": found.sso_used or "",
                   "APER_PX": found.aperture[0], "APERCORR": found.aperture[1]})
    buf = io.StringIO()
    t.write(buf, format="ascii.ecsv")
    files = {f"{ckeys['stamps']}/cand_{cid:04d}.png": png for cid, png in found.stamps.items()}
    files |= {f"{ckeys['stamps']}/{name}": data for name, data in found.curves.items()}
    files[ckeys["regions"]] = region_text(t, good_score=float(cfg["min_score"])).encode()
    files[ckeys["table"]] = buf.getvalue().encode()
    return files


def _summary(found: _Found, inputs: _Inputs, ckeys: dict) -> dict:
    """The stage's result, kept in the table's sidecar: counts, notes, the moving candidates and
    the best passing ones with their stamp and light curve."""
    t, ok = found.t, found.ok
    order = np.argsort(-np.asarray(t["rb_score"], float)) if len(t) else []
    top = [_row(t[i]) for i in order if ok[i]][: int(settings("notify")["top_candidates"]) * 2]
    for row in top:
        if row["id"] in found.stamps:
            row["stamp"] = f"{ckeys['stamps']}/cand_{row['id']:04d}.png"
        if f"cand_{row['id']:04d}.lc.ecsv" in found.curves:  # the night report lists it with the candidate
            row["light_curve"] = f"{ckeys['stamps']}/cand_{row['id']:04d}.lc.ecsv"
    return {"status": "done", "n_candidates": len(t), "n_pass": int(ok.sum()), "zp": found.zp,
            "fwhm_px": round(found.fwhm, 3),
            "flag_counts": {name: int(np.sum(np.asarray(t[name], bool))) for name in FLAG_BITS} if len(t) else {},
            "moving_from": len(inputs.frame_cats), "moving": moving_rows(t, inputs.span),
            "notes": inputs.notes + found.centroid_notes, "top": top, "stamps": len(found.stamps),
            "light_curves": len(found.curves) // 2, "forced_notes": found.forced_notes}


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
