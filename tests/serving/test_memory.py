"""A worker hands back the heap a burst of request bodies leaves behind, once it has gone quiet."""

import asyncio
import platform
import threading

import pytest

from service.limits import BodyBudget
from service.memory import trim_heap


def test_the_heap_is_trimmed_once_the_worker_is_quiet_after_enough_bodies():
    trimmed = threading.Event()
    calls = []

    def trim():
        calls.append(threading.current_thread().name)
        trimmed.set()

    async def scenario() -> None:
        budget = BodyBudget(1000, trim, trim_after=50, quiet_s=0.05)
        budget.take(30)
        budget.give(30)
        assert budget.quiet is None  # 30 bytes: not worth a trim
        budget.take(30)
        budget.give(30)
        assert budget.quiet is not None  # 60 passed, none held: a trim once the worker stays quiet
        await asyncio.sleep(0.02)
        budget.take(10)  # a body came: not quiet after all
        assert budget.quiet is None
        await asyncio.sleep(0.1)
        assert not calls
        budget.give(10)
        await asyncio.sleep(0.1)
        assert await asyncio.to_thread(trimmed.wait, 5)
        budget.take(10)
        budget.give(10)
        assert budget.quiet is None and budget.since_trim == 10  # counting starts again

    asyncio.run(scenario())
    assert len(calls) == 1 and calls[0] != threading.main_thread().name  # off the event loop's thread


def test_no_trim_while_a_body_is_held():
    async def scenario() -> None:
        budget = BodyBudget(1000, lambda: pytest.fail("trimmed while a body was held"), trim_after=1, quiet_s=0.01)
        budget.take(100)
        budget.take(100)
        budget.give(100)
        await asyncio.sleep(0.05)
        assert budget.quiet is None and budget.held == 100

    asyncio.run(scenario())


def test_the_app_trims_with_glibc():
    from service.config import Settings
    from service.main import create_app

    assert create_app(Settings(GRPC_PORT=0)).state.body_budget.trim is trim_heap
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert trim_heap()
