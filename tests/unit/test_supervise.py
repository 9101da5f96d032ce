"""The supervisor without a database: the backoff and give-up rules, and parts that fail."""

from __future__ import annotations

import logging
import random

import anyio
import pytest
from anyio.abc import TaskStatus

from reactor.core.errors import ReactorError
from reactor.engine.supervise import (
    Part,
    PartFailed,
    PartSupervisor,
    RestartPolicy,
    describe_error,
    restart_delay,
    should_give_up,
)
from tests.support.processes import until

pytestmark = pytest.mark.anyio


class FixedRandom(random.Random):
    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value

    def random(self) -> float:
        return self.value


# -- the pure rules -------------------------------------------------------------------------------


def test_restart_delay_doubles_up_to_the_cap() -> None:
    policy = RestartPolicy(base_s=1.0, cap_s=30.0)
    top = FixedRandom(1.0)  # the jitter's upper end: the full delay
    assert [restart_delay(n, policy, top) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(10_000, policy, top) == 30  # no overflow on a part that failed for days


def test_restart_delay_jitter_keeps_between_half_and_all() -> None:
    policy = RestartPolicy(base_s=2.0, cap_s=60.0)
    assert restart_delay(3, policy, FixedRandom(0.0)) == 4.0  # half of 8
    assert restart_delay(3, policy, FixedRandom(0.5)) == 6.0
    rng = random.Random(7)
    delays = [restart_delay(3, policy, rng) for _ in range(1000)]
    assert all(4.0 <= d <= 8.0 for d in delays)
    assert len({round(d, 3) for d in delays}) > 100  # spread out, not in step
    assert restart_delay(0, policy, FixedRandom(1.0)) == 2.0  # never below the first step


def test_give_up_after_n_failures_within_the_window() -> None:
    policy = RestartPolicy(give_up_after=5, window_s=60.0)
    assert not should_give_up([0, 10, 20, 30], 30, policy)
    assert should_give_up([0, 10, 20, 30, 40], 40, policy)
    assert should_give_up([0, 1, 2, 3, 59.9], 59.9, policy)


def test_failures_older_than_the_window_do_not_count() -> None:
    policy = RestartPolicy(give_up_after=5, window_s=60.0)
    # one failure every 20 s, for ever: never 5 within a minute
    assert not should_give_up([0, 20, 40, 60, 80], 80, policy)
    assert not should_give_up([0, 1, 2, 3, 60], 60, policy)  # the first fell out at exactly 60 s
    assert should_give_up([0, 30, 40, 50, 60, 70], 70, policy)  # 0 fell out; 5 remain


def test_describe_error_is_one_line_and_unwraps_a_task_group() -> None:
    assert describe_error(ValueError("bad\n  value")) == "ValueError: bad value"
    assert describe_error(ExceptionGroup("unhandled errors", [KeyError("k")])) == "KeyError: 'k'"
    assert describe_error(RuntimeError()) == "RuntimeError"
    assert len(describe_error(ValueError("x" * 1000))) < 220


def test_part_failed_is_a_reactor_error() -> None:
    failed = PartFailed("sweeper", 5, 60.0, "ValueError: no")
    assert isinstance(failed, ReactorError)
    assert str(failed) == "sweeper failed 5 times within 60 s, giving up (last: ValueError: no)"


# -- parts that fail ------------------------------------------------------------------------------


class Flaky:
    """A part that fails ``failures`` times (after it started), then runs until cancelled."""

    def __init__(self, failures: int, *, fail_before_start: bool = False) -> None:
        self.failures = failures
        self.fail_before_start = fail_before_start
        self.starts = 0
        self.release = anyio.Event()  # set: the next failure happens

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        self.starts += 1
        if self.fail_before_start and self.starts > 1 and self.failures > 0:
            self.failures -= 1
            raise OSError("cannot start")
        task_status.started()
        if self.failures > 0:
            await self.release.wait()
            self.release = anyio.Event()
            self.failures -= 1
            raise ValueError(f"boom {self.starts}")
        await anyio.sleep_forever()


async def test_a_failed_part_is_restarted_and_reported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reactor.engine.supervise")
    flaky = Flaky(2)
    restarted: list[str] = []
    resets: list[int] = []
    sup = PartSupervisor(RestartPolicy(base_s=0.2, cap_s=0.2), on_restart=restarted.append, rng=FixedRandom(1.0))
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run, Part("sweeper", flaky.run, before_restart=lambda: resets.append(flaky.starts)))
        assert sup.states() == {"sweeper": "running"} and sup.report() == (True, {"sweeper": "running"})
        flaky.release.set()
        await until(lambda: sup.states()["sweeper"].startswith("restarting"), "the part restarting", timeout=10)
        assert sup.states()["sweeper"] == "restarting: ValueError: boom 1 (1 restart)"
        assert sup.down() == ["sweeper"] and sup.report()[0] is False
        await until(lambda: flaky.starts == 2 and sup.states()["sweeper"] == "running", "the restart", timeout=10)
        flaky.release.set()
        await until(lambda: flaky.starts == 3 and sup.states()["sweeper"] == "running", "restart 2", timeout=10)
        tg.cancel_scope.cancel()
    assert restarted == ["sweeper", "sweeper"] and sup.restarts("sweeper") == 2
    assert resets == [1, 2]  # before each restart, never before the first start
    assert sup.gave_up is None
    failures = [r for r in caplog.records if r.name == "reactor.engine.supervise"]
    assert [r.getMessage() for r in failures] == [
        "sweeper failed unexpectedly: restart 1 in 0.2 s", "sweeper failed unexpectedly: restart 2 in 0.2 s"]
    assert all(r.levelno == logging.ERROR and r.exc_info and r.exc_info[0] is ValueError for r in failures)
    assert [getattr(r, "restarts", None) for r in failures] == [1, 2]


