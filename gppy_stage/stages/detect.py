"""The detect stage: transient candidates on a stack's difference image.

``science.detect.detect_candidates`` runs on ``<stem>.diff.fits`` with the difference's WCS and
zero point, the field's reference catalogue (``ref_cat/gaiaxp_dr3_synphot_<OBJECT>.csv``: a
candidate on a catalogued star is flagged ``ref_star``) and, for the ``moving`` flag, one
difference image per frame of the stack: each frame is resampled onto the stack's grid on the
stack's zero point (SWarp, as the stack was made) and the same reference subtracted from it, so
an asteroid shows at a different place in each while a real transient stays put.

Products beside the stack: ``<stem>.cand.ecsv`` (every candidate: ra, dec, mag, magerr, snr,
flags, score and the flag columns), ``<stem>.cand.reg`` (DS9) and ``<stem>.stamps/cand_<id>.png``
for the candidates that pass (score >= ``min_score`` and no flag outside ``pass_flags``).
"""

from __future__ import annotations

import io
import math

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from .. import config, log, storage
from ..errors import BadInputError
from ..fitsio import read_hdul
from ..science.astrometry import observation_time
from ..science.detect import FLAG_BITS, detect_candidates
from ..science.stamps import candidate_stamps, region_text
from ..tools import swarp as sw
from .base import Night, Timer, input_hash, is_done, read_sidecar, write_sidecar
from .stack import load_frame, scaled_input, settings, stem
from .subtract import (
    NO_REFERENCE,
    choose_engine,
    find_reference,
    product_keys,
    run_subtraction,
)

_log = log.get("detect")


def candidate_keys(stack_key: str) -> dict[str, str]:
    s = stem(stack_key)
    return {"table": f"{s}.cand.ecsv", "regions": f"{s}.cand.reg", "stamps": f"{s}.stamps"}


def reference_catalogue(root: str, field: str, when) -> Table | None:
    """ra/dec of the field's reference catalogue at the observation epoch (None when storage has
    none): read as every stage reads it, so column maps and proper motions apply here too."""
    from ..science import refcat
    from .astrometry import refcat_key

    url = storage.join(root, refcat_key(field))
    if not storage.exists(url):
        return None
    table = refcat.read_refcat(storage.get_bytes(url), name=refcat.refcat_name(field))
    if when is not None:
        table = refcat.at_epoch(table, when)
    return Table({"ra": np.asarray(table["ra"], float), "dec": np.asarray(table["dec"], float)})


def passing(table: Table, min_score: float, pass_flags: int) -> np.ndarray:
    if len(table) == 0:
        return np.zeros(0, bool)
    flags = np.asarray(table["flags"], int)
    return (np.asarray(table["score"], float) >= min_score) & ((flags & ~int(pass_flags)) == 0)


def frame_differences(ctx: Night, frame_ids: list[str], zp: float, grid_header: fits.Header, shape,
                      ref: np.ndarray, engine: str, sub_settings: dict) -> tuple[list[tuple], list[dict]]:
    """(diff, noise, mask) of each frame of the stack against the same reference, on its grid."""
    frames = {f["id"]: f for f in ctx.plan()["frames"]}
    cfg = settings("stack")
    out, notes = [], []
    ref_bad = ref == 0
    for fid in frame_ids:
        got = load_frame(ctx, frames[fid], cfg)
        if isinstance(got, str):
            notes.append({"frame": fid, "reason": got})
            continue
        item, info, _ = got
        # on the stack's zero point and sky-subtracted, as in the stack
        res = sw.swarp([scaled_input(item, info, zp)], {"NTHREADS": int(cfg.get("nthreads", 0))},
                       template=(grid_header, shape))
        good = res.weight > 0
        if good.mean() < 0.2:
            notes.append({"frame": fid, "reason": "covers too little of the stack"})
            continue
        var = np.where(good, 1.0 / np.where(good, res.weight, 1.0), 0.0).astype(np.float32)
        try:
            sub, _ = run_subtraction(np.where(good, res.image, 0.0), var, ~good, ref, None, ref_bad, engine=engine,
                                     settings_=sub_settings)
        except BadInputError as exc:  # too few stamps on one frame: the others still tell motion
            notes.append({"frame": fid, "reason": exc.reason})
            continue
        out.append((sub.diff, np.where(np.isfinite(sub.noise), sub.noise, np.inf), sub.mask))
    return out, notes


