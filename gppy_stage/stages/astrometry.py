"""The astrometry stage: one reduced frame -> the same ``calib_*.fits`` with a WCS in its header.

Design choice: the calib frame is updated in place (a new file is written whole, then replaces
the old one through storage's atomic put); the MASK and VARIANCE extensions are kept. Skipping
follows the one rule of stages/base.py: the stage's own sidecar (role ``astrometry``:
``calib_*.fits.astrometry.json``, written last) records the hash of (reduced frame, reference,
settings), and the frame's ``ASTRHASH`` must still carry it, since a forced reduce rewrites the
frame without a WCS while leaving that sidecar in place. The reduce stage's sidecar stays untouched.
"""

from __future__ import annotations

import numpy as np
from astropy.io import fits

from .. import config, log, storage
from ..errors import BadInputError
from ..fitsio import put_hdul, read_hdul
from ..science import astrometry as astro
from ..science import refcat as refcat_mod
from ..tools import astromatic
from .base import Night, Timer, input_hash, is_done, read_sidecar, stamp_provenance, write_sidecar

_log = log.get("astrometry")

SETTINGS = {"position_maxerr_arcmin": 5.0, "max_offset_arcsec": 1.0, "min_match": 6, "cpulimit": 30.0,
            "version": 1}
ROLE = "astrometry"  # the sidecar's name beside the calib frame, which is the reduce stage's product


def refcat_key(obj: str) -> str:
    return f"ref_cat/{refcat_mod.refcat_name(obj)}"


def locate_reference(ctx: Night, obj: str) -> tuple[str, str]:
    """(key, kind) of the field's reference catalogue for this site (refcat_columns.yaml ``sites``:
    the first kind stored); the 7DT key with kind None when storage holds none of them."""
    found = refcat_mod.locate(ctx.unit, obj, lambda key: storage.exists(ctx.url(key)))
    return found if found is not None else (refcat_key(obj), None)


def load_reference(raw: bytes | None, obj: str, when, key: str | None = None, kind: str = "gaiaxp"):
    """The reference in the one shape of refcat, at the observation epoch (None stays None)."""
    if raw is None:
        return None
    ref = refcat_mod.read_refcat(raw, kind=kind, name=key or refcat_key(obj))
    return refcat_mod.at_epoch(ref, when) if when is not None else ref


def binning(header) -> int:
    """The frame's binning (MaxIm's XBINNING): the registry's pixel scale is the unbinned one."""
    try:
        return max(1, int(header.get("XBINNING", 1) or 1))
    except (TypeError, ValueError):
        return 1


def run(ctx: Night, frame: str) -> dict:
    entry = ctx.item("frame", frame)
    reg = config.instrument(ctx.unit)
    output_url = ctx.url(entry["output"])
    if not storage.exists(output_url):
        raise BadInputError("reduced frame not found: run the reduce stage first", path=output_url)
    ref_key, ref_kind = locate_reference(ctx, entry["object"])
    ref_raw = storage.get_bytes(ctx.url(ref_key)) if ref_kind is not None else None
    ref_id = config.settings_hash(ref_raw.decode(errors="replace")) if ref_raw is not None else "none"
    timer = Timer()
    with read_hdul(output_url) as hdul:
        hdul.verify("silentfix")
        header = hdul[0].header.copy()
        red_hash = header.get("GPHASH", "")
        work = input_hash("astrometry", [entry["output"], red_hash, ref_key, ref_id],
                          {**SETTINGS, "sex": astromatic.provenance("source-extractor", "sextractor/default.sex"),
                           "scamp": astromatic.provenance("scamp", "scamp.conf")})
        if is_done(output_url, work, ctx.force, stamped=header, card="ASTRHASH", role=ROLE):
            log.event(_log, "already solved from the same inputs and settings", frame=frame)
            return {"frame": frame, "skipped": True, **(read_sidecar(output_url, ROLE) or {}).get("result", {})}
        data = np.asarray(hdul[0].data, dtype=np.float32)
        mask = np.asarray(hdul["MASK"].data) if "MASK" in hdul else None
        variance = np.asarray(hdul["VARIANCE"].data, dtype=np.float32) if "VARIANCE" in hdul else None
        extensions = [h.copy() for h in hdul[1:]]
    when = astro.observation_time(header)
    reference = load_reference(ref_raw, entry["object"], when, ref_key, ref_kind)
    if ref_raw is None:
        log.event(_log, "no reference catalogue: blind solve only", level=30, frame=frame,
                  looked_for=[f"ref_cat/{refcat_mod.refcat_file(k, entry['object'])}"
                              for k in refcat_mod.site_kinds(ctx.unit)])
    try:
        solution = astro.solve(
            data, header, reference, pixscale=reg.pixscale * binning(header), gain=float(header.get("EGAIN", reg.gain)),
            saturation=float(header.get("SATURATE", reg.saturation)), mask=mask, variance=variance,
            band=entry.get("filter"), position_maxerr_arcmin=SETTINGS["position_maxerr_arcmin"],
            max_offset_arcsec=SETTINGS["max_offset_arcsec"], min_match=SETTINGS["min_match"],
            cpulimit=SETTINGS["cpulimit"],
        )
    except astro.AstrometryError as exc:
        if ref_raw is None:  # the cause an operator can fix: say which key was looked for
            raise astro.AstrometryError(f"{exc.reason} (no {ref_key} under the root)",
                                        path=exc.path or output_url) from None
        raise
    new_header = astro.apply_solution(header, solution)
    stamp_provenance(new_header, work, card="ASTRHASH", comment="hash of astrometry inputs and settings")
    if reference is not None:
        new_header["ASTREF"] = (ref_key.rsplit("/", 1)[-1], "astrometric reference")
    put_hdul(output_url, fits.HDUList([fits.PrimaryHDU(data, new_header), *extensions]))
    result = {"frame": frame, "output": entry["output"], "method": solution.method, "nmatch": solution.nmatch,
              "rms_arcsec": [round(solution.rms1_arcsec, 4), round(solution.rms2_arcsec, 4)],
              "median_offset_arcsec": round(solution.median_offset_arcsec, 4), "notes": solution.notes,
              "seconds": timer.seconds}
    write_sidecar(output_url, work, role=ROLE, result=result)
    log.event(_log, "solved", **{k: v for k, v in result.items() if k != "notes"})
    return result
