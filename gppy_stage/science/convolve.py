"""Convolution and mask growth on any array namespace (NumPy or CuPy), in float32 or float64."""

from __future__ import annotations

import numpy


def fast_len(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n: FFT lengths with large prime factors are many times slower."""
    m = n
    while True:
        k = m
        for p in (2, 3, 5):
            while k % p == 0:
                k //= p
        if k == 1:
            return m
        m += 1


def fft_module(xp):
    """scipy.fft for NumPy arrays (it keeps float32 as float32; numpy.fft would promote), else xp.fft."""
    if xp is numpy:
        import scipy.fft

        return scipy.fft
    return xp.fft


def fft_convolve(images, kernels, xp=numpy, *, fft_shape=None):
    """'same'-size convolution of ``images (..., H, W)`` by centred odd ``kernels (..., K, K)``.

    Zero padding (not wrap-around) outside the image; leading axes broadcast.
    """
    H, W = images.shape[-2:]
    hw = kernels.shape[-1] // 2
    if fft_shape is None:
        fft_shape = (fast_len(H + hw + 1), fast_len(W + hw + 1))
    fi = fft_module(xp).rfft2(images, s=fft_shape)
    return apply_kernel_fft(fi, kernels, fft_shape, (H, W), xp)


def _kernel_fft(kernels, fft_shape, xp):
    hw = kernels.shape[-1] // 2
    kp = xp.zeros(kernels.shape[:-2] + tuple(fft_shape), dtype=kernels.dtype)
    kp[..., : kernels.shape[-2], : kernels.shape[-1]] = kernels
    # the kernel's centre goes to pixel (0, 0) so the output is not shifted
    kp = xp.roll(kp, (-hw, -hw), axis=(-2, -1))
    return fft_module(xp).rfft2(kp)


def apply_kernel_fft(fi, kernels, fft_shape, out_hw, xp, offset=(0, 0)):
    out = fft_module(xp).irfft2(fi * _kernel_fft(kernels, fft_shape, xp), s=fft_shape)
    return out[..., offset[0]:offset[0] + out_hw[0], offset[1]:offset[1] + out_hw[1]]


def _ndimage(xp):
    """scipy.ndimage for NumPy arrays, cupyx.scipy.ndimage for CuPy ones (the same functions)."""
    if xp is numpy:
        import scipy.ndimage

        return scipy.ndimage
    import cupyx.scipy.ndimage

    return cupyx.scipy.ndimage


def box_dilate(mask, r: int, xp=numpy):
    """Grow a boolean mask by a (2r+1)^2 square: a running maximum along each axis (exact)."""
    if r <= 0:
        return mask.astype(bool)
    nd = _ndimage(xp)
    m = nd.maximum_filter1d(mask.astype(xp.uint8), 2 * r + 1, axis=0, mode="constant")
    return nd.maximum_filter1d(m, 2 * r + 1, axis=1, mode="constant") > 0
