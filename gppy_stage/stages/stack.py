"""The stack stage: one stack group's calib frames -> ``*com.fits`` (SWarp), then its photometry.

Each usable frame (a calib frame with a celestial WCS and a zero point) is given to SWarp with
weight 1/VARIANCE (0 where MASK != 0) and ``FLXSCALE`` putting it on the common zero point; the
inverse-variance mean is written at the plan's ``output`` with the extensions of a calib frame
(MASK: bit 2 where no frame contributed; VARIANCE = 1/weight) plus ``*com.weight.fits`` (SWarp's
weight map), then the photometry stage's function measures it (``*com.phot.cat``, ZP keys).

Frames that failed an earlier stage, have no WCS (astrometry failed) or no zero point are left
out, each with its reason (header ``LEFTOUnn``, the result's ``left_out``). A group with no
usable frame raises BadInputError: the runner flags the stack and the night goes on.
"""

from __future__ import annotations

import json
from datetime import datetime

import numpy as np
from astropy.io import fits

from .. import config, log, storage
from ..errors import BadInputError
from ..fitsio import clean_header, header_zero_point, put_hdul
from ..names import weight_key
from ..report import read_header
from ..science import stack as sk
from ..science.wcsutil import has_celestial_wcs
from ..tools import swarp as sw
from .base import Night, Timer, input_hash, is_done, read_sidecar, stamp_provenance, write_sidecar

_log = log.get("stack")

# Stages whose failure on a frame keeps it out of the stack (their result names the reason)
FRAME_STAGES = ("reduce", "astrometry", "photometry")
# keys carried from the first frame to the stack (the rest is per-exposure or SWarp's)
CARRY_KEYS = ("OBJECT", "FILTER", "IMAGETYP", "TELESCOP", "INSTRUME", "GAIN", "XBINNING", "YBINNING", "XPIXSZ",
              "YPIXSZ", "FOCALLEN", "OBSERVAT", "SITELAT", "SITELONG", "SITEELEV", "OBJCTRA", "OBJCTDEC", "RA", "DEC",
              "RDNOISE", "REFCAT")


def frame_failure(ctx: Night, frame_id: str) -> str | None:
    """Why an earlier stage gave up on this frame, from its result record (None: it did not)."""
    for name in FRAME_STAGES:
        url = ctx.url(ctx.run_prefix, "results", name, f"{frame_id}.json")
        if not storage.exists(url):
            continue
        try:
            record = json.loads(storage.get_bytes(url))
        except ValueError:
            continue
        if record.get("status") in ("quarantined", "failed"):
            return f"{name} {record['status']}: {record.get('error', {}).get('reason', 'no reason given')}"
    return None


def check_header(ctx: Night, frame: dict, cfg: dict) -> tuple[fits.Header, float, str] | str:
    """A frame's header, zero point and its key, read without its pixels; or why it cannot be stacked."""
    failed = frame_failure(ctx, frame["id"])
    if failed:
        return failed
    header = read_header(ctx.url(frame["output"]))
    if header is None:
        return "no calib frame (not reduced)"
    if not has_celestial_wcs(header):
        return "no WCS (astrometry failed or not run)"
    if str(header.get("CTYPE1", "")).endswith("-SIP"):
        return "SIP distortion (solve-field without SCAMP refinement): SWarp cannot apply it"
    zp, zp_key = header_zero_point(header, cfg["zp_keys"])
    if zp is None:
        return f"no zero point (none of {', '.join(cfg['zp_keys'])} in the header)"
    return header, zp, zp_key


