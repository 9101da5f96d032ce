"""Hypothesis profiles, registered once for the whole suite (imported by tests/conftest.py).

``ci`` (the default): 200 examples a test, no deadline (the machines are shared). ``many``: 20,000,
for a run by hand: ``HYPOTHESIS_PROFILE=many pytest tests/unit/test_fuzz_feed.py``. Another profile
may be added here; each is named in ``HYPOTHESIS_PROFILE``.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("many", max_examples=20_000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
