"""Shared test configuration: float64 by default, fixed seeds, hypothesis profiles.

Hypothesis profiles: ``dev`` (default, 50 examples), ``ci`` (20 examples, no deadline; chosen
automatically when the CI environment variable is set), ``slow`` (1,000 examples).  Pick one
with ``--hypothesis-profile=NAME`` or ``HYPOTHESIS_PROFILE=NAME``.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile("dev", max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=20, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("slow", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

# One torch thread per test process: the suite runs under pytest-xdist (one worker per core),
# and torch's intra-op threads on top of that oversubscribe the cores (measured: the particle
# filter tests take 10x longer with 2 threads per worker on a 2-core machine).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Every test runs in float64 with a fixed seed; the previous dtype is restored."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(old)
