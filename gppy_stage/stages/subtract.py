"""The subtract stage: a stack minus its reference frame -> ``*com.diff.fits`` (+ noise, mask, ref).

The reference (``ref_frame/<filter>/ref_7DT_<OBJ>_*.fits``, else ``ref_PS1_<OBJ>_*_<filter>_0.fits``)
is resampled onto the stack's grid by SWarp through ``stages.reference`` (the tool the stack already
uses; astropy's reproject would be one more dependency), its variance carried as a SWarp weight
map, and scaled to the stack's zero point when it has one. ``science.subtract.subtract`` then
matches the PSFs with the engine of ``config/subtract.yaml`` (``native`` by default, ``hotpants``
when configured and on PATH) on the array namespace of ``gppy_stage.xp.get_xp()``.

Products beside the stack (``<stem>`` = the stack's name without ``.fits``):
``<stem>.diff.fits`` (new - ref, in the reference's scale, WCS, ``ZP`` of the difference and the
kernel's description), ``<stem>.diff.noise.fits`` (1 sigma), ``<stem>.diff.mask.fits`` (1 = do
not trust) and ``<stem>.ref.fits`` (the reference on the stack's grid, for stamps); a gpPy-named
stack (IMSNG/GECKO) gets gpPy's ``hd<stem>.fits`` and ``hc<stem>.fits`` (names.difference_keys).

A field without a reference is no failure: the result says ``status: no reference`` and the
detect stage and the report carry that on.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass

import numpy as np
from astropy.io import fits

from .. import log, names, storage
from ..config import settings
from ..errors import BadInputError, ConfigError
from ..fitsio import put_hdul, read_hdul
from ..science.subtract import subtract as subtract_images
from ..science.wcsutil import wcs_of
from ..xp import device_name, get_xp
from .base import Night, Timer, input_hash, is_done, read_sidecar, stamp_provenance, write_sidecar
from .reference import NO_REFERENCE, find_reference, image_zero_point, reference_on_grid, reference_zero_point

_log = log.get("subtract")


def choose_engine(cfg: dict) -> str:
    engine = str(cfg.get("engine", "native")).lower()
    if engine == "auto":
        return "hotpants" if shutil.which("hotpants") else "native"
    if engine not in ("native", "hotpants"):
        raise ConfigError(f"subtract.yaml: engine must be native, hotpants or auto, not {engine!r}")
    if engine == "hotpants" and not shutil.which("hotpants"):
        raise ConfigError("subtract.yaml asks for the hotpants engine but hotpants is not on PATH")
    return engine


def load_stack(url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, fits.Header]:
    with read_hdul(url) as hdul:
        return (np.asarray(hdul[0].data, np.float32), np.asarray(hdul["VARIANCE"].data, np.float32),
                np.asarray(hdul["MASK"].data) != 0, hdul[0].header.copy())


def run_subtraction(new, new_var, new_mask, ref, ref_var, ref_mask, *, engine: str, settings_: dict,
                    new_saturation: float | None = None):
    """``science.subtract.subtract`` on the configured array namespace; host arrays back."""
    xp = get_xp()
    kw = dict(settings_)
    if new_saturation is not None and "new_saturation" not in kw and engine == "native":
        kw["new_saturation"] = float(new_saturation)
    res = subtract_images(xp.asarray(new), xp.asarray(ref), new_var=xp.asarray(new_var),
                          ref_var=None if ref_var is None else xp.asarray(ref_var), new_mask=xp.asarray(new_mask),
                          ref_mask=xp.asarray(ref_mask), engine=engine, xp=xp if engine == "native" else np, **kw)
    return res.to_numpy(), device_name(xp)


def kernel_cards(info: dict, convolved: str) -> list[tuple[str, object, str]]:
    """The kernel's description as header cards (numbers only; the kernel image is an extension)."""
    cards = [("ENGINE", info.get("engine", "?"), "subtraction engine"),
             ("CONVOLV", convolved, "which input was convolved")]
    for key, name, comment in (("sum", "KSUM", "kernel sum"), ("flux_scale", "FLXRATIO", "flux scale new/ref"),
                               ("chi2", "KCHI2", "kernel fit chi2 per pixel"), ("n_stamps", "KNSTAMP", "stamps used"),
                               ("n_stamps_rejected", "KNREJ", "stamps rejected"), ("fwhm_new", "FWHMNEW", "[px] new"),
                               ("fwhm_ref", "FWHMREF", "[px] reference"), ("half_width", "KHALF", "kernel half width"),
                               ("spatial_order", "KSPORD", "kernel spatial order"), ("bg_order", "KBGORD",
                                                                                       "background order"),
                               ("n_tiles", "KNTILES", "tiles, each its own kernel")):
        value = info.get(key)
        if isinstance(value, (int, float, np.integer, np.floating)) and math.isfinite(float(value)):
            cards.append((name, float(value) if isinstance(value, (float, np.floating)) else int(value), comment))
    return cards