def run(ctx: Night, stack: str) -> dict:
    entry = ctx.item("stack", stack)
    cfg = settings("detect")
    keys = product_keys(entry["output"])
    ckeys = candidate_keys(entry["output"])
    result = {"stack": stack, "output": ckeys["table"]}
    diff_url = ctx.url(keys["diff"])
    if not storage.exists(diff_url):
        if find_reference(ctx.root, entry["field"], entry["filter"]) is None:
            return result | {"status": NO_REFERENCE, "flag": "no_reference", "output": None,
                             "reason": f"no reference frame for {entry['field']} in {entry['filter']}: nothing to search"}
        raise BadInputError(f"stack {stack} has no difference image (see the subtract stage's result)", path=diff_url)
    diff_meta = read_sidecar(diff_url) or {}
    stack_meta = read_sidecar(ctx.url(entry["output"])) or {}
    work = input_hash("detect", [{"diff": keys["diff"], "hash": diff_meta.get("hash")}], cfg)
    table_url = ctx.url(ckeys["table"])
    if is_done(table_url, work, ctx.force):
        log.event(_log, "already searched from the same inputs and settings", stack=stack)
        return result | {"status": "done", "skipped": True, **(read_sidecar(table_url) or {}).get("summary", {})}
    timer = Timer()
    with read_hdul(diff_url) as hdul:
        diff = np.asarray(hdul[0].data, np.float32)
        header = hdul[0].header.copy()
    noise = np.asarray(read_hdul(ctx.url(keys["noise"]))[0].data, np.float32)
    mask = np.asarray(read_hdul(ctx.url(keys["mask"]))[0].data) != 0
    noise = np.where(noise > 0, noise, np.inf)
    with read_hdul(ctx.url(entry["output"])) as hdul:
        new = np.asarray(hdul[0].data, np.float32)
        stack_header = hdul[0].header.copy()
    ref = np.asarray(read_hdul(ctx.url(keys["ref"]))[0].data, np.float32)
    wcs = WCS(header)
    zp = float(header.get("ZP", 0.0))
    pixscale = config.instrument(ctx.unit).pixscale
    fwhm = float(header.get("FWHM") or 0) or float(stack_header.get("SEEINGIN", 2.5)) / pixscale
    refcat = reference_catalogue(ctx.root, entry["field"], observation_time(stack_header))
    frame_diffs, notes = None, []
    if cfg.get("moving", "frame_diffs") == "frame_diffs" and len(stack_meta.get("frames", [])) >= 2:
        sub_cfg = settings("subtract")
        frame_diffs, notes = frame_differences(ctx, stack_meta["frames"], float(stack_header["ZP"]), stack_header,
                                               new.shape, ref, choose_engine(sub_cfg), sub_cfg.get("settings") or {})
        if len(frame_diffs) < 2:
            notes.append({"frame": "*", "reason": "fewer than 2 frame differences: no moving flag"})
            frame_diffs = None
    t = detect_candidates(diff, noise, mask, fwhm=fwhm, wcs=wcs, zp=zp, threshold=float(cfg["threshold"]),
                          minarea=int(cfg["minarea"]), ref_catalog=refcat, frame_diffs=frame_diffs)
    ok = passing(t, float(cfg["min_score"]), int(cfg["pass_flags"]))
    t["pass"] = ok
    t.meta.update({"STACK": storage.basename(entry["output"]), "DIFF": storage.basename(keys["diff"]),
                   "FWHM_PX": fwhm, "THRESH": float(cfg["threshold"]), "MINSCORE": float(cfg["min_score"]),
                   "MOVING": "frame_diffs" if frame_diffs else "none", "NFRAMES": len(frame_diffs or [])})
    buf = io.StringIO()
    t.write(buf, format="ascii.ecsv")
    stamps = candidate_stamps(new, ref, diff, t[ok], half=int(cfg["stamp_half"]), noise=noise,
                              max_stamps=int(cfg["max_stamps"]))
    for old in storage.list_objects(ctx.url(ckeys["stamps"])):  # a re-run may pass other candidates
        storage.delete(old.url)
    for cid, png in stamps.items():
        storage.put_bytes(ctx.url(ckeys["stamps"], f"cand_{cid:04d}.png"), png)
    storage.put_bytes(ctx.url(ckeys["regions"]), region_text(t, good_score=float(cfg["min_score"])).encode())
    storage.put_bytes(table_url, buf.getvalue().encode())
    order = np.argsort(-np.asarray(t["score"], float)) if len(t) else []
    top = [_row(t[i]) for i in order if ok[i]][: int(settings("notify").get("top_candidates", 5)) * 2]
    for row in top:
        if row["id"] in stamps:
            row["stamp"] = f"{ckeys['stamps']}/cand_{row['id']:04d}.png"
    summary = {"status": "done", "n_candidates": len(t), "n_pass": int(ok.sum()), "zp": zp, "fwhm_px": round(fwhm, 3),
               "flag_counts": {name: int(np.sum(np.asarray(t[name], bool))) for name in FLAG_BITS} if len(t) else {},
               "moving_from": len(frame_diffs or []), "notes": notes, "top": top, "stamps": len(stamps)}
    write_sidecar(table_url, work, stack=stack, summary=summary, products=ckeys)
    log.event(_log, "searched", stack=stack, candidates=len(t), passing=int(ok.sum()), seconds=timer.seconds)
    return result | summary | {"products": ckeys, "seconds": timer.seconds}


def _row(r) -> dict:
    def num(v, nd):
        v = float(v)
        return round(v, nd) if math.isfinite(v) else None

    return {"id": int(r["id"]), "ra": num(r["ra"], 6), "dec": num(r["dec"], 6), "mag": num(r["mag"], 3),
            "magerr": num(r["magerr"], 3), "snr": num(r["snr"], 1), "score": num(r["score"], 3), "flags": int(r["flags"])}
