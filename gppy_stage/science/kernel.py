"""What both subtraction engines share: the result type, the seeing measure and the kernel sizing.

A leaf module (it imports no engine), so ``subtract``, the native engine and the HOTPANTS
wrapper each depend on it and never on one another.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy

from gppy_stage.errors import BadInputError
from gppy_stage.science.photometry import NMAD
from gppy_stage.xp import to_numpy

SIGMA_PER_FWHM = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
GAUSS_DEGREES = (6, 4, 2)


@dataclass
class SubtractionResult:
    """What every engine returns; arrays live in the namespace the engine ran with."""

    diff: Any
    noise: Any
    mask: Any
    convolved: str  # "ref" or "new"
    kernel_info: dict = field(default_factory=dict)

    def to_numpy(self) -> "SubtractionResult":
        """The same result with host (NumPy) arrays, for writing FITS or running sep."""
        return SubtractionResult(
            diff=to_numpy(self.diff), noise=to_numpy(self.noise), mask=to_numpy(self.mask),
            convolved=self.convolved, kernel_info=dict(self.kernel_info),
        )


def sky_level(img, bad, xp=numpy, *, step: int = 4) -> tuple[float, float]:
    """(median, NMAD sigma) of the good pixels on a ``step``-decimated grid: the sky and its scatter."""
    sub = img[::step, ::step][~bad[::step, ::step]]
    if sub.size < 100:
        raise BadInputError("fewer than 100 good pixels in an input image")
    sky = float(xp.median(sub))
    return sky, float(NMAD * xp.median(xp.abs(sub - sky)))


def find_stars(image, var, bad, *, snr: float = 5.0):
    """(sep objects, aperture S/N) of a *sky-subtracted* host image with its variance and bad pixels.

    Detection is at ``snr`` times the median noise (a scalar threshold: sep runs three times
    faster than with a per-pixel error array); the S/N returned uses the per-pixel errors.
    """
    import sep

    data = numpy.ascontiguousarray(image, dtype=numpy.float32)
    bad = numpy.ascontiguousarray(bad, dtype=bool)
    err = numpy.sqrt(numpy.where(bad, numpy.float32(1), numpy.asarray(var, numpy.float32)))
    good_err = err[::4, ::4][~bad[::4, ::4]]
    sigma = float(numpy.median(good_err)) if good_err.size else 1.0
    sep.set_extract_pixstack(max(300000, data.size // 4))
    objs = sep.extract(data, snr * sigma, mask=bad, minarea=5, deblend_cont=0.005)
    # aperture S/N with the real per-pixel errors: sep's isophotal flux carries no error
    flux, ferr, _ = sep.sum_circle(data, objs["x"], objs["y"], 5.0, err=err, mask=bad, subpix=1)
    return objs, flux / numpy.maximum(ferr, 1e-30)


def half_light_diameters(cat, image):
    """(diameter, S/N) of the clean stars of a catalogue found on the same sky-subtracted image.

    The half-light diameter equals the FWHM for a Gaussian; for a Moffat it is a little larger,
    which biases both images alike and so does not change which one is sharper.
    """
    import sep

    objs, snr = cat
    good = (objs["flag"] == 0) & (objs["flux"] > 0)
    o = objs[good]
    if len(o) == 0:
        return numpy.zeros(0), numpy.zeros(0)
    rhalf, _ = sep.flux_radius(numpy.ascontiguousarray(image, dtype=numpy.float32), o["x"], o["y"],
                               6.0 * o["a"], 0.5, subpix=5)
    return 2.0 * rhalf, snr[good]


def fwhm_of(diameters, snr) -> float | None:
    """The seeing: median half-light diameter of the best-measured third (at least 10) of the stars."""
    ok = numpy.isfinite(diameters) & (diameters > 0)
    diameters, snr = numpy.asarray(diameters)[ok], numpy.asarray(snr)[ok]
    if len(diameters) < 3:
        return None
    top = numpy.argsort(-snr)[: max(10, len(diameters) // 3)]
    return float(numpy.median(diameters[top]))


def measure_fwhm(image, bad, var=None) -> float | None:
    """Seeing of a host image *with its sky still in it*: the sky is measured and removed first
    (a half-light radius on top of a sky pedestal measures the aperture, not the star)."""
    image = numpy.asarray(image, dtype=numpy.float32)
    bad = numpy.asarray(bad, dtype=bool) | ~numpy.isfinite(image)
    sky, sig = sky_level(image, bad)
    var = numpy.full(image.shape, sig * sig, numpy.float32) if var is None else numpy.asarray(var, numpy.float32)
    data = numpy.where(bad, 0.0, image - sky).astype(numpy.float32)
    return fwhm_of(*half_light_diameters(find_stars(data, var, bad), data))


def direction(fwhm_new: float, fwhm_ref: float, forced: str | None = None) -> str:
    """Which image to convolve: the sharper one, so the kernel never deconvolves."""
    return forced or ("ref" if fwhm_ref <= fwhm_new else "new")


def matching_sigmas(fwhm_src: float, fwhm_tgt: float, given=None) -> tuple[float, ...]:
    """Gaussian widths of the kernel basis: (0.5, 1, 2) x the matching sigma (HOTPANTS README's rule)."""
    if given:
        return tuple(float(s) for s in given)
    s = math.sqrt(max((fwhm_tgt * SIGMA_PER_FWHM) ** 2 - (fwhm_src * SIGMA_PER_FWHM) ** 2, 0.5**2))
    return max(0.5 * s, 0.6), max(s, 0.9), max(2.0 * s, 1.5)


def kernel_half_width(sigmas, given=None) -> int:
    """Half-width of the kernel: three of its widest Gaussian's sigmas, within [5, 25] px."""
    return int(given or min(max(math.ceil(3.0 * max(sigmas)), 5), 25))
