from __future__ import annotations

import random

from reactor.core.circuit import CLOSED, HALF_OPEN, OPEN, CircuitBreaker


def breaker(threshold: int = 3) -> CircuitBreaker:
    return CircuitBreaker(threshold=threshold, probe_base_s=1.0, probe_cap_s=30.0, rng=random.Random(7))


def test_opens_after_a_run_of_outage_failures() -> None:
    cb = breaker()
    assert cb.on_outage_failure(0.0) is None
    assert cb.on_outage_failure(1.0) is None
    t = cb.on_outage_failure(2.0)
    assert t is not None and (t.old, t.new) == (CLOSED, OPEN)
    assert cb.claim_budget() == 0
    assert cb.next_probe_at is not None and 2.5 <= cb.next_probe_at <= 3.0


def test_any_answer_breaks_the_run() -> None:
    cb = breaker()
    cb.on_outage_failure(0.0)
    cb.on_outage_failure(1.0)
    assert cb.on_success(2.0) is None  # closed stays closed, count reset
    cb.on_outage_failure(3.0)
    cb.on_outage_failure(4.0)
    assert cb.state == CLOSED


def test_probe_success_lets_one_trial_through_and_its_success_closes() -> None:
    cb = breaker(1)
    cb.on_outage_failure(0.0)
    t = cb.on_probe(True, 1.0)
    assert t is not None and t.new == HALF_OPEN
    assert cb.claim_budget() == 1
    cb.trial_started()
    assert cb.claim_budget() == 0  # one at a time
    t = cb.on_success(2.0)
    assert t is not None and (t.old, t.new) == (HALF_OPEN, CLOSED)
    assert cb.claim_budget() is None and cb.opened_at is None


def test_failed_trial_reopens_and_backoff_keeps_growing() -> None:
    cb = breaker(1)
    cb.on_outage_failure(0.0)
    first = cb.next_probe_at
    assert cb.on_probe(False, 1.0) is None
    cb.on_probe(True, 3.0)
    cb.trial_started()
    t = cb.on_outage_failure(4.0)
    assert t is not None and (t.old, t.new) == (HALF_OPEN, OPEN)
    assert cb.opened_at == 0.0  # the same outage
    assert cb.probes == 3 and first is not None


def test_probe_backoff_is_exponential_with_jitter_and_capped() -> None:
    cb = breaker(1)
    cb.on_outage_failure(0.0)
    delays = []
    now = 0.0
    for _ in range(12):
        assert cb.next_probe_at is not None
        delays.append(cb.next_probe_at - now)
        now = cb.next_probe_at
        cb.on_probe(False, now)
    for n, d in enumerate(delays):
        ceiling = min(30.0, 2.0**n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 30.0
    assert sum(delays) > 100  # 12 probes take minutes, not seconds
