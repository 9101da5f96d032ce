"""Hypothesis profiles for the fuzz tests: bounded in CI, many more examples by hand.

``HYPOTHESIS_PROFILE=many`` (with ``HYPOTHESIS_EXAMPLES=N``, 20,000 by default) runs each property
with N examples: ``HYPOTHESIS_PROFILE=many python3 -m pytest -k fuzz`` (the fuzz tests:
tests/unit/test_fuzz_feed.py, tests/unit/test_untrusted_input.py, tests/integration/test_fuzz_payload.py).
No deadline: the machine is shared and slow, and these tests assert behaviour, not speed.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_RELAXED = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]

settings.register_profile("ci", max_examples=200, deadline=None, suppress_health_check=_RELAXED,
                          print_blob=True)
settings.register_profile("many", max_examples=int(os.environ.get("HYPOTHESIS_EXAMPLES", "20000")),
                          deadline=None, suppress_health_check=_RELAXED, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
