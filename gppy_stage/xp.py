"""The array namespace: NumPy on the CPU, CuPy on a GPU, one code path for both.

``GPPY_DEVICE`` chooses: ``cpu`` (default), ``gpu`` (fail if CuPy or a device is missing), or
``auto`` (CuPy when a CUDA device answers, NumPy otherwise). Pixel kernels take ``xp`` as an
argument rather than importing either library, so CI exercises the same code the GPU runs.
"""

from __future__ import annotations

import functools
import os

import numpy

from .errors import ConfigError


@functools.lru_cache(maxsize=1)
def _cupy():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
        return cupy
    except Exception:  # no CuPy, no driver, or no device: all mean "not here"
        return None


def gpu_available() -> bool:
    return _cupy() is not None


def get_xp(device: str | None = None):
    """The namespace for ``device`` (or ``$GPPY_DEVICE``): ``numpy`` or ``cupy``."""
    device = (device or os.environ.get("GPPY_DEVICE") or "cpu").lower()
    if device == "cpu":
        return numpy
    if device in ("gpu", "auto"):
        cp = _cupy()
        if cp is not None:
            return cp
        if device == "gpu":
            raise ConfigError("GPPY_DEVICE=gpu but CuPy or a CUDA device is not available "
                              "(CuPy comes with pip install 'gppy-stage[gpu]')")
        return numpy
    raise ConfigError(f"GPPY_DEVICE must be cpu, gpu or auto, not {device!r}")


def to_numpy(array) -> numpy.ndarray:
    """A host (NumPy) array of a NumPy or CuPy array, or of anything array-like.

    CuPy arrays are recognised by their ``.get()``, so CPU-only installs never import CuPy."""
    if hasattr(array, "get") and not isinstance(array, numpy.ndarray):
        return array.get()
    return numpy.asarray(array)


def device_name(xp) -> str:
    return "gpu" if xp is not numpy else "cpu"
