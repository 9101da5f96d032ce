"""The one backoff (reactor/core/backoff.py), and that every retry loop's delays are its delays."""

from __future__ import annotations

import random

import pytest

from reactor.core.backoff import Backoff, backoff
from reactor.core.circuit import CircuitBreaker
from reactor.core.policy import backoff_seconds
from reactor.engine.supervise import RestartPolicy, restart_delay


class Fixed(random.Random):
    """A random source that always says ``value``."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(("attempt", "ceiling"), [(0, 2.0), (1, 4.0), (3, 16.0), (7, 256.0), (8, 300.0), (40, 300.0)])
def test_the_delay_is_between_half_and_all_of_the_capped_exponential(attempt: int, ceiling: float) -> None:
    assert backoff(attempt, base=2.0, cap=300.0, rng=Fixed(0.0)) == ceiling / 2
    assert backoff(attempt, base=2.0, cap=300.0, rng=Fixed(0.999999)) == pytest.approx(ceiling, rel=1e-5)
    rng = random.Random(4)
    for _ in range(200):
        assert ceiling / 2 <= backoff(attempt, base=2.0, cap=300.0, rng=rng) <= ceiling


def test_odd_attempts_neither_raise_nor_overflow() -> None:
    assert backoff(-3, base=1.0, cap=30.0, rng=Fixed(0.0)) == 0.5  # before the first: as the first
    assert backoff(10**9, base=1.0, cap=30.0, rng=Fixed(0.0)) == 15.0


def test_the_same_seed_gives_the_same_delays() -> None:
    assert [backoff(n, base=0.1, cap=5.0, rng=random.Random(9)) for n in range(8)] == \
        [backoff(n, base=0.1, cap=5.0, rng=random.Random(9)) for n in range(8)]


def test_a_loop_counts_its_retries_and_starts_over_after_a_success() -> None:
    retry = Backoff(base=1.0, cap=8.0, rng=Fixed(0.0))
    assert [retry.delay() for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert retry.attempt == 5
    retry.reset()
    assert retry.due(now=100.0) == 100.5  # the clock comes in: the time of the next retry on it
    assert retry.attempt == 1


def test_the_retry_loops_use_it() -> None:
    # a job's retry, the circuit's probes and a part's restart give exactly its delays
    for n in range(12):
        assert backoff_seconds(n, random.Random(n)) == backoff(n, base=2.0, cap=300.0, rng=random.Random(n))
        circuit = CircuitBreaker(probe_base_s=1.0, probe_cap_s=30.0, rng=random.Random(n), probes=n)
        assert circuit.probe_delay() == backoff(n, base=1.0, cap=30.0, rng=random.Random(n))
        policy = RestartPolicy(base_s=1.0, cap_s=30.0)
        assert restart_delay(n + 1, policy, random.Random(n)) == backoff(n, base=1.0, cap=30.0, rng=random.Random(n))
    assert backoff_seconds(0, random.Random(1), retry_after=90.0) == 90.0  # Retry-After: a lower bound
