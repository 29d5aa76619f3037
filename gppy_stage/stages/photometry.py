"""The photometry stage: one solved ``calib_*.fits`` -> ``phot/<stem>.phot.cat``, a zero-point
plot ``phot/<stem>.zp.png``, and the ZP/EZP/UL5/SEEING... keys in the calib frame's header
(rewritten whole, then replaced, as the astrometry stage does).

The reference is the site's catalogue (``sites`` in config/refcat_columns.yaml: Gaia XP for 7DT,
PS1/SDSS/APASS in the north, SkyMapper/APASS in the south), the first the root holds for the
field; an IMSNG/GECKO site gets gpPy's aperture set (names.convention).
"""

from __future__ import annotations

import json

import numpy as np
from astropy.io import fits

from .. import config, log, storage
from ..errors import BadInputError
from ..fitsio import put_hdul, read_hdul
from ..names import convention, phot_keys, strip_fits_suffix
from ..science import astrometry as astro
from ..science import phot_products
from ..science import photometry as phot
from ..science import refcat as refcat_mod
from ..tools import astromatic
from .base import Night, Timer, input_hash, is_done, stamp_provenance, utcnow, write_sidecar

_log = log.get("photometry")

SETTINGS = {"match_radius_arcsec": 1.0, "mag_range": [12.0, 17.5], "max_ref_err": 0.05, "version": 1}


def reference_key(ctx: Night, obj: str, product_url: str) -> tuple[str, str]:
    """(key, kind) of the site's reference catalogue of the field; bad input naming every file
    looked for when the root holds none of them."""
    found = refcat_mod.locate(ctx.unit, obj, lambda k: storage.exists(ctx.url(k)))
    if found is None:
        tried = ", ".join(f"ref_cat/{refcat_mod.refcat_file(k, obj)}" for k in refcat_mod.site_kinds(ctx.unit))
        raise BadInputError(f"no reference catalogue for field {obj} (looked for {tried})", path=product_url)
    return found


def run(ctx: Night, frame: str) -> dict:
    """Photometry of one science frame of the plan."""
    entry = ctx.item("frame", frame)
    return {"frame": frame, **run_product(ctx, entry["output"], entry["object"], entry.get("filter"), label=frame)}


def run_product(ctx: Night, key: str, obj: str, band: str | None, label: str | None = None) -> dict:
    """Photometry of one solved product (a calib frame or a stack) under the root."""
    reg = config.instrument(ctx.unit)
    output_url = ctx.url(key)
    label = label or key.rsplit("/", 1)[-1]
    cat_key, png_key = phot_keys(key)
    if not storage.exists(output_url):
        raise BadInputError("reduced frame not found: run the reduce and astrometry stages first", path=output_url)
    ref_key, ref_kind = reference_key(ctx, obj, output_url)
    ref_raw = storage.get_bytes(ctx.url(ref_key))
    scheme = convention(ctx.unit)
    timer = Timer()
    with read_hdul(output_url) as hdul:
        hdul.verify("silentfix")
        header = hdul[0].header.copy()
        if not header.get("ASTROMTD"):
            raise BadInputError("frame has no astrometric solution (ASTROMTD missing)", path=output_url)
        work = input_hash("photometry", [key, header.get("ASTRHASH", ""), ref_key, config.settings_hash(
            ref_raw.decode(errors="replace"))], {**SETTINGS, "scheme": scheme, "sex": astromatic.provenance(
                "source-extractor", "sextractor/default.sex", "sextractor/photometry.param", "sextractor/growth.param")})
        cat_url = ctx.url(cat_key)
        if is_done(cat_url, work, ctx.force, stamped=header, card="PHOTHASH"):
            log.event(_log, "already calibrated from the same inputs and settings", product=label)
            return {"skipped": True, "catalog": cat_key,
                    "zp": {ap: header.get(f"ZP_{ap}") for ap in phot.ALL_APERTURES}, "seeing": header.get("SEEING")}
        data = np.asarray(hdul[0].data, dtype=np.float32)
        mask = np.asarray(hdul["MASK"].data) if "MASK" in hdul else None
        variance = np.asarray(hdul["VARIANCE"].data, dtype=np.float32) if "VARIANCE" in hdul else None
        extensions = [h.copy() for h in hdul[1:]]
    reference = refcat_mod.read_refcat(ref_raw, kind=ref_kind, name=ref_key)
    when = astro.observation_time(header)
    if when is not None:
        reference = refcat_mod.at_epoch(reference, when)
    band = band or header.get("FILTER")
    result = phot.photometry(
        data, header, reference, band, pixscale=reg.pixscale, gain=float(header.get("EGAIN", reg.gain)),
        saturation=float(header.get("SATURATE", reg.saturation)), mask=mask, variance=variance,
        match_radius_arcsec=SETTINGS["match_radius_arcsec"], mag_range=tuple(SETTINGS["mag_range"]),
        max_ref_err=SETTINGS["max_ref_err"], scheme=scheme,
    )
    stem = strip_fits_suffix(key.rsplit("/", 1)[-1])
    storage.put_bytes(cat_url, phot_products.catalog_bytes(result.catalog))
    storage.put_bytes(ctx.url(png_key), phot.zp_plot(result, title=f"{stem}  ({band})"))
    new_header = header.copy()
    new_header.update(result.header)
    stamp_provenance(new_header, work, "PHOTHASH", "hash of photometry inputs and settings")
    put_hdul(output_url, fits.HDUList([fits.PrimaryHDU(data, new_header), *extensions]))
    write_sidecar(cat_url, work, output=key, plot=png_key)
    summary = result.summary()
    out = {"output": key, "catalog": cat_key, "plot": png_key, "seeing": round(result.seeing_arcsec, 4),
           "zp": summary["zp"], "ezp": summary["ezp"], "apcor": summary["apcor"], "ul5": summary["ul5"],
           "nstar": summary["nstar"], "nsources": len(result.catalog), "made": utcnow(), "seconds": timer.seconds}
    log.event(_log, "calibrated", product=label, seeing=out["seeing"], zp_aper_1=summary["zp"].get("APER_1"),
              nsources=out["nsources"], seconds=timer.seconds)
    return json.loads(json.dumps(out, default=float))