def run(ctx: Night, stack: str) -> dict:
    entry = ctx.item("stack", stack)
    cfg = settings("subtract")
    stack_url = ctx.url(entry["output"])
    keys = names.difference_keys(entry["output"])
    result = {"stack": stack, "output": keys["diff"]}
    if not storage.exists(stack_url):
        raise BadInputError(f"stack {stack} was not made (see the stack stage's result)", path=stack_url)
    ref_key = find_reference(ctx.root, entry["field"], entry["filter"])
    if ref_key is None:
        reason = (f"no reference frame for {entry['field']} in {entry['filter']} under ref_frame/{entry['filter']}/ "
                  f"({' or '.join(settings('reference')['patterns'])})")
        log.event(_log, NO_REFERENCE, level=30, stack=stack, reason=reason)
        return result | {"status": NO_REFERENCE, "flag": "no_reference", "reason": reason, "output": None}
    engine = choose_engine(cfg)
    work = _work_hash(ctx, entry, ref_key, {"cfg": cfg, "engine": engine})
    diff_url = ctx.url(keys["diff"])
    if is_done(diff_url, work, ctx.force):
        log.event(_log, "already subtracted from the same inputs and settings", stack=stack)
        return result | {"status": "done", "skipped": True, "reference": ref_key, **(read_sidecar(diff_url) or {}).get("summary", {})}
    timer = Timer()
    pair = _load_pair(stack_url, ctx.url(ref_key))
    res, device = run_subtraction(pair.new, pair.new_var, pair.new_mask, pair.ref, pair.ref_var, pair.ref_mask,
                                  engine=engine, settings_=cfg.get("settings") or {},
                                  new_saturation=pair.header.get("SATURATE"))
    info = res.kernel_info
    flux_scale = float(info.get("flux_scale", 1.0))
    zp_ref_scaled, zp_diff = difference_zero_point(pair.zp_new, pair.zp_ref, pair.scale, flux_scale)
    fwhm = max(float(info.get("fwhm_new", 0) or 0), float(info.get("fwhm_ref", 0) or 0)) or None
    h = difference_header(pair, entry["output"], ref_key, zp_diff=zp_diff, fwhm=fwhm)
    for name, value, comment in kernel_cards(info, res.convolved):
        h[name] = (value, comment)
    h["GPDEVICE"] = (device, "array backend of the subtraction")
    stamp_provenance(h, work)
    _write_products(ctx, keys, res, h, pair.ref, zp_ref_scaled)
    summary = {"status": "done", "reference": ref_key, "engine": engine, "convolved": res.convolved,
               "flux_scale": round(flux_scale, 5), "zp": zp_diff, "fwhm_px": fwhm,
               "n_stamps": info.get("n_stamps"), "masked_fraction": round(float(np.mean(res.mask)), 4)}
    write_sidecar(diff_url, work, stack=stack, summary=summary, products=keys)
    log.event(_log, "subtracted", stack=stack, reference=ref_key, engine=engine, flux_scale=round(flux_scale, 4),
              seconds=timer.seconds)
    return result | summary | {"products": keys, "seconds": timer.seconds}


def _work_hash(ctx: Night, entry: dict, ref_key: str, settings_: dict) -> str:
    """What a difference is made from: the stack (by its own hash), the reference and the settings."""
    stack_meta = read_sidecar(ctx.url(entry["output"])) or {}
    ref_info = storage.list_objects(ctx.url(ref_key).rsplit("/", 1)[0], recursive=False)
    # a FITS file replaced by another of the same shape has the same size: its time tells them apart
    ref_id = next(({"size": o.size, "mtime": o.mtime} for o in ref_info if o.key == storage.basename(ref_key)), None)
    return input_hash("subtract", [{"stack": entry["output"], "hash": stack_meta.get("hash")},
                                   {"ref": ref_key, **(ref_id or {})}], settings_)


@dataclass
class Pair:
    """A stack and its reference on the stack's grid and zero point, as the engines take them."""

    new: np.ndarray
    new_var: np.ndarray
    new_mask: np.ndarray
    header: fits.Header
    ref: np.ndarray
    ref_var: np.ndarray | None
    ref_mask: np.ndarray
    zp_new: float | None
    zp_ref: float | None
    scale: float


