"""The reduce stage: one science frame -> ``calib_*.fits`` (data, MASK and VARIANCE extensions).

The product's primary HDU is float32 ADU with the normalised raw header plus provenance (masters
used, versions, the hash of inputs and settings); cosmic rays are cleaned and flagged in MASK.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from astropy.io import fits

from .. import __version__, config, library, log, storage
from ..errors import BadInputError
from ..fitsio import clean_header, open_raw, put_hdul, read_hdul
from ..headers import normalise
from ..science.reduce import (
    MASK_BITS,
    calibrate,
    overscan_level,
    parse_section,
    remove_cosmic_rays,
)
from ..xp import device_name, get_xp, to_numpy
from .base import (
    Night,
    Timer,
    input_hash,
    is_done,
    product_identity,
    read_sidecar,
    write_sidecar,
)

_log = log.get("reduce")


def resolve_masters(ctx: Night, frame: dict) -> dict[str, str]:
    """The masters a frame uses: the planned ones, unless one was not made or failed QA, in which
    case the library's nearest good master replaces it."""
    chosen = {}
    for kind, key in frame["masters"].items():
        meta = read_sidecar(ctx.url(key))
        if meta and meta.get("qa", {}).get("verdict") != "bad" and storage.exists(ctx.url(key)):
            chosen[kind] = key
            continue
        found = library.find(ctx.root, ctx.unit, kind, mjd=frame["mjd"], binning=frame["binning"], gain=frame["gain"],
                             exptime=frame["exptime"], filt=frame["filter"], exclude=(key,))
        if found is None:
            why = "failed QA" if meta else "was not made"
            raise BadInputError(f"master {kind} {storage.basename(key)} {why} and the library has no other")
        log.event(_log, "planned master replaced from the library", frame=frame["id"], kind=kind,
                  planned=storage.basename(key), used=storage.basename(found.key))
        chosen[kind] = found.key
    return chosen


def _load_master(ctx: Night, key: str) -> tuple[np.ndarray, fits.Header]:
    with read_hdul(ctx.url(key)) as hdul:
        return np.asarray(hdul[0].data, dtype=np.float32), hdul[0].header.copy()


def product(data, variance, mask, header: fits.Header) -> fits.HDUList:
    mask_header = fits.Header()
    for name, bit in MASK_BITS.items():
        mask_header[f"MASK_{bit}"] = (name, "bit value meaning")
    return fits.HDUList([
        fits.PrimaryHDU(np.asarray(data, dtype=np.float32), header),
        fits.ImageHDU(np.asarray(mask, dtype=np.uint8), mask_header, name="MASK"),
        fits.ImageHDU(np.asarray(variance, dtype=np.float32), name="VARIANCE"),
    ])


def run(ctx: Night, frame: str) -> dict:
    entry = ctx.item("frame", frame)
    masters = resolve_masters(ctx, entry)
    reg = config.instrument(ctx.unit)
    cfg = config.settings("reduce")
    output_url = ctx.url(entry["output"])
    raw_url = ctx.url(entry["raw"])
    # the masters' own hashes and the instrument's numbers are inputs too: a master remade under
    # the same name, or a corrected gain, makes the frame redo
    work = input_hash("reduce", [entry["raw"], [product_identity(ctx, k) for k in masters.values()]],
                      cfg | {"instrument": dataclasses.asdict(reg)})
    if is_done(output_url, work, ctx.force):
        log.event(_log, "already reduced from the same inputs and settings", frame=frame)
        return {"frame": frame, "output": entry["output"], "skipped": True}
    timer = Timer()
    xp = get_xp()
    bias, _ = _load_master(ctx, masters["zero"])
    dark, dark_header = _load_master(ctx, masters["dark"])
    flat, _ = _load_master(ctx, masters["flat"])
    with open_raw(raw_url) as raw:
        header = normalise(raw.header, raw_url)
        pixels = raw.all()
    if pixels.shape != bias.shape or pixels.shape != flat.shape:
        raise BadInputError(f"frame is {pixels.shape[1]}x{pixels.shape[0]}, masters are {bias.shape[1]}x{bias.shape[0]}",
                            path=raw_url)
    gain = float(header.get("EGAIN", reg.gain))
    exptime = float(header["EXPTIME"])
    cal = calibrate(
        xp.asarray(pixels), bias=xp.asarray(bias), dark=xp.asarray(dark), dark_exptime=float(dark_header["EXPTIME"]),
        exptime=exptime, flat=xp.asarray(flat), gain=gain, rdnoise=reg.rdnoise, saturation=reg.saturation,
        bad_flat=(cfg["bad_flat_low"], cfg["bad_flat_high"]), hot_dark_rate=cfg["hot_dark_rate"], xp=xp,
    )
    del pixels, bias, dark, flat  # 61-Mpix frames: keep only what is written
    data, mask = cal.data, cal.mask
    ncr = 0
    if cfg["cosmic_rays"]["enabled"]:  # on the device the frame is on: no round trip for the GPU
        cr = cfg["cosmic_rays"]
        data, crmask = remove_cosmic_rays(data, mask, gain=gain, rdnoise=reg.rdnoise, saturation=reg.saturation,
                                          sigclip=cr["sigclip"], sigfrac=cr["sigfrac"], objlim=cr["objlim"],
                                          niter=cr["niter"], xp=xp)
        mask |= crmask.astype(xp.uint8) * xp.uint8(MASK_BITS["COSMIC_RAY"])
        ncr = int(crmask.sum())
        del crmask
    data, variance, mask = to_numpy(data), to_numpy(cal.variance), to_numpy(mask)
    del cal
    header["BUNIT"] = ("ADU", "bias, dark and flat corrected")
    header["EGAIN"] = (gain, "e-/ADU")
    header["RDNOISE"] = (reg.rdnoise, "read noise (e-)")
    header["SATURATE"] = (reg.saturation, "saturation (raw ADU)")
    header["MASTBIAS"] = storage.basename(masters["zero"])
    header["MASTDARK"] = storage.basename(masters["dark"])
    header["MASTFLAT"] = storage.basename(masters["flat"])
    header["NCRPIX"] = (ncr, "pixels flagged as cosmic rays")
    header["NSATPIX"] = (int(np.count_nonzero(mask & MASK_BITS["SATURATED"])), "saturated pixels")
    header["RAWFILE"] = storage.basename(entry["raw"])
    header["PIPEVER"] = (__version__, "gppy-stage version")
    header["GPHASH"] = (work, "hash of inputs and settings")
    header["GPDEVICE"] = (device_name(xp), "array backend of the reduction")
    put_hdul(output_url, product(data, variance, mask, header))
    write_sidecar(output_url, work, frame=frame, raw=entry["raw"], masters=masters, ncr=ncr)
    log.event(_log, "reduced", frame=frame, output=entry["output"], cosmic_ray_pixels=ncr, seconds=timer.seconds)
    return {"frame": frame, "output": entry["output"], "masters": masters, "cosmic_ray_pixels": ncr,
            "seconds": timer.seconds}


