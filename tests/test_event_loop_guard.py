"""The guard every test runs under (tests/conftest.py): a blocking call on the event
loop fails the test."""

from __future__ import annotations

import time

import pytest
from blockbuster import BlockingError


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # blockbuster sees asyncio's loop
async def test_a_blocking_call_on_the_event_loop_fails_the_test() -> None:
    with pytest.raises(BlockingError, match=r"time\.sleep"):
        time.sleep(0.001)  # noqa: ASYNC251 - the blocking call under test