def _load_pair(stack_url: str, ref_url: str) -> Pair:
    new, new_var, new_mask, header = load_stack(stack_url)
    with read_hdul(ref_url) as hdul:
        ref_raw = np.asarray(hdul[0].data, np.float32)
        ref_header = hdul[0].header.copy()
    zp_new = image_zero_point(header)
    zp_ref = reference_zero_point(ref_header)
    # the reference on the stack's zero point: the kernel then only matches PSFs, its flux scale
    # near 1 checks both zero points
    scale = 10 ** (0.4 * (zp_new - zp_ref)) if zp_new is not None and zp_ref is not None else 1.0
    ref, ref_var, ref_mask = reference_on_grid(ref_raw, ref_header, header, new.shape, scale)
    if (~ref_mask).mean() < 0.2:
        raise BadInputError(f"reference {storage.basename(ref_url)} covers {100 * (~ref_mask).mean():.0f}% of the stack",
                            path=stack_url)
    return Pair(new, new_var, new_mask, header, ref, ref_var, ref_mask, zp_new, zp_ref, scale)


def difference_zero_point(zp_new: float | None, zp_ref: float | None, scale: float,
                          flux_scale: float) -> tuple[float | None, float | None]:
    """(zero point of the scaled reference, of the difference).

    The difference is in the (scaled) reference's photometric scale, so its zero point comes from
    the reference's, which a deep reference knows better than the stack knows its own: the
    kernel's flux ratio then measures the stack's zero-point error rather than adding it."""
    zp_ref_scaled = zp_ref + 2.5 * math.log10(scale) if zp_ref is not None else None
    zp_diff = zp_ref_scaled if zp_ref_scaled is not None else (
        zp_new - 2.5 * math.log10(flux_scale) if zp_new is not None else None)
    return zp_ref_scaled, zp_diff


def difference_header(pair: Pair, stack_key: str, ref_key: str, *, zp_diff: float | None,
                      fwhm: float | None) -> fits.Header:
    """The difference's header: the stack's WCS and identity, the reference and zero points."""
    header = pair.header
    h = wcs_of(header).to_header(relax=True)
    for key in ("OBJECT", "FILTER", "TELESCOP", "DATE-OBS", "MJD", "EXPTIME", "NCOMBINE"):
        if key in header:
            h[key] = (header[key], header.comments[key])
    h["STACK"] = (storage.basename(stack_key), "the new image")
    h["REFFRAME"] = (storage.basename(ref_key), "the reference image")
    h["REFSCALE"] = (round(pair.scale, 6), "reference multiplied by this before subtraction")
    if zp_diff is not None:
        h["ZP"] = (round(zp_diff, 5), "mag = ZP - 2.5 log10(ADU) in the difference")
    if pair.zp_new is not None:
        h["ZPNEW"] = (round(pair.zp_new, 5), "zero point of the stack")
    if pair.zp_ref is not None:
        h["ZPREF"] = (round(pair.zp_ref, 5), "zero point of the reference as given")
    if fwhm:
        h["FWHM"] = (round(fwhm, 3), "[px] PSF FWHM of the difference (broader input)")
    return h


def _write_products(ctx: Night, keys: dict, res, h: fits.Header, ref: np.ndarray, zp_ref_scaled: float | None) -> None:
    """Noise, mask and the reference on the grid first, the difference last: a re-run's skip check
    looks at the difference (and its sidecar, written after all of them)."""
    diff_hdus = [fits.PrimaryHDU(np.asarray(res.diff, np.float32), h)]
    kernel = res.kernel_info.get("kernel")
    if isinstance(kernel, np.ndarray) and kernel.ndim == 2:
        diff_hdus.append(fits.ImageHDU(kernel.astype(np.float32), name="KERNEL"))
    noise = np.where(np.isfinite(res.noise), res.noise, 0.0).astype(np.float32)
    put_hdul(ctx.url(keys["noise"]), fits.HDUList([fits.PrimaryHDU(noise, h)]))
    put_hdul(ctx.url(keys["mask"]), fits.HDUList([fits.PrimaryHDU(np.asarray(res.mask).astype(np.uint8), h)]))
    ref_h = h.copy()
    ref_h["ZP"] = (round(zp_ref_scaled, 5) if zp_ref_scaled is not None else "", "zero point of this image")
    put_hdul(ctx.url(keys["ref"]), fits.HDUList([fits.PrimaryHDU(ref, ref_h)]))
    put_hdul(ctx.url(keys["diff"]), fits.HDUList(diff_hdus))
