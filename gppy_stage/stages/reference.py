"""The reference frame of a field: finding it, and resampling it onto another image's grid.

The reference of a field and filter is ``ref_frame/<filter>/ref_7DT_<OBJ>_*.fits``, else
``ref_PS1_<OBJ>_*_<filter>_0.fits`` (``config/subtract.yaml``'s ``reference.patterns``). The
subtract stage resamples it onto a stack's grid, the completeness stage onto a window of it, the
detect stage's cut-outs onto a box of a single frame: all through :func:`reference_on_grid`
(SWarp, with the reference's variance carried as a weight map).

A field without a reference is no failure: :data:`NO_REFERENCE` is the status the stages that
read a difference image then report (:func:`without_difference`).
"""

from __future__ import annotations

import fnmatch

import numpy as np
from astropy.io import fits

from .. import storage
from ..config import settings
from ..errors import BadInputError
from ..fitsio import header_zero_point
from ..headers import plausible_gain
from ..science.photometry import NMAD
from ..tools import swarp as sw
from .base import Night

NO_REFERENCE = "no reference"
REF_ZP_KEYS = ("ZP", "ZP_AUTO", "ZP_APER_1", "MAGZERO", "MAGZPT")


def without_difference(ctx: Night, entry: dict, diff_url: str, purpose: str) -> dict:
    """The result of a stage that reads a stack's difference image when there is none: "no
    reference" when there was nothing to subtract (``purpose`` says what is then not done);
    otherwise the subtract stage failed on it, which is said, naming the file."""
    if find_reference(ctx.root, entry["field"], entry["filter"]) is None:
        return {"status": NO_REFERENCE, "flag": "no_reference", "output": None,
                "reason": f"no reference frame for {entry['field']} in {entry['filter']}: nothing to {purpose}"}
    raise BadInputError(f"stack {entry['id']} has no difference image (see the subtract stage's result)", path=diff_url)


def image_zero_point(header: fits.Header) -> float | None:
    """Zero point of a stack or calibrated frame, the one the reference is scaled to: the
    photometry stage's ``ZP``, else the first of ``stack.zp_keys``; None without one."""
    return header_zero_point(header, ("ZP",) + tuple(settings("stack")["zp_keys"]))[0]


def reference_zero_point(header: fits.Header) -> float | None:
    """Zero point of a reference frame (7DT's deep stacks carry ``ZP``, PS1's ``MAGZERO`` and the
    like: :data:`REF_ZP_KEYS`); None without one, and the reference is then used unscaled."""
    return header_zero_point(header, REF_ZP_KEYS)[0]


def find_reference(root: str, field: str, filt: str, patterns=None) -> str | None:
    """Key (relative to root) of the reference frame of a field and filter, or None.

    Patterns are tried in order (7DT's own deep stacks first, then PS1); within one the last
    name in sort order wins, so a newer reference named with a later date replaces an older one.
    """
    patterns = patterns or settings("reference")["patterns"]
    prefix = f"ref_frame/{filt}"
    names = [o.key for o in storage.list_objects(storage.join(root, prefix), recursive=False)]
    for pattern in patterns:
        hits = sorted(n for n in names if fnmatch.fnmatchcase(n, pattern.format(obj=field, filter=filt)))
        if hits:
            return f"{prefix}/{hits[-1]}"
    return None


def reference_variance(ref: np.ndarray, header: fits.Header) -> np.ndarray | None:
    """Variance of a (sky-subtracted) reference: the sky's, measured from the image itself, plus
    the sources' Poisson noise from its gain in e-/ADU (EGAIN; GAIN only where it can be e-/ADU,
    since 7DT's GAIN is the camera setting 2750). None without a usable gain: the engine then
    measures a flat variance from the sky scatter."""
    gain = next((float(header[k]) for k in ("EGAIN", "GAIN") if plausible_gain(header.get(k))), None)
    finite = ref[np.isfinite(ref)]
    if gain is None or finite.size < 100:
        return None
    sample = finite[:: max(1, finite.size // 1_000_000)]
    sky = float(np.median(sample))
    sky_var = float((NMAD * np.median(np.abs(sample - sky))) ** 2)
    var = sky_var + np.clip(ref - sky, 0, None) / gain
    return np.where(var > 0, var, np.nan).astype(np.float32)


def reference_on_grid(ref: np.ndarray, ref_header: fits.Header, grid_header: fits.Header, shape: tuple[int, int],
                      scale: float) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(image, variance or None, bad-pixel mask) of the reference resampled onto a grid and scaled."""
    var = reference_variance(ref, ref_header)
    weight = None if var is None else np.where(np.isfinite(var), 1.0 / np.where(np.isfinite(var), var, 1.0), 0.0)
    good = np.isfinite(ref)
    item = sw.SwarpInput(data=np.where(good, ref, 0.0), header=ref_header,
                         weight=np.where(good, 1.0 if weight is None else weight, 0.0))
    out = sw.resample(item, grid_header, shape, {"NTHREADS": int(settings("stack")["nthreads"])})
    covered = out.weight > 0
    img = np.where(covered, out.image * scale, 0.0).astype(np.float32)
    rvar = None
    if var is not None:
        rvar = np.where(covered, scale * scale / np.where(covered, out.weight, 1.0), 0.0).astype(np.float32)
    return img, rvar, ~covered