def load_pixels(url: str, frame_id: str, header: fits.Header, zp: float) -> tuple[sw.SwarpInput, sk.FrameForStack] | str:
    """A calib frame's pixels ready for SWarp (weights; EGAIN, SATURATE and FLXSCALE 1 set), or
    the reason they cannot be stacked. Memory-mapped: only the float32 image and weight are held."""
    with storage.local_copy(url) as path, fits.open(path, memmap=True) as hdul:
        names = [h.name for h in hdul]
        if "VARIANCE" not in names:
            return "no VARIANCE extension"
        mask = hdul["MASK"].data if "MASK" in names else None
        variance = hdul["VARIANCE"].data
        weight = sk.weight_map(variance, mask)
        good = weight > 0
        if good.sum() < 0.5 * weight.size:
            return f"only {100 * good.mean():.0f}% of the pixels are usable"
        data = np.asarray(hdul[0].data, np.float32)
        sub = (slice(None, None, 4), slice(None, None, 4))  # medians of a 1/16 sample: plenty, and fast
        sky = float(np.median(data[sub][good[sub]]))
        med_var = float(np.median(np.asarray(variance[sub], np.float32)[good[sub]]))
        del mask, variance, good
    seeing = header.get("SEEING")
    info = sk.FrameForStack(
        id=frame_id, name=storage.basename(url), zp=zp, exptime=float(header["EXPTIME"]),
        date_obs=datetime.fromisoformat(str(header["DATE-OBS"])), gain=float(header.get("EGAIN", 1.0)),
        saturation=float(header.get("SATURATE", 65535.0)), sky=sky, median_variance=med_var,
        seeing=float(seeing) if seeing else None)
    h = clean_header(header, commentary=False)
    h["EGAIN"] = info.gain
    h["SATURATE"] = info.saturation
    h["FLXSCALE"] = 1.0  # the stack gives the real scale, known once every frame is in, in a .head
    return sw.SwarpInput(data=data, header=h, weight=weight), info


def _identity(header: fits.Header, key: str, zp: float) -> dict:
    """What makes a frame's contribution: its key, and the hashes its reduction, astrometry and
    photometry recorded (each covers what it was made from), and the zero point it is scaled by."""
    return {"key": key, "made": header.get("GPHASH"), "astr": header.get("ASTRHASH"),
            "phot": header.get("PHOTHASH"), "zp": zp}


def product(out: sw.SwarpResult, header: fits.Header) -> fits.HDUList:
    """A stack in the calib-frame layout: data, MASK (bit 2 where nothing contributed), VARIANCE.
    Built in place on SWarp's float32 arrays, so no full-size float64 temporary is made."""
    good = out.weight > 0
    image = out.image
    image[~good] = 0.0
    variance = np.zeros_like(out.weight)
    np.divide(1.0, out.weight, out=variance, where=good)
    mask = np.where(good, 0, 2).astype(np.uint8)
    mh = fits.Header()
    mh["MASK_2"] = ("BAD", "no input frame covers the pixel")
    return fits.HDUList([fits.PrimaryHDU(image, header), fits.ImageHDU(mask, mh, name="MASK"),
                         fits.ImageHDU(variance, name="VARIANCE")])


def run(ctx: Night, stack: str) -> dict:
    entry = ctx.item("stack", stack)
    cfg = config.settings("stack")
    frames = {f["id"]: f for f in ctx.plan()["frames"]}
    output_url = ctx.url(entry["output"])
    timer = Timer()
    checked, left_out = _checked_frames(ctx, stack, [frames[fid] for fid in entry["frames"]], cfg)
    if not checked:
        _no_usable_frame(stack, left_out, output_url)
    # the hash is of the headers (each names the hashes its pixels were made from): a re-run that
    # finds the stack done reads no pixels
    work = input_hash("stack", [_identity(h, frames[fid]["output"], zp) for fid, h, zp, _ in checked],
                      {"cfg": cfg, "swarp": config.file_hash(config.config_dir() / sw.CONFIG)})
    result = {"stack": stack, "output": entry["output"], "weight": weight_key(entry["output"])}
    if is_done(output_url, work, ctx.force):
        log.event(_log, "already stacked from the same inputs and settings", stack=stack)
        meta = read_sidecar(output_url) or {}
        result |= {"frames": meta.get("frames", [c[0] for c in checked]), "left_out": meta.get("left_out", left_out),
                   "skipped": True, "photometry": stack_photometry(ctx, entry)}
        return result
    out, infos, scales, common = _coadd(ctx, stack, checked, frames, cfg, left_out, output_url)
    header = _header(out.header, checked, infos, scales, common, left_out, work)
    result |= {"frames": [i.id for i in infos], "left_out": left_out}
    put_hdul(ctx.url(weight_key(entry["output"])), fits.HDUList([fits.PrimaryHDU(out.weight, header)]))
    coverage = float(np.mean(out.weight > 0))
    shape = list(out.image.shape)
    put_hdul(output_url, product(out, header))
    del out
    write_sidecar(output_url, work, stack=stack, frames=result["frames"], left_out=left_out, zp=common)
    log.event(_log, "stacked", stack=stack, output=entry["output"], ncombine=len(infos), left_out=len(left_out),
              zp=round(common, 4), seconds=timer.seconds)
    result |= {"ncombine": len(infos), "zp": common, "exptime": float(header["EXPTIME"]), "egain": header["EGAIN"],
               "coverage": round(coverage, 4), "shape": shape, "seconds": timer.seconds}
    result["photometry"] = stack_photometry(ctx, entry)
    return result


