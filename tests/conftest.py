"""Shared test configuration: Hypothesis profiles.

``default`` (a plain ``pytest``, as the README's command runs it) is derandomised: every run
tries the same 60 examples per property, so a pass or a failure reproduces on any machine.
``ci`` (used when ``CI`` is set) is the same with 40 examples. ``explore``
(``HYPOTHESIS_PROFILE=explore``) draws new random examples on every run, to look for failures;
``thorough`` draws 1000 per property, for a long soak. What the random profiles find goes into
a regression test with ``@example``.
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings

# Derandomised: the same examples on every run and machine, so a result reproduces.
_REPRODUCIBLE: dict[str, Any] = {
    "derandomize": True,
    "deadline": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow],
}
settings.register_profile("ci", max_examples=40, **_REPRODUCIBLE)
settings.register_profile("default", max_examples=60, **_REPRODUCIBLE)
settings.register_profile("explore", max_examples=60, deadline=None, print_blob=True)
settings.register_profile("thorough", max_examples=1000, deadline=None, print_blob=True)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "default")
)
