"""Image subtraction: one interface, two engines.

``subtract(new, ref, ...)`` matches the PSF and photometric scale of two images that are
already on the same pixel grid (SWarp resamples upstream) and returns ``new - ref`` in the
*reference's* photometric scale, with a per-pixel 1-sigma noise image and a bad-pixel mask.

Engines:
- ``"native"``: our Alard & Lupton (1998) / Alard (2000) engine (``subtract_native``), pure
  array code through an array namespace, so the same code runs on NumPy and CuPy.
- ``"hotpants"``: the HOTPANTS program, one temporary directory per call
  (``gppy_stage.tools.hotpants``).

Conventions shared by both engines (and relied on by ``detect``):
- ``diff`` is new - ref, so a source that brightened is positive, in the reference's flux
  units (a source of flux F in the reference has flux F in ``diff`` if it doubled).
- ``noise`` is the 1-sigma of ``diff`` pixel by pixel (same units), ``mask`` is True where
  ``diff`` is not to be trusted (input masks, edges, saturated stars, grown by the kernel).
- ``convolved`` says which input was convolved: the one with the sharper PSF, so that the
  kernel never has to deconvolve.
- ``kernel_info["flux_scale"]`` is new/ref (the transparency/exposure ratio) whichever image
  was convolved; ``kernel_info["sum"]`` is the raw kernel sum (= flux_scale when the
  reference was convolved, 1/flux_scale when the new image was).
"""

from __future__ import annotations

import numpy

from gppy_stage.errors import BadInputError, ConfigError
from gppy_stage.science.kernel import SubtractionResult
from gppy_stage.science.subtract_native import subtract_native
from gppy_stage.tools.hotpants import subtract_hotpants
from gppy_stage.xp import to_numpy

ENGINES = ("native", "hotpants")
__all__ = ["ENGINES", "SubtractionResult", "subtract"]


def subtract(
    new,
    ref,
    *,
    new_var=None,
    ref_var=None,
    new_mask=None,
    ref_mask=None,
    engine: str = "native",
    xp=numpy,
    **settings,
) -> SubtractionResult:
    """Subtract ``ref`` from ``new`` after matching PSFs; see the module docstring.

    ``new_var``/``ref_var`` are per-pixel variances in the images' own units (None: estimated
    from the sky scatter, flat). ``new_mask``/``ref_mask`` are True on bad pixels (None: only
    non-finite pixels are bad). ``settings`` go to the engine (see ``subtract_native.DEFAULTS``
    and ``tools.hotpants.subtract_hotpants``).
    """
    if engine not in ENGINES:
        raise ConfigError(f"unknown subtraction engine {engine!r}; use one of {ENGINES}")
    if getattr(new, "shape", None) != getattr(ref, "shape", None) or getattr(new, "ndim", 0) != 2:
        raise BadInputError(
            f"new and ref must be 2-D and on the same pixel grid: shapes "
            f"{getattr(new, 'shape', None)} and {getattr(ref, 'shape', None)}"
        )
    for name, arr in (("new_var", new_var), ("ref_var", ref_var), ("new_mask", new_mask), ("ref_mask", ref_mask)):
        if arr is not None and arr.shape != new.shape:
            raise BadInputError(f"{name} has shape {arr.shape}, images have {new.shape}")
    if engine == "native":
        return subtract_native(new, ref, new_var=new_var, ref_var=ref_var, new_mask=new_mask,
                               ref_mask=ref_mask, xp=xp, **settings)
    return subtract_hotpants(to_numpy(new), to_numpy(ref), new_var=None if new_var is None else to_numpy(new_var),
                             ref_var=None if ref_var is None else to_numpy(ref_var),
                             new_mask=None if new_mask is None else to_numpy(new_mask),
                             ref_mask=None if ref_mask is None else to_numpy(ref_mask), **settings)
