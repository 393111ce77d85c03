"""Shared test settings.

One intra-op thread: the tiny models of the parity tests run as fast on one thread, and the suite does not
oversubscribe a small (2-core) machine when other work is running on it.
"""

import numpy as np
import pytest
import torch
from diffusers.schedulers import scheduling_lms_discrete

torch.set_num_threads(1)


class GaussLegendre:
    """Stand-in for scipy.integrate, which diffusers' LMSDiscreteScheduler uses for its coefficients (scipy
    is not a dependency): 8-point Gauss-Legendre quadrature, exact for polynomials up to degree 15, and LMS
    integrates Lagrange polynomials of degree <= 3, as scipy's quad does."""

    nodes, weights = np.polynomial.legendre.leggauss(8)

    @classmethod
    def quad(cls, f, a, b, epsrel=None):
        a, b = float(a), float(b)
        mid, half = (a + b) / 2, (b - a) / 2
        total = sum(float(w) * float(f(mid + half * x)) for x, w in zip(cls.nodes, cls.weights, strict=True))
        return half * total, 0.0


@pytest.fixture
def lms_reference(monkeypatch):
    """The real diffusers LMSDiscreteScheduler: with scipy when installed, else with GaussLegendre."""
    try:
        import scipy.integrate  # noqa: F401
    except ImportError:
        monkeypatch.setattr(scheduling_lms_discrete, "integrate", GaussLegendre, raising=False)