async def test_a_part_that_cannot_stay_up_gives_up(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="reactor.engine.supervise")
    flaky = Flaky(100)
    gave_up: list[PartFailed] = []
    sup = PartSupervisor(RestartPolicy(base_s=0.01, cap_s=0.01, give_up_after=3, window_s=60),
                         on_give_up=gave_up.append)
    other = Flaky(0)
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run, Part("listener", flaky.run))
        await tg.start(sup.run, Part("alerts", other.run, required=False))
        for _ in range(3):
            flaky.release.set()
            await anyio.sleep(0.05)
        await until(lambda: bool(gave_up), "giving up", timeout=10)
        assert sup.states() == {"listener": "failed: ValueError: boom 3", "alerts": "running"}
        assert sup.down() == ["listener"]
        tg.cancel_scope.cancel()
    assert flaky.starts == 3  # given up: not started again
    assert sup.gave_up is gave_up[0] and gave_up[0].part == "listener" and gave_up[0].failures == 3
    last = [r for r in caplog.records if r.name == "reactor.engine.supervise"][-1]
    assert last.getMessage() == "listener failed 3 times within 60 s: giving up, the reactor stops"
    assert last.exc_info is not None


async def test_a_restart_that_fails_before_it_starts_counts_as_a_failure() -> None:
    flaky = Flaky(2, fail_before_start=True)  # fails once running, then once while starting again
    sup = PartSupervisor(RestartPolicy(base_s=0.01, cap_s=0.01))
    async with anyio.create_task_group() as tg:
        await tg.start(sup.run, Part("feed", flaky.run))
        flaky.release.set()
        await until(lambda: flaky.starts == 3 and sup.states()["feed"] == "running", "the restarts", timeout=10)
        tg.cancel_scope.cancel()
    assert sup.restarts("feed") == 2


async def test_a_part_that_fails_before_its_first_start_fails_the_start() -> None:
    async def broken(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        raise OSError("address already in use")

    sup = PartSupervisor(RestartPolicy(base_s=0.01))
    async with anyio.create_task_group() as tg:
        with pytest.raises(OSError, match="address already in use"):
            await tg.start(sup.run, Part("feed", broken))
    assert sup.restarts("feed") == 0


async def test_cancellation_is_not_a_failure() -> None:
    restarted: list[str] = []
    sup = PartSupervisor(on_restart=restarted.append)
    part = Flaky(0)
    with anyio.move_on_after(0.1):
        async with anyio.create_task_group() as tg:
            await tg.start(sup.run, Part("dispatcher", part.run))
            await anyio.sleep_forever()
    assert restarted == [] and part.starts == 1 and sup.gave_up is None
