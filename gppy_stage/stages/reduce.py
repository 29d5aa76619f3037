"""The reduce stage: one science frame -> ``calib_*.fits`` (data, MASK and VARIANCE extensions).

The product's primary HDU is float32 ADU with the normalised raw header plus provenance (masters
used, versions, the hash of inputs and settings); cosmic rays are cleaned and flagged in MASK.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from astropy.io import fits

from .. import config, library, log, storage
from ..errors import BadInputError
from ..fitsio import clean_header, open_raw, put_hdul, read_hdul
from ..headers import normalise
from ..science import fringe, overscan
from ..science.reduce import MASK_BITS, Calibrated, calibrate, empty_reason, remove_cosmic_rays
from ..xp import device_name, get_xp, to_numpy
from .base import (
    Night,
    Timer,
    input_hash,
    is_done,
    product_identity,
    read_sidecar,
    stamp_provenance,
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


def overscan_settings(unit: str) -> dict | None:
    """The overscan settings a unit's products depend on: none for 7DT (CMOS, no overscan), so its
    hashes, and so its products, stay what they were."""
    return None if config.site(unit).header_dialect == "tcspy" else config.settings("overscan")


def defringe_settings(unit: str, filt: str | None) -> dict | None:
    """The defringe settings when ``unit`` defringes band ``filt`` (pipeline.yaml ``defringe.bands``)."""
    cfg = config.settings("defringe")
    return cfg if filt in (cfg.get("bands") or {}).get(unit, ()) else None


def _binning(header: fits.Header) -> tuple[int, int]:
    return int(header.get("XBINNING", 1)), int(header.get("YBINNING", header.get("XBINNING", 1)))


def calibrated(ctx: Night, entry: dict, masters: dict[str, str], xp=np) -> tuple[Calibrated, fits.Header, float]:
    """One science frame: overscan and trim (where its header names them), bias, dark and flat.
    Returns the calibration, the frame's normalised header (WCS moved by the trim, the overscan
    recorded) and its gain. A frame that holds no image, or whose masters are of another binning
    or shape, is bad input, said with the reason."""
    reg = config.instrument(ctx.unit)
    cfg = config.settings("reduce")
    ov = overscan_settings(ctx.unit) or config.settings("overscan")
    raw_url = ctx.url(entry["raw"])
    loaded = {kind: _load_master(ctx, masters[kind]) for kind in ("zero", "dark", "flat")}
    with open_raw(raw_url) as raw:
        header = normalise(raw.header, raw_url, site=ctx.unit)  # a site's rules may name its overscan
        view = overscan.prepare(raw, header, ov["fit_order"])
        pixels = view.all()
    why = empty_reason(pixels)
    if why:
        raise BadInputError(f"science frame {why}: nothing to calibrate", path=raw_url)
    for kind, (image, mheader) in loaded.items():
        if "XBINNING" in mheader and _binning(mheader) != _binning(header):
            raise BadInputError(f"master {kind} {storage.basename(masters[kind])} is {'x'.join(map(str, _binning(mheader)))} "
                                f"binned, the frame {'x'.join(map(str, _binning(header)))}", path=raw_url)
        if image.shape != pixels.shape:
            raise BadInputError(f"frame is {pixels.shape[1]}x{pixels.shape[0]} after trimming, master {kind} "
                                f"{storage.basename(masters[kind])} is {image.shape[1]}x{image.shape[0]}", path=raw_url)
    (bias, _), (dark, dark_header), (flat, _) = loaded["zero"], loaded["dark"], loaded["flat"]
    gain = float(header.get("EGAIN", reg.gain))
    level = view.mean_level if view is not raw else 0.0
    cal = calibrate(
        xp.asarray(pixels), bias=xp.asarray(bias), dark=xp.asarray(dark), dark_exptime=float(dark_header["EXPTIME"]),
        exptime=float(header["EXPTIME"]), flat=xp.asarray(flat), gain=gain, rdnoise=reg.rdnoise,
        # the detector saturates in raw ADU; the overscan was taken off before the comparison
        saturation=reg.saturation - level,
        bad_flat=(cfg["bad_flat_low"], cfg["bad_flat_high"]), hot_dark_rate=cfg["hot_dark_rate"], xp=xp,
    )
    if view is not raw:
        for key, card in view.cards(ov["fit_order"]).items():
            header[key] = card
        overscan.shift_wcs(header, view.layout)
    return cal, header, gain


def _find_fringe(ctx: Night, entry: dict, cfg: dict) -> str | None:
    found = library.find(ctx.root, ctx.unit, library.FRINGE, mjd=entry["mjd"], binning=entry["binning"],
                         gain=entry["gain"], filt=entry["filter"], validity_days=float(cfg["validity_days"]))
    return found.key if found else None


def load_fringe(ctx: Night, key: str) -> tuple[np.ndarray, np.ndarray]:
    """A master fringe frame and its scale pairs (the PAIRS table the masters stage wrote)."""
    with read_hdul(ctx.url(key)) as hdul:
        pairs = hdul["PAIRS"].data
        return (np.asarray(hdul[0].data, dtype=np.float32),
                np.stack([pairs[c] for c in ("YBRIGHT", "XBRIGHT", "YDARK", "XDARK")], axis=1).astype(np.int64))


def _defringe(ctx: Night, data, mask, key: str, cfg: dict, header: fits.Header, xp):
    """Subtract the scaled master fringe frame; the scale goes in the header as FRINGSCL."""
    master, pairs = load_fringe(ctx, key)
    if master.shape != tuple(data.shape):
        raise BadInputError(f"master fringe {storage.basename(key)} is {master.shape[1]}x{master.shape[0]}, "
                            f"the frame {data.shape[1]}x{data.shape[0]}")
    host = np.where(to_numpy(mask) == 0, to_numpy(data), np.nan)  # masked pixels must not pull a pair's median
    value = fringe.scale(host, master, pairs, box=int(cfg["box"]))
    header["MASTFRNG"] = storage.basename(key)
    header["FRINGSCL"] = (round(value, 4), "ADU per unit of the master fringe subtracted")
    return data - xp.asarray(master) * xp.float32(value), value


def run(ctx: Night, frame: str) -> dict:
    entry = ctx.item("frame", frame)
    masters = resolve_masters(ctx, entry)
    reg = config.instrument(ctx.unit)
    cfg = config.settings("reduce")
    output_url = ctx.url(entry["output"])
    settings = cfg | {"instrument": dataclasses.asdict(reg)}
    if overscan_settings(ctx.unit) is not None:
        settings["overscan"] = overscan_settings(ctx.unit)
    fringe_cfg = defringe_settings(ctx.unit, entry.get("filter"))
    fringe_key = _find_fringe(ctx, entry, fringe_cfg) if fringe_cfg else None
    used = [product_identity(ctx, k) for k in masters.values()]
    if fringe_cfg:
        settings["defringe"] = fringe_cfg
        used.append(product_identity(ctx, fringe_key) if fringe_key else None)
    # the masters' own hashes and the instrument's numbers are inputs too: a master remade under
    # the same name, or a corrected gain, makes the frame redo
    work = input_hash("reduce", [entry["raw"], used], settings)
    if is_done(output_url, work, ctx.force):
        log.event(_log, "already reduced from the same inputs and settings", frame=frame)
        return {"frame": frame, "output": entry["output"], "skipped": True}
    timer = Timer()
    xp = get_xp()
    cal, header, gain = calibrated(ctx, entry, masters, xp)
    data, mask = cal.data, cal.mask
    scale = None
    if fringe_key:
        data, scale = _defringe(ctx, data, mask, fringe_key, fringe_cfg, header, xp)
    elif fringe_cfg:
        log.event(_log, "no master fringe for this band in the library: not defringed", level=30, frame=frame,
                  filter=entry["filter"])
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
    stamp_provenance(header, work)
    header["GPDEVICE"] = (device_name(xp), "array backend of the reduction")
    put_hdul(output_url, product(data, variance, mask, header))
    extra = {"fringe": fringe_key, "fringe_scale": scale} if fringe_cfg else {}
    write_sidecar(output_url, work, frame=frame, raw=entry["raw"], masters=masters, ncr=ncr, **extra)
    log.event(_log, "reduced", frame=frame, output=entry["output"], cosmic_ray_pixels=ncr, seconds=timer.seconds)
    return {"frame": frame, "output": entry["output"], "masters": masters, "cosmic_ray_pixels": ncr,
            "seconds": timer.seconds, **extra}


def reduce_file(url: str, out_url: str, obs: str | None = None, cosmic_rays: bool = True) -> dict:
    """Reduce one frame of any telescope on its own: overscan (when the header names one), mask,
    variance and cosmic rays, with no masters. For a quick look at a frame and for checking how a
    new telescope's headers normalise."""
    cfg = config.settings("reduce")
    fit_order = config.settings("overscan")["fit_order"]
    with open_raw(url) as raw:
        header = normalise(raw.header, url, site=obs)
        view = overscan.prepare(raw, header, fit_order)
        pixels = view.all()
        index = raw.index
    if index:
        # A tile-compressed or multi-extension file: the primary header has the observation keys,
        # the image extension the detector's; the product needs both.
        with storage.local_copy(url) as path:
            merged = fits.getheader(path, 0)
        merged.extend(clean_header(header, commentary=False), update=True)
        header = normalise(merged, url, site=obs)
    if "IMAGETYP" not in header:
        raise BadInputError("header has no IMAGETYP (nor OBSTYPE): cannot tell what kind of frame this is", path=url)
    reg = config.instruments().get((obs or "").upper())
    gain = float(header.get("EGAIN", reg.gain if reg else 1.0))
    rdnoise = float(header.get("RDNOISE", reg.rdnoise if reg else 5.0))
    saturation = float(header.get("SATURATE", reg.saturation if reg else 65535))
    level = view.mean_level if view is not raw else 0.0
    cal = calibrate(pixels, gain=gain, rdnoise=rdnoise, saturation=saturation - level)
    data, mask, variance = cal.data, cal.mask, cal.variance
    if view is not raw:
        for key, card in view.cards(fit_order).items():
            header[key] = card
        overscan.shift_wcs(header, view.layout)
    ncr = 0
    if cosmic_rays and header["IMAGETYP"] == "LIGHT":
        cr = cfg["cosmic_rays"]
        data, crmask = remove_cosmic_rays(data, mask, gain=gain, rdnoise=rdnoise, saturation=saturation,
                                          sigclip=cr["sigclip"], sigfrac=cr["sigfrac"], objlim=cr["objlim"], niter=cr["niter"])
        mask = mask | crmask.astype(np.uint8) * MASK_BITS["COSMIC_RAY"]
        ncr = int(crmask.sum())
    for key in ("NAXIS1", "NAXIS2", "BZERO", "BSCALE", "BITPIX"):
        header.remove(key, ignore_missing=True)
    header["NCRPIX"] = (ncr, "pixels flagged as cosmic rays")
    stamp_provenance(header)
    put_hdul(out_url, product(data, variance, mask, header))
    return {"input": url, "output": out_url, "imagetyp": header["IMAGETYP"], "filter": header.get("FILTER"),
            "overscan": header.get("OVERSCAN"), "cosmic_ray_pixels": ncr, "shape": list(np.shape(data))}
