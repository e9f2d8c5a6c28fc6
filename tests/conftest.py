"""Shared test configuration: Hypothesis profiles.

``ci`` (used when ``CI`` is set, or with ``HYPOTHESIS_PROFILE=ci``) is derandomised and bounded so
that CI runs are reproducible and fast; ``dev`` explores more; ``thorough`` is for a long soak.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    derandomize=True,
    max_examples=40,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=60, deadline=None)
settings.register_profile("thorough", max_examples=1000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
