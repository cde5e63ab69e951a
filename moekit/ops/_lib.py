"""The built kernels for an op that the calling module chose."""

from __future__ import annotations

import ctypes

from moekit import kernels


def lib() -> ctypes.CDLL:
    """The kernels; a RuntimeError where they are not built (the caller should have chosen
    the torch-ops path: :func:`moekit.kernels.for_tensors`)."""
    built = kernels.load()
    if built is None:
        raise RuntimeError(f"this op needs moekit's CPU kernels, which are unavailable ({kernels.status()})")
    return built
