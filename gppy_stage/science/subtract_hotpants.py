"""HOTPANTS behind the ``subtract`` interface: one temporary directory per call.

The images, their noise (sigma) images and masks are written as FITS, hotpants is run with
thresholds from the images' own statistics and the same kernel-width rule as the native
engine, and the difference, noise and mask it writes are read back into a SubtractionResult.
``-n t`` normalises to the template, so the difference is in the reference's scale, as the
interface promises. HOTPANTS' output is image - template in both convolution directions.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy

from gppy_stage.errors import BadInputError, ToolError, ToolMissingError
from gppy_stage.tools import astromatic

SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))


def hotpants_path() -> str | None:
    return shutil.which("hotpants")


def _stats(img, bad):
    good = img[~bad]
    if good.size < 100:
        raise BadInputError("fewer than 100 good pixels in an input image")
    med = float(numpy.median(good))
    sig = float(1.4826 * numpy.median(numpy.abs(good - med)))
    return med, sig


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
            "-r", str(kernel_half), "-rss", str(stamp_half),
            "-ng", str(len(sigmas))]
    for d, s in zip(degrees, sigmas):
        args += [str(d), f"{s:.4f}"]
    for k, v in (extra or {}).items():
        args += [f"-{k}"] + ([] if v is None else [str(v)])
    return args


def subtract_hotpants(new, ref, *, new_var=None, ref_var=None, new_mask=None, ref_mask=None, **settings):
    """Run hotpants on host arrays; returns a SubtractionResult (NumPy arrays)."""
    from astropy.io import fits

    from gppy_stage.science.subtract import SubtractionResult
    from gppy_stage.science.subtract_native import _fwhm_from, find_stars

    exe = hotpants_path()
    if exe is None:
        raise ToolMissingError("hotpants is not on PATH (it is built into the pipeline's container image)")
    new = numpy.asarray(new, dtype=numpy.float64)
    ref = numpy.asarray(ref, dtype=numpy.float64)
    n_bad = ~numpy.isfinite(new) | (numpy.zeros(new.shape, bool) if new_mask is None else numpy.asarray(new_mask, bool))
    r_bad = ~numpy.isfinite(ref) | (numpy.zeros(ref.shape, bool) if ref_mask is None else numpy.asarray(ref_mask, bool))
    n_med, n_sig = _stats(new, n_bad)
    r_med, r_sig = _stats(ref, r_bad)
    new_var = numpy.full(new.shape, n_sig**2) if new_var is None else numpy.asarray(new_var, numpy.float64)
    ref_var = numpy.full(ref.shape, r_sig**2) if ref_var is None else numpy.asarray(ref_var, numpy.float64)

    fw_new = settings.pop("new_fwhm", None)
    fw_ref = settings.pop("ref_fwhm", None)
    if fw_new is None:
        fw_new = _fwhm_from(find_stars(numpy.where(n_bad, 0, new - n_med), new_var + n_bad, n_bad), new)
    if fw_ref is None:
        fw_ref = _fwhm_from(find_stars(numpy.where(r_bad, 0, ref - r_med), ref_var + r_bad, r_bad), ref)
    if fw_new is None or fw_ref is None:
        raise BadInputError("too few stars to measure the seeing of both images")
    convolve = settings.pop("convolve", None) or ("ref" if fw_ref <= fw_new else "new")
    fs, ft = (fw_ref, fw_new) if convolve == "ref" else (fw_new, fw_ref)
    s_match = math.sqrt(max((ft * SIGMA_PER_FWHM) ** 2 - (fs * SIGMA_PER_FWHM) ** 2, 0.5**2))
    sigmas = settings.pop("gauss_sigmas", None) or (max(0.5 * s_match, 0.6), max(s_match, 0.9), max(2 * s_match, 1.5))
    degrees = settings.pop("gauss_degrees", (6, 4, 2))
    kernel_half = settings.pop("kernel_half", None) or min(max(math.ceil(3 * max(sigmas)), 5), 25)
    saturation = settings.pop("saturation", None)
    new_sat = settings.pop("new_saturation", saturation)
    ref_sat = settings.pop("ref_saturation", saturation)
    timeout = settings.pop("timeout", 1800)

    with tempfile.TemporaryDirectory(prefix="gppy_hotpants_") as tmp:
        p = {k: os.path.join(tmp, f"{k}.fits") for k in
             ("new", "ref", "new_noise", "ref_noise", "new_mask", "ref_mask", "diff", "noise", "mask")}
        fits.writeto(p["new"], numpy.where(n_bad, n_med, new).astype(numpy.float32))
        fits.writeto(p["ref"], numpy.where(r_bad, r_med, ref).astype(numpy.float32))
        fits.writeto(p["new_noise"], numpy.sqrt(numpy.where(n_bad, n_sig**2, new_var)).astype(numpy.float32))
        fits.writeto(p["ref_noise"], numpy.sqrt(numpy.where(r_bad, r_sig**2, ref_var)).astype(numpy.float32))
        fits.writeto(p["new_mask"], n_bad.astype(numpy.int16))
        fits.writeto(p["ref_mask"], r_bad.astype(numpy.int16))
        args = build_args(
            new_path=p["new"], ref_path=p["ref"], out_path=p["diff"], new_noise=p["new_noise"],
            ref_noise=p["ref_noise"], new_mask=p["new_mask"], ref_mask=p["ref_mask"], out_noise=p["noise"],
            out_mask=p["mask"], new_stats=(n_med, n_sig, float(new[~n_bad].max())),
            ref_stats=(r_med, r_sig, float(ref[~r_bad].max())), new_sat=new_sat, ref_sat=ref_sat,
            convolve=convolve, sigmas=sigmas, degrees=degrees, kernel_half=kernel_half,
            stamp_half=settings.pop("stamp_half", 10), nsx=settings.pop("nsx", 3), nsy=settings.pop("nsy", 2),
            kernel_order=settings.pop("spatial_order", 2), bg_order=settings.pop("bg_order", 1),
            extra=settings.pop("extra", None))
        if settings:
            from gppy_stage.errors import ConfigError

            raise ConfigError(f"unknown hotpants settings: {sorted(settings)}")
        args[0] = exe
        # the one runner of external programs: a timeout or a failure is a ToolError with stderr
        proc = astromatic.run_tool("hotpants", args[1:], Path(tmp), timeout=timeout)
        if not os.path.exists(p["diff"]):
            raise ToolError(f"hotpants wrote no difference image: {proc.stderr.strip()[-4000:]}")
        with fits.open(p["diff"]) as h:
            diff = h[0].data.astype(numpy.float64)
            hdr = h[0].header
        noise = fits.getdata(p["noise"]).astype(numpy.float64)
        mask = fits.getdata(p["mask"]) != 0 if os.path.exists(p["mask"]) else numpy.zeros(diff.shape, bool)
    mask |= n_bad | r_bad | ~numpy.isfinite(diff) | ~(noise > 0)
    convolved = "new" if str(hdr.get("CONVOL00", "TEMPLATE")).strip().upper().startswith("IMAGE") else "ref"
    ksum = float(hdr.get("KSUM00", numpy.nan))
    info = dict(engine="hotpants", sum=ksum, flux_scale=ksum if convolved == "ref" else 1.0 / ksum,
                chi2=float(hdr.get("X2NRM00", numpy.nan)), n_stamps=hdr.get("NSTAMP00", hdr.get("NSSTAMP0")),
                fwhm_new=float(fw_new), fwhm_ref=float(fw_ref), gauss_sigmas=list(sigmas), half_width=kernel_half,
                command=" ".join(args), stdout_tail=proc.stdout[-2000:])
    return SubtractionResult(diff=numpy.where(mask, 0.0, diff), noise=numpy.where(noise > 0, noise, numpy.inf),
                             mask=mask, convolved=convolved, kernel_info=info)
