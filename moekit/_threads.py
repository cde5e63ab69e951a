"""The OpenMP wait policy moekit runs under, chosen before torch loads its OpenMP runtime.

torch's CPU ops and moekit's kernels share torch's ``libgomp``, whose threads by default spin
300,000 rounds (``LIBGOMP_SPIN_COUNT``) at the end of every parallel region before they
sleep. On a machine with other busy processes a waiting thread then burns the time slice
that the thread it waits for needs, and a training step can take several times its quiet
time (dense layers alike); a shorter spin keeps the quiet speed and the busy machine's
ratios (``benchmarks/moe_layer.py --neighbours``; the figures are in docs/throughput.md).
libgomp reads the setting once, when it loads, so it is set here, before ``import torch``,
and only where the user set neither ``OMP_WAIT_POLICY`` nor ``GOMP_SPINCOUNT`` (their choice
stands; a training run warns where it hurts: :mod:`moekit.training.machine`).
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "10000"  # rounds a waiting thread spins before it sleeps
LIBGOMP_SPIN_COUNT = 300_000  # libgomp's own default
USER_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def choose_wait_policy(environ=os.environ, modules=sys.modules) -> bool:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` in ``environ`` unless the user chose a
    wait policy or torch (and with it libgomp) is already loaded. Returns whether it did."""
    if any(name in environ for name in USER_SETTINGS) or "torch" in modules:
        return False
    environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


CHOSEN = choose_wait_policy()