def reduce_file(url: str, out_url: str, obs: str | None = None, cosmic_rays: bool = True) -> dict:
    """Reduce one frame of any telescope on its own: overscan (when the header names one), mask,
    variance and cosmic rays, with no masters. For a quick look at a frame and for checking how a
    new telescope's headers normalise."""
    cfg = config.settings("reduce")
    with open_raw(url) as raw:
        header = normalise(raw.header, url)
        pixels = raw.all()
        index = raw.index
    if index:
        # A tile-compressed or multi-extension file: the primary header has the observation keys,
        # the image extension the detector's; the product needs both.
        with storage.local_copy(url) as path:
            merged = fits.getheader(path, 0)
        merged.extend(clean_header(header, commentary=False), update=True)
        header = normalise(merged, url)
    if "IMAGETYP" not in header:
        raise BadInputError("header has no IMAGETYP (nor OBSTYPE): cannot tell what kind of frame this is", path=url)
    reg = config.instruments().get((obs or "").upper())
    gain = float(header.get("EGAIN", reg.gain if reg else 1.0))
    rdnoise = float(header.get("RDNOISE", reg.rdnoise if reg else 5.0))
    saturation = float(header.get("SATURATE", reg.saturation if reg else 65535))
    bias_level = None
    if "BIASSEC" in header:
        try:
            bias_level = overscan_level(pixels, parse_section(header["BIASSEC"]))
        except (ValueError, IndexError):
            raise BadInputError(f"BIASSEC {header['BIASSEC']!r} is not a section of this image", path=url) from None
    cal = calibrate(pixels - (bias_level or 0.0), gain=gain, rdnoise=rdnoise, saturation=saturation - (bias_level or 0.0))
    data, mask = cal.data, cal.mask
    if "TRIMSEC" in header:
        try:
            rows, cols = parse_section(header["TRIMSEC"])
        except (ValueError, IndexError):
            raise BadInputError(f"TRIMSEC {header['TRIMSEC']!r} is not a section of this image", path=url) from None
        data, mask, variance = data[rows, cols], mask[rows, cols], cal.variance[rows, cols]
    else:
        variance = cal.variance
    ncr = 0
    if cosmic_rays and header["IMAGETYP"] == "LIGHT":
        cr = cfg["cosmic_rays"]
        data, crmask = remove_cosmic_rays(data, mask, gain=gain, rdnoise=rdnoise, saturation=saturation,
                                          sigclip=cr["sigclip"], sigfrac=cr["sigfrac"], objlim=cr["objlim"], niter=cr["niter"])
        mask = mask | crmask.astype(np.uint8) * MASK_BITS["COSMIC_RAY"]
        ncr = int(crmask.sum())
    for key in ("NAXIS1", "NAXIS2", "BZERO", "BSCALE", "BITPIX"):
        header.remove(key, ignore_missing=True)
    if bias_level is not None:
        header["OVERSCAN"] = (round(bias_level, 3), "overscan level subtracted (ADU)")
    header["NCRPIX"] = (ncr, "pixels flagged as cosmic rays")
    header["PIPEVER"] = (__version__, "gppy-stage version")
    put_hdul(out_url, product(data, variance, mask, header))
    return {"input": url, "output": out_url, "imagetyp": header["IMAGETYP"], "filter": header.get("FILTER"),
            "overscan": bias_level, "cosmic_ray_pixels": ncr, "shape": list(np.shape(data))}
