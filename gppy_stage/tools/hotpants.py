"""HOTPANTS (Becker 2015) behind the subtraction interface: one temporary directory per call.

The images, their noise (sigma) images and masks are written as FITS; hotpants runs with
thresholds from the images' own statistics and the kernel sized by the same rule as the native
engine (``science.kernel``), from the seeing measured on the sky-subtracted images; the
difference, noise and mask it writes are read back into a SubtractionResult. ``-n t``
normalises to the template, so the difference is in the reference's scale, as the interface
promises. HOTPANTS' output is image - template in both convolution directions.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy
from astropy.io import fits

from ..errors import BadInputError, ConfigError, ToolError, ToolMissingError
from ..science.kernel import (GAUSS_DEGREES, SubtractionResult, direction, kernel_half_width, matching_sigmas,
                              measure_fwhm, sky_level)
from . import astromatic


def hotpants_path() -> str | None:
    return shutil.which("hotpants")


def stamp_half_width(kernel_half: int, stamp_half: int = 10) -> int:
    """HOTPANTS' ``-rss``: it refuses a substamp narrower than the kernel (``rss < r``), and the fit
    needs the star's wings beyond the kernel's reach, so half again the kernel at least."""
    return max(int(stamp_half), math.ceil(1.5 * kernel_half))


def build_args(*, new_path, ref_path, out_path, new_noise, ref_noise, new_mask, ref_mask, out_noise, out_mask,
               new_stats, ref_stats, new_sat, ref_sat, convolve, sigmas, degrees, kernel_half, stamp_half,
               nsx=3, nsy=2, kernel_order=2, bg_order=1, extra=None) -> list[str]:
    """The hotpants command line (a pure function, so tests can check it without the binary)."""
    (n_med, n_sig, n_max), (r_med, r_sig, r_max) = new_stats, ref_stats
    # lower limit well below the sky so noise never counts as bad; upper limit the saturation
    # level when known, else just above the brightest good pixel
    args = ["hotpants", "-inim", new_path, "-tmplim", ref_path, "-outim", out_path,
            "-ini", new_noise, "-tni", ref_noise, "-imi", new_mask, "-tmi", ref_mask,
            "-oni", out_noise, "-omi", out_mask,
            "-il", f"{n_med - 10 * n_sig:.6g}", "-iu", f"{(new_sat if new_sat is not None else 1.01 * n_max):.6g}",
            "-tl", f"{r_med - 10 * r_sig:.6g}", "-tu", f"{(ref_sat if ref_sat is not None else 1.01 * r_max):.6g}",
            "-ig", "1", "-tg", "1", "-ir", "0", "-tr", "0",
            "-c", "t" if convolve == "ref" else "i", "-n", "t",
            "-nsx", str(nsx), "-nsy", str(nsy), "-ko", str(kernel_order), "-bgo", str(bg_order),
            "-r", str(kernel_half), "-rss", str(stamp_half_width(kernel_half, stamp_half)),
            "-ng", str(len(sigmas))]
    for d, s in zip(degrees, sigmas):
        args += [str(d), f"{s:.4f}"]
    for k, v in (extra or {}).items():
        args += [f"-{k}"] + ([] if v is None else [str(v)])
    return args


def _bad(img, mask):
    bad = ~numpy.isfinite(img)
    return bad if mask is None else bad | numpy.asarray(mask, bool)


def _write_inputs(p, new, ref, new_var, ref_var, n_bad, r_bad, n_stats, r_stats):
    for key, img, var, bad, (med, sig) in (("new", new, new_var, n_bad, n_stats), ("ref", ref, ref_var, r_bad, r_stats)):
        fits.writeto(p[key], numpy.where(bad, med, img).astype(numpy.float32))
        noise = numpy.full(img.shape, sig, numpy.float32) if var is None else numpy.sqrt(numpy.where(bad, sig**2, var))
        fits.writeto(p[f"{key}_noise"], noise.astype(numpy.float32))
        fits.writeto(p[f"{key}_mask"], bad.astype(numpy.int16))


def _read_outputs(p, proc):
    if not os.path.exists(p["diff"]):
        raise ToolError(f"hotpants wrote no difference image: {proc.stderr.strip()[-4000:]}")
    with fits.open(p["diff"]) as h:
        diff, hdr = h[0].data.astype(numpy.float32), h[0].header.copy()
    noise = fits.getdata(p["noise"]).astype(numpy.float32)
    mask = fits.getdata(p["mask"]) != 0 if os.path.exists(p["mask"]) else numpy.zeros(diff.shape, bool)
    return diff, noise, mask, hdr


def subtract_hotpants(new, ref, *, new_var=None, ref_var=None, new_mask=None, ref_mask=None, **settings):
    """Run hotpants on host arrays; returns a SubtractionResult (NumPy arrays)."""
    exe = hotpants_path()
    if exe is None:
        raise ToolMissingError("hotpants is not on PATH (it is built into the pipeline's container image)")
    new, ref = numpy.asarray(new, numpy.float32), numpy.asarray(ref, numpy.float32)
    n_bad, r_bad = _bad(new, new_mask), _bad(ref, ref_mask)
    n_stats, r_stats = sky_level(new, n_bad), sky_level(ref, r_bad)
    fw_new = settings.pop("new_fwhm", None) or measure_fwhm(new, n_bad, new_var)
    fw_ref = settings.pop("ref_fwhm", None) or measure_fwhm(ref, r_bad, ref_var)
    if fw_new is None or fw_ref is None:
        raise BadInputError("too few stars to measure the seeing of both images")
    convolve = direction(fw_new, fw_ref, settings.pop("convolve", None))
    fs, ft = (fw_ref, fw_new) if convolve == "ref" else (fw_new, fw_ref)
    sigmas = matching_sigmas(fs, ft, settings.pop("gauss_sigmas", None))
    degrees = tuple(settings.pop("gauss_degrees", None) or GAUSS_DEGREES)
    kernel_half = kernel_half_width(sigmas, settings.pop("kernel_half", None))
    saturation = settings.pop("saturation", None)
    opts = dict(new_sat=settings.pop("new_saturation", saturation), ref_sat=settings.pop("ref_saturation", saturation),
                stamp_half=settings.pop("stamp_half", 10), nsx=settings.pop("nsx", 3), nsy=settings.pop("nsy", 2),
                kernel_order=settings.pop("spatial_order", 2), bg_order=settings.pop("bg_order", 1),
                extra=settings.pop("extra", None))
    timeout = settings.pop("timeout", 1800)
    if settings:
        raise ConfigError(f"unknown hotpants settings: {sorted(settings)}")

    with tempfile.TemporaryDirectory(prefix="gppy_hotpants_") as tmp:
        p = {k: os.path.join(tmp, f"{k}.fits") for k in
             ("new", "ref", "new_noise", "ref_noise", "new_mask", "ref_mask", "diff", "noise", "mask")}
        _write_inputs(p, new, ref, new_var, ref_var, n_bad, r_bad, n_stats, r_stats)
        args = build_args(
            new_path=p["new"], ref_path=p["ref"], out_path=p["diff"], new_noise=p["new_noise"],
            ref_noise=p["ref_noise"], new_mask=p["new_mask"], ref_mask=p["ref_mask"], out_noise=p["noise"],
            out_mask=p["mask"], new_stats=(*n_stats, float(new[~n_bad].max())),
            ref_stats=(*r_stats, float(ref[~r_bad].max())), convolve=convolve, sigmas=sigmas, degrees=degrees,
            kernel_half=kernel_half, **opts)
        # the one runner of external programs: a timeout or a failure is a ToolError with stderr
        proc = astromatic.run_tool("hotpants", args[1:], Path(tmp), timeout=timeout)
        diff, noise, mask, hdr = _read_outputs(p, proc)
    mask |= n_bad | r_bad | ~numpy.isfinite(diff) | ~(noise > 0)
    convolved = "new" if str(hdr.get("CONVOL00", "TEMPLATE")).strip().upper().startswith("IMAGE") else "ref"
    ksum = float(hdr.get("KSUM00", numpy.nan))
    info = dict(engine="hotpants", sum=ksum, flux_scale=ksum if convolved == "ref" else 1.0 / ksum,
                chi2=float(hdr.get("X2NRM00", numpy.nan)), n_stamps=hdr.get("NSTAMP00", hdr.get("NSSTAMP0")),
                fwhm_new=float(fw_new), fwhm_ref=float(fw_ref), gauss_sigmas=list(sigmas), half_width=kernel_half,
                command=" ".join([exe] + args[1:]), stdout_tail=proc.stdout[-2000:])
    return SubtractionResult(diff=numpy.where(mask, 0.0, diff).astype(numpy.float32),
                             noise=numpy.where(noise > 0, noise, numpy.inf).astype(numpy.float32),
                             mask=mask, convolved=convolved, kernel_info=info)