def _checked_frames(ctx: Night, stack: str, frames: list[dict], cfg: dict) -> tuple[list[tuple], list[dict]]:
    """(frame id, header, zero point, its key) of each frame whose header allows stacking, and the
    others with their reasons."""
    checked, left_out = [], []
    for frame in frames:
        got = check_header(ctx, frame, cfg)
        if isinstance(got, str):
            _leave_out(left_out, stack, frame["id"], got)
        else:
            checked.append((frame["id"], *got))
    return checked, left_out


def _coadd(ctx: Night, stack: str, checked: list[tuple], frames: dict, cfg: dict, left_out: list[dict],
           output_url: str) -> tuple[sw.SwarpResult, list[sk.FrameForStack], list[float], float]:
    """SWarp's co-add of the frames, each read and handed over in turn, on the common zero point."""
    with sw.Coadd() as coadd:
        infos = []
        for fid, header, zp, _ in checked:
            got = load_pixels(ctx.url(frames[fid]["output"]), fid, header, zp)
            if isinstance(got, str):
                _leave_out(left_out, stack, fid, got)
                continue
            coadd.add(got[0])
            infos.append(got[1])
            del got  # one frame's pixels at a time: the next load replaces them
        if not infos:
            _no_usable_frame(stack, left_out, output_url)
        common = sk.common_zero_point([i.zp for i in infos], cfg["common_zp"])
        scales = [sk.flux_scale(i.zp, common) for i in infos]
        for index, scale in enumerate(scales):
            coadd.set_keys(index, {"FLXSCALE": scale})
        options = {"NTHREADS": int(cfg["nthreads"])} | dict(cfg.get("swarp") or {})
        return coadd.run(options), infos, scales, common


def _header(swarp_header: fits.Header, checked: list[tuple], infos: list[sk.FrameForStack], scales: list[float],
            common: float, left_out: list[dict], work: str) -> fits.Header:
    """SWarp's header with the first frame's identity, the inputs and the provenance."""
    first = checked[0][1]
    header = swarp_header.copy()
    for key in ("GAIN", "FLXSCALE"):
        header.remove(key, ignore_missing=True)
    for key in CARRY_KEYS:
        if key in first:
            header[key] = (first[key], first.comments[key])
    prov = sw.provenance()
    stacked = sk.stack_header(header, infos, scales, common, left_out=left_out, provenance={
        "SWVERSN": (prov["version"], "SWarp version"), "SWCONF": (prov[sw.CONFIG], "hash of swarp.conf"),
        "ZPKEY": (checked[0][3], "input header key the zero points came from"),
        # the grid's WCS is SWarp's, from inputs SCAMP solved: photometry may trust it
        "ASTROMTD": ("SWarp", "WCS of the resampled grid (inputs solved by SCAMP)"),
        "ASTRHASH": (work, "hash of the stack's inputs and settings")})
    return stamp_provenance(stacked, work)


def _leave_out(left_out: list[dict], stack: str, frame_id: str, reason: str) -> None:
    left_out.append({"frame": frame_id, "reason": reason})
    log.event(_log, "frame left out of the stack", stack=stack, frame=frame_id, reason=reason)


def _no_usable_frame(stack: str, left_out: list[dict], output_url: str):
    reasons = "; ".join(f"{n['frame']}: {n['reason']}" for n in left_out)
    raise BadInputError(f"stack {stack} has no usable frame ({reasons})", path=output_url)


def stack_photometry(ctx: Night, entry: dict) -> dict:
    """The photometry stage's measurement of the stack (``*com.phot.cat``, ZP keys in its header).

    A stack whose photometry fails (too few reference stars, say) is still a stack: the failure is
    reported in the result rather than losing the product.
    """
    from .photometry import run_product

    try:
        return {"status": "done", "result": run_product(ctx, entry["output"], entry["field"], entry["filter"],
                                                        label=entry["id"])}
    except BadInputError as exc:
        return {"status": "failed", "reason": exc.reason}